//! Mosquitto-compatible password file.
//!
//! One `username:hash` entry per line; blank lines and lines starting with `#` are ignored. Three hash formats are
//! understood, so a file written by `mosquitto_passwd` works unchanged:
//!
//! * `$6$<salt>$<hash>`: SHA-512 over the password bytes followed by the salt bytes (Mosquitto 1.6 and earlier).
//! * `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512 with a 64-byte output (Mosquitto 2.x default).
//! * `$argon2id$v=19$m=…,t=…,p=…$<salt>$<hash>`: an argon2id PHC string, our default for new entries.
//!
//! Salts and hashes of the first two are standard base64; padding is written and is optional when read.

use std::collections::HashMap;
use std::fmt;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Iteration count `mosquitto_passwd` uses for `$7$` entries.
pub const MOSQUITTO_PBKDF2_ITERATIONS: u32 = 101;

/// Salt length `mosquitto_passwd` uses for `$6$` and `$7$`; matching it keeps our entries indistinguishable.
const MOSQUITTO_SALT_LEN: usize = 12;

/// argon2's recommended salt length.
const ARGON2_SALT_LEN: usize = 16;

/// Upper bound on argon2's memory cost (KiB) accepted from a file: a typo'd `m=` would otherwise make every login
/// try to allocate gigabytes, and a failed allocation aborts the whole broker rather than failing one check.
const ARGON2_MAX_M_COST_KIB: u32 = 1024 * 1024;

/// Both Mosquitto schemes store a full SHA-512-sized digest; anything else can never match.
const DIGEST_LEN: usize = 64;

/// Writes padding like Mosquitto, but reads unpadded input too: hand-edited files lose it and it carries no meaning.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_encode_padding(true).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Outcome of [`PasswordFile::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Match,
    Mismatch,
    UnknownUser,
}

/// How [`hash_password`] hashes a new password.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashScheme {
    /// argon2id with the argon2 crate's default (OWASP) parameters. Not readable by Mosquitto itself.
    #[default]
    Argon2id,
    /// Mosquitto 2.x `$7$`; Mosquitto uses [`MOSQUITTO_PBKDF2_ITERATIONS`].
    Pbkdf2Sha512 { iterations: u32 },
    /// Mosquitto 1.x `$6$`: a single unstretched SHA-512, only for files that old brokers must also read.
    Sha512,
}

/// One problem found by [`PasswordFile::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct PasswordFileError {
    /// 1-based line number.
    pub line: usize,
    pub kind: PasswordFileErrorKind,
}

/// Why a password file line was rejected.
///
/// No variant echoes the hash field: a line that holds a plain-text password by mistake must not leak it into logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordFileErrorKind {
    #[error("missing ':' between username and hash")]
    MissingColon,
    #[error("empty username")]
    EmptyUsername,
    #[error("empty hash")]
    EmptyHash,
    #[error("hash does not start with '$' (plain-text passwords are not supported; hash them first)")]
    NotAHash,
    /// The scheme is shown only when it looks like a scheme id, never when it could be a password.
    #[error("unknown hash scheme{}", scheme_suffix(.0))]
    UnknownScheme(Option<String>),
    #[error("malformed {scheme} hash, expected {expected}")]
    Malformed { scheme: &'static str, expected: &'static str },
    #[error("bad base64 in the {field}")]
    BadBase64 { field: &'static str },
    #[error("empty salt")]
    EmptySalt,
    #[error("hash is {found} bytes long, expected {expected}")]
    BadHashLength { expected: usize, found: usize },
    #[error("bad iteration count (must be a whole number from 1 to 4294967295)")]
    BadIterations,
    #[error("bad argon2id hash: {0}")]
    BadArgon2(String),
    #[error("duplicate user {username:?} (first defined on line {first_line})")]
    DuplicateUser { username: String, first_line: usize },
}

fn scheme_suffix(scheme: &Option<String>) -> String {
    match scheme {
        Some(s) => format!(" {s:?}"),
        None => String::new(),
    }
}

/// Why [`hash_password`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    #[error("PBKDF2 iteration count must be at least 1")]
    ZeroIterations,
    #[error("could not get random bytes for the salt: {0}")]
    Random(String),
    #[error("argon2 hashing failed: {0}")]
    Argon2(String),
    #[error("generated hash could not be read back: {0}")]
    Unreadable(String),
}

/// Why [`PasswordFile::set`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    #[error("invalid username: {0}")]
    InvalidUsername(&'static str),
    #[error(transparent)]
    Hash(#[from] HashError),
}

/// A parsed hash, decoded once at load time so a login never re-parses base64.
#[derive(Clone)]
enum StoredHash {
    Sha512 {
        salt: Vec<u8>,
        digest: Vec<u8>,
    },
    Pbkdf2Sha512 {
        iterations: u32,
        salt: Vec<u8>,
        digest: Vec<u8>,
    },
    /// The PHC text lives in [`Entry::hash`]; `PasswordHash` borrows, so it is re-parsed (cheaply) per check.
    Argon2id,
}

#[derive(Clone)]
struct Entry {
    username: String,
    /// Exactly as read or generated, so rewriting a file leaves untouched entries byte-identical.
    hash: String,
    stored: StoredHash,
}

/// A Mosquitto-compatible password file, kept in file order.
#[derive(Clone, Default)]
pub struct PasswordFile {
    entries: Vec<Entry>,
    /// username -> position in `entries`; logins look users up on every CONNECT.
    index: HashMap<String, usize>,
}

// Hand-written so that salts and digests never end up in debug logs.
impl fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordFile").field("users", &self.usernames().collect::<Vec<_>>()).finish()
    }
}

impl PasswordFile {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the file's text, reporting every bad line rather than stopping at the first, so an operator can fix
    /// them all in one go.
    pub fn parse(text: &str) -> Result<PasswordFile, Vec<PasswordFileError>> {
        let mut file = PasswordFile::new();
        let mut first_lines: HashMap<String, usize> = HashMap::new();
        let mut errors = Vec::new();

        for (line_no, line) in crate::content_lines(text) {
            match parse_line(line) {
                Ok(entry) => {
                    if let Some(&first_line) = first_lines.get(&entry.username) {
                        errors.push(PasswordFileError {
                            line: line_no,
                            kind: PasswordFileErrorKind::DuplicateUser { username: entry.username, first_line },
                        });
                    } else {
                        first_lines.insert(entry.username.clone(), line_no);
                        file.push(entry);
                    }
                }
                Err(kind) => errors.push(PasswordFileError { line: line_no, kind }),
            }
        }

        if errors.is_empty() { Ok(file) } else { Err(errors) }
    }

    /// Checks a password. Digests are compared in constant time.
    pub fn verify(&self, username: &str, password: &[u8]) -> PasswordCheck {
        let Some(entry) = self.index.get(username).and_then(|&i| self.entries.get(i)) else {
            return PasswordCheck::UnknownUser;
        };
        if entry_matches(entry, password) { PasswordCheck::Match } else { PasswordCheck::Mismatch }
    }

    /// Adds a user or replaces that user's password in place (keeping the line's position).
    pub fn set(&mut self, username: &str, password: &str, scheme: HashScheme) -> Result<(), SetError> {
        validate_username(username)?;
        let hash = hash_password(password, scheme)?;
        // Re-parse our own output so the stored form is built by exactly the code that reads files.
        let stored = parse_hash(&hash).map_err(|e| HashError::Unreadable(e.to_string()))?;
        let entry = Entry { username: username.to_owned(), hash, stored };
        match self.index.get(username).copied() {
            Some(i) => {
                if let Some(slot) = self.entries.get_mut(i) {
                    *slot = entry;
                }
            }
            None => self.push(entry),
        }
        Ok(())
    }

    /// Removes a user; returns whether it was present.
    pub fn remove(&mut self, username: &str) -> bool {
        let Some(i) = self.index.remove(username) else {
            return false;
        };
        if i < self.entries.len() {
            self.entries.remove(i);
        }
        // Positions after `i` shifted; rebuilding is O(n) but removals are rare admin operations.
        self.reindex();
        true
    }

    /// The file's text: one `username:hash` line per user, in order. Comments and blank lines are not kept.
    pub fn to_file_string(&self) -> String {
        let mut out = String::new();
        for entry in &self.entries {
            out.push_str(&entry.username);
            out.push(':');
            out.push_str(&entry.hash);
            out.push('\n');
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, username: &str) -> bool {
        self.index.contains_key(username)
    }

    /// Usernames in file order.
    pub fn usernames(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.username.as_str())
    }

    fn push(&mut self, entry: Entry) {
        self.index.insert(entry.username.clone(), self.entries.len());
        self.entries.push(entry);
    }

    fn reindex(&mut self) {
        self.index = self.entries.iter().enumerate().map(|(i, e)| (e.username.clone(), i)).collect();
    }
}

/// Hashes `password` into the text that follows `username:` on a password file line, with a fresh random salt.
pub fn hash_password(password: &str, scheme: HashScheme) -> Result<String, HashError> {
    let password = password.as_bytes();
    match scheme {
        HashScheme::Argon2id => {
            let mut salt = [0u8; ARGON2_SALT_LEN];
            fill_random(&mut salt)?;
            let salt = SaltString::encode_b64(&salt).map_err(|e| HashError::Argon2(e.to_string()))?;
            let hash =
                Argon2::default().hash_password(password, &salt).map_err(|e| HashError::Argon2(e.to_string()))?;
            Ok(hash.to_string())
        }
        HashScheme::Pbkdf2Sha512 { iterations } => {
            if iterations == 0 {
                return Err(HashError::ZeroIterations);
            }
            let mut salt = [0u8; MOSQUITTO_SALT_LEN];
            fill_random(&mut salt)?;
            let digest = pbkdf2_sha512(password, &salt, iterations);
            Ok(format!("$7${iterations}${}${}", BASE64.encode(salt), BASE64.encode(digest)))
        }
        HashScheme::Sha512 => {
            let mut salt = [0u8; MOSQUITTO_SALT_LEN];
            fill_random(&mut salt)?;
            let digest = sha512_salted(password, &salt);
            Ok(format!("$6${}${}", BASE64.encode(salt), BASE64.encode(digest)))
        }
    }
}

fn fill_random(buf: &mut [u8]) -> Result<(), HashError> {
    // `try_fill_bytes` rather than `fill_bytes`: the latter panics if the OS RNG is unavailable.
    OsRng.try_fill_bytes(buf).map_err(|e| HashError::Random(e.to_string()))
}

fn sha512_salted(password: &[u8], salt: &[u8]) -> [u8; DIGEST_LEN] {
    let mut hasher = Sha512::new();
    hasher.update(password);
    hasher.update(salt);
    hasher.finalize().into()
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

fn entry_matches(entry: &Entry, password: &[u8]) -> bool {
    match &entry.stored {
        StoredHash::Sha512 { salt, digest } => bool::from(sha512_salted(password, salt).as_slice().ct_eq(digest)),
        StoredHash::Pbkdf2Sha512 { iterations, salt, digest } => {
            bool::from(pbkdf2_sha512(password, salt, *iterations).as_slice().ct_eq(digest))
        }
        StoredHash::Argon2id => match PasswordHash::new(&entry.hash) {
            // The argon2 crate compares outputs in constant time and takes parameters from the PHC string.
            Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
            Err(_) => false,
        },
    }
}

fn validate_username(username: &str) -> Result<(), SetError> {
    let reason = if username.is_empty() {
        "must not be empty"
    } else if username.contains(':') {
        "must not contain ':'"
    } else if username.chars().any(char::is_control) {
        // A newline would split the entry into two lines when the file is written.
        "must not contain control characters"
    } else if username.trim() != username {
        // The reader trims lines, so such a name would not survive a write/read round trip.
        "must not start or end with whitespace"
    } else if username.starts_with('#') {
        // The reader would take the written line for a comment.
        "must not start with '#'"
    } else {
        return Ok(());
    };
    Err(SetError::InvalidUsername(reason))
}

fn parse_line(line: &str) -> Result<Entry, PasswordFileErrorKind> {
    let (username, hash) = line.split_once(':').ok_or(PasswordFileErrorKind::MissingColon)?;
    let username = username.trim();
    let hash = hash.trim();
    if username.is_empty() {
        return Err(PasswordFileErrorKind::EmptyUsername);
    }
    let stored = parse_hash(hash)?;
    Ok(Entry { username: username.to_owned(), hash: hash.to_owned(), stored })
}

fn parse_hash(hash: &str) -> Result<StoredHash, PasswordFileErrorKind> {
    if hash.is_empty() {
        return Err(PasswordFileErrorKind::EmptyHash);
    }
    let Some(after_dollar) = hash.strip_prefix('$') else {
        return Err(PasswordFileErrorKind::NotAHash);
    };
    let (id, rest) = after_dollar.split_once('$').unwrap_or((after_dollar, ""));
    match id {
        "6" => parse_sha512(rest),
        "7" => parse_pbkdf2(rest),
        "argon2id" => parse_argon2id(hash),
        _ => Err(PasswordFileErrorKind::UnknownScheme(displayable_scheme(id))),
    }
}

/// Only a short, scheme-looking id is echoed: a plain-text password that happens to start with `$` must not be.
fn displayable_scheme(id: &str) -> Option<String> {
    let looks_like_id = !id.is_empty()
        && id.len() <= 16
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    looks_like_id.then(|| format!("${id}$"))
}

fn parse_sha512(rest: &str) -> Result<StoredHash, PasswordFileErrorKind> {
    let mut fields = rest.split('$');
    let (Some(salt), Some(digest), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(PasswordFileErrorKind::Malformed { scheme: "$6$", expected: "$6$<salt>$<hash>" });
    };
    let (salt, digest) = decode_salt_and_digest(salt, digest)?;
    Ok(StoredHash::Sha512 { salt, digest })
}

fn parse_pbkdf2(rest: &str) -> Result<StoredHash, PasswordFileErrorKind> {
    let mut fields = rest.split('$');
    let (Some(iterations), Some(salt), Some(digest), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(PasswordFileErrorKind::Malformed { scheme: "$7$", expected: "$7$<iterations>$<salt>$<hash>" });
    };
    // Digits only: `u32::from_str` would also take a leading '+', which Mosquitto never writes.
    let iterations = if !iterations.is_empty() && iterations.bytes().all(|b| b.is_ascii_digit()) {
        iterations.parse::<u32>().ok().filter(|&n| n > 0)
    } else {
        None
    }
    .ok_or(PasswordFileErrorKind::BadIterations)?;
    let (salt, digest) = decode_salt_and_digest(salt, digest)?;
    Ok(StoredHash::Pbkdf2Sha512 { iterations, salt, digest })
}

fn decode_salt_and_digest(salt: &str, digest: &str) -> Result<(Vec<u8>, Vec<u8>), PasswordFileErrorKind> {
    let salt = BASE64.decode(salt).map_err(|_| PasswordFileErrorKind::BadBase64 { field: "salt" })?;
    if salt.is_empty() {
        return Err(PasswordFileErrorKind::EmptySalt);
    }
    let digest = BASE64.decode(digest).map_err(|_| PasswordFileErrorKind::BadBase64 { field: "hash" })?;
    if digest.len() != DIGEST_LEN {
        return Err(PasswordFileErrorKind::BadHashLength { expected: DIGEST_LEN, found: digest.len() });
    }
    Ok((salt, digest))
}

fn parse_argon2id(hash: &str) -> Result<StoredHash, PasswordFileErrorKind> {
    let bad = |e: argon2::password_hash::Error| PasswordFileErrorKind::BadArgon2(e.to_string());
    let parsed = PasswordHash::new(hash).map_err(bad)?;
    // Checked now so that a broken entry is reported at load time instead of silently failing every login.
    let params = argon2::Params::try_from(&parsed).map_err(bad)?;
    if params.m_cost() > ARGON2_MAX_M_COST_KIB {
        return Err(PasswordFileErrorKind::BadArgon2(format!(
            "memory cost m={} KiB is above the {ARGON2_MAX_M_COST_KIB} KiB limit",
            params.m_cost()
        )));
    }
    if let Some(version) = parsed.version {
        argon2::Version::try_from(version).map_err(|e| PasswordFileErrorKind::BadArgon2(e.to_string()))?;
    }
    if parsed.salt.is_none() {
        return Err(PasswordFileErrorKind::BadArgon2("missing salt".to_owned()));
    }
    if parsed.hash.is_none() {
        return Err(PasswordFileErrorKind::BadArgon2("missing hash".to_owned()));
    }
    Ok(StoredHash::Argon2id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Generated on this project's machine with Mosquitto 2.0.11:
    //   mosquitto_passwd -b -c pw user secret
    //   mosquitto_passwd -b -c pw alice 'p@ss word:ü' && mosquitto_passwd -b pw bob ''
    //   mosquitto_passwd -H sha512 -b -c pw user secret && mosquitto_passwd -H sha512 -b pw alice 'p@ss word:ü'
    const MOSQ_7_USER: &str = "user:$7$101$BsXywMaG/odGH1I0$7oxRlGDWax75GWkCsoRmnyti9aMu99OsY3a3U06D86+c4P0g0vfgrOvdYfVDynic/FghBzz0lSvad6G8U13YlA==";
    const MOSQ_7_ALICE: &str = "alice:$7$101$psD/9mBXKw/Pqpy2$zh1a11Ftm1PEztf9JcpxKOK3k705ezBqxcQ3jy3gNoVSWNJfAweX3ZqDEVdWCpBpPGSuGt2XPs4L2Y2uFy2lOQ==";
    const MOSQ_7_BOB_EMPTY: &str = "bob:$7$101$Vbn0mn9jHb0YsvO6$HV7c2WkgCpIvXNkobdRZpye8NFwalmF9WmEaeQ7D1zelcOYk0InXJfCnITDQ59+Fa+F/JN9whgVrjYaz6CHHXA==";
    const MOSQ_6_USER: &str = "user:$6$/a0Ei6Z3MHB/BIJi$Mpe9cMqZCefle9fNxKmf45ZhqaJ/aTt7Fb7UKh6ZPSLeQ+vNHU+4FaHTtv8m1m0oOEAFGcjYa27B1qOh8t7jng==";
    const MOSQ_6_ALICE: &str = "alice:$6$GCBdR79X7HZNBWGB$sLhs7fM2muhVbNjNzNp75BS8mqdm/ehpm7tmFvE9AAJdeSvApazD3xsKMrjYU39zrzsN7cUleFrpy2T5Mq7pIA==";

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn kinds(text: &str) -> Vec<(usize, PasswordFileErrorKind)> {
        PasswordFile::parse(text).unwrap_err().into_iter().map(|e| (e.line, e.kind)).collect()
    }

    /// An argon2id PHC string with tiny parameters so tests stay fast in debug builds.
    fn cheap_argon2id(password: &[u8]) -> String {
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        argon.hash_password(password, &salt).unwrap().to_string()
    }

    #[test]
    fn sha512_vector_built_from_primitives() {
        let salt = b"NaCl-12bytes";
        let mut h = Sha512::new();
        h.update(b"hunter2");
        h.update(salt);
        let line = format!("carol:$6${}${}", b64(salt), b64(&h.finalize()));
        let file = PasswordFile::parse(&line).unwrap();
        assert_eq!(file.verify("carol", b"hunter2"), PasswordCheck::Match);
        assert_eq!(file.verify("carol", b"hunter3"), PasswordCheck::Mismatch);
        assert_eq!(file.verify("carol", b""), PasswordCheck::Mismatch);
    }

    #[test]
    fn pbkdf2_vector_built_from_primitives() {
        let salt = [7u8; 12];
        let mut digest = [0u8; 64];
        pbkdf2::pbkdf2_hmac::<Sha512>(b"correct horse", &salt, 1000, &mut digest);
        let line = format!("dave:$7$1000${}${}", b64(&salt), b64(&digest));
        let file = PasswordFile::parse(&line).unwrap();
        assert_eq!(file.verify("dave", b"correct horse"), PasswordCheck::Match);
        assert_eq!(file.verify("dave", b"correct horsf"), PasswordCheck::Mismatch);

        // Same salt and digest under a different iteration count must not match.
        let wrong_iter = format!("dave:$7$999${}${}", b64(&salt), b64(&digest));
        let file = PasswordFile::parse(&wrong_iter).unwrap();
        assert_eq!(file.verify("dave", b"correct horse"), PasswordCheck::Mismatch);
    }

    #[test]
    fn unpadded_base64_is_accepted() {
        let salt = b"0123456789a"; // 11 bytes: its base64 form needs one '='
        let digest = sha512_salted(b"pw", salt);
        let line = format!("eve:$6${}${}", b64(salt).trim_end_matches('='), b64(&digest).trim_end_matches('='));
        let file = PasswordFile::parse(&line).unwrap();
        assert_eq!(file.verify("eve", b"pw"), PasswordCheck::Match);
    }

    #[test]
    fn real_mosquitto_pbkdf2_lines() {
        let text = [MOSQ_7_USER, MOSQ_7_ALICE, MOSQ_7_BOB_EMPTY].join("\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 3);
        assert_eq!(file.verify("user", b"secret"), PasswordCheck::Match);
        assert_eq!(file.verify("user", b"Secret"), PasswordCheck::Mismatch);
        assert_eq!(file.verify("alice", "p@ss word:ü".as_bytes()), PasswordCheck::Match);
        assert_eq!(file.verify("alice", b"p@ss word:"), PasswordCheck::Mismatch);
        assert_eq!(file.verify("bob", b""), PasswordCheck::Match);
        assert_eq!(file.verify("bob", b" "), PasswordCheck::Mismatch);
        // Rewriting keeps Mosquitto's lines byte-identical.
        assert_eq!(file.to_file_string(), format!("{text}\n"));
    }

    #[test]
    fn real_mosquitto_sha512_lines() {
        let text = format!("{MOSQ_6_USER}\r\n{MOSQ_6_ALICE}\r\n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.verify("user", b"secret"), PasswordCheck::Match);
        assert_eq!(file.verify("user", b"secret "), PasswordCheck::Mismatch);
        assert_eq!(file.verify("alice", "p@ss word:ü".as_bytes()), PasswordCheck::Match);
        assert_eq!(file.verify("alice", b"secret"), PasswordCheck::Mismatch);
    }

    #[test]
    fn cheap_argon2id_line_verifies() {
        let line = format!("frank:{}", cheap_argon2id(b"s3cret"));
        let file = PasswordFile::parse(&line).unwrap();
        assert_eq!(file.verify("frank", b"s3cret"), PasswordCheck::Match);
        assert_eq!(file.verify("frank", b"s3cre"), PasswordCheck::Mismatch);
    }

    #[test]
    fn argon2id_default_round_trip() {
        let hash = hash_password("pa55", HashScheme::default()).unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        let file = PasswordFile::parse(&format!("gina:{hash}")).unwrap();
        assert_eq!(file.verify("gina", b"pa55"), PasswordCheck::Match);
        assert_eq!(file.verify("gina", b"pa56"), PasswordCheck::Mismatch);
    }

    #[test]
    fn mosquitto_schemes_generate_12_byte_salts_and_verify() {
        let h7 = hash_password("pw", HashScheme::Pbkdf2Sha512 { iterations: MOSQUITTO_PBKDF2_ITERATIONS }).unwrap();
        let fields: Vec<&str> = h7.split('$').collect();
        assert_eq!(fields[..3], ["", "7", "101"]);
        assert_eq!(BASE64.decode(fields[3]).unwrap().len(), 12);
        assert_eq!(BASE64.decode(fields[4]).unwrap().len(), 64);

        let h6 = hash_password("pw", HashScheme::Sha512).unwrap();
        let fields: Vec<&str> = h6.split('$').collect();
        assert_eq!(fields[..2], ["", "6"]);
        assert_eq!(BASE64.decode(fields[2]).unwrap().len(), 12);

        let file = PasswordFile::parse(&format!("a:{h7}\nb:{h6}\n")).unwrap();
        assert_eq!(file.verify("a", b"pw"), PasswordCheck::Match);
        assert_eq!(file.verify("b", b"pw"), PasswordCheck::Match);
        assert_eq!(file.verify("a", b"px"), PasswordCheck::Mismatch);
        assert_eq!(file.verify("b", b"px"), PasswordCheck::Mismatch);

        // Fresh salt each time.
        assert_ne!(h6, hash_password("pw", HashScheme::Sha512).unwrap());
        assert_eq!(hash_password("pw", HashScheme::Pbkdf2Sha512 { iterations: 0 }), Err(HashError::ZeroIterations));
    }

    #[test]
    fn leading_bom_is_ignored() {
        let file = PasswordFile::parse(&format!("\u{feff}{MOSQ_7_USER}")).unwrap();
        assert_eq!(file.verify("user", b"secret"), PasswordCheck::Match);
    }

    #[test]
    fn unknown_user() {
        let file = PasswordFile::parse(MOSQ_7_USER).unwrap();
        assert_eq!(file.verify("User", b"secret"), PasswordCheck::UnknownUser);
        assert_eq!(file.verify("", b"secret"), PasswordCheck::UnknownUser);
        assert_eq!(PasswordFile::new().verify("user", b"secret"), PasswordCheck::UnknownUser);
    }

    #[test]
    fn comments_blank_lines_and_whitespace() {
        let text = format!("# a comment\n\n   \n  # indented comment\n  {MOSQ_7_USER}  \n");
        let file = PasswordFile::parse(&text).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.contains("user"));
        assert_eq!(file.verify("user", b"secret"), PasswordCheck::Match);
        assert!(PasswordFile::parse("").unwrap().is_empty());
        assert!(PasswordFile::parse("# only\n\n").unwrap().is_empty());
    }

    #[test]
    fn every_parse_error_reported_with_line_numbers() {
        let good6 = MOSQ_6_USER.trim_start_matches("user:");
        let (salt7, digest7) = (
            "BsXywMaG/odGH1I0",
            "7oxRlGDWax75GWkCsoRmnyti9aMu99OsY3a3U06D86+c4P0g0vfgrOvdYfVDynic/FghBzz0lSvad6G8U13YlA==",
        );
        let text = [
            "# header",                                                      // 1
            "nocolon",                                                       // 2
            ":$6$abc$def",                                                   // 3
            "empty:",                                                        // 4
            "plain:hunter2",                                                 // 5
            "five:$5$rounds=5000$salt$hash",                                 // 6
            "six:$6$only-one-field",                                         // 7
            "badb64:$6$!!!!$AAAA",                                           // 8
            &format!("badhash:$6${salt7}$not*base64"),                       // 9
            "short:$6$c2FsdA==$c2hvcnQ=",                                    // 10
            &format!("emptysalt:$6$${digest7}"),                             // 11
            &format!("iter0:$7$0${salt7}${digest7}"),                        // 12
            &format!("iterx:$7$abc${salt7}${digest7}"),                      // 13
            &format!("iterbig:$7$4294967296${salt7}${digest7}"),             // 14
            &format!("iterplus:$7$+5${salt7}${digest7}"),                    // 15
            "sevenshort:$7$101$salt",                                        // 16
            "argon:$argon2id$v=19$m=bogus$salt$hash",                        // 17
            &format!("user:{good6}"),                                        // 18
            &format!("user:{good6}"),                                        // 19
            "argonnohash:$argon2id$v=19$m=8,t=1,p=1$MDEyMzQ1Njc4OWFiY2RlZg", // 20
            "$secret-plaintext-that-starts-with-dollar",                     // 21
            "leak:$Sup3r Secret!",                                           // 22
        ]
        .join("\n");
        use PasswordFileErrorKind as K;
        let got = kinds(&text);
        let expected_prefix = vec![
            (2, K::MissingColon),
            (3, K::EmptyUsername),
            (4, K::EmptyHash),
            (5, K::NotAHash),
            (6, K::UnknownScheme(Some("$5$".into()))),
            (7, K::Malformed { scheme: "$6$", expected: "$6$<salt>$<hash>" }),
            (8, K::BadBase64 { field: "salt" }),
            (9, K::BadBase64 { field: "hash" }),
            (10, K::BadHashLength { expected: 64, found: 5 }),
            (11, K::EmptySalt),
            (12, K::BadIterations),
            (13, K::BadIterations),
            (14, K::BadIterations),
            (15, K::BadIterations),
            (16, K::Malformed { scheme: "$7$", expected: "$7$<iterations>$<salt>$<hash>" }),
        ];
        assert_eq!(got[..expected_prefix.len()], expected_prefix[..]);
        let rest = &got[expected_prefix.len()..];
        assert_eq!(rest.len(), 5, "{rest:?}");
        assert!(matches!(rest[0], (17, K::BadArgon2(_))));
        assert_eq!(rest[1], (19, K::DuplicateUser { username: "user".into(), first_line: 18 }));
        assert_eq!(rest[2], (20, K::BadArgon2("missing hash".into())));
        assert_eq!(rest[3], (21, K::MissingColon));
        assert_eq!(rest[4], (22, K::UnknownScheme(None)));
    }

    #[test]
    fn error_display() {
        let errs = PasswordFile::parse("a:$6$x$y\n\nb:$5$abc\nc:$Sup3r Secret!\nb").unwrap_err();
        let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(shown[1], r#"line 3: unknown hash scheme "$5$""#);
        assert_eq!(shown[2], "line 4: unknown hash scheme");
        assert!(!shown.iter().any(|s| s.contains("Secret")), "{shown:?}");
        assert_eq!(shown[3], "line 5: missing ':' between username and hash");
    }

    #[test]
    fn duplicate_after_error_is_still_detected_but_bad_first_line_is_not_a_duplicate() {
        // A line that failed to parse does not claim the username, so its fixed successor is not a "duplicate".
        let text = format!("user:$6$bad\n{MOSQ_6_USER}\n{MOSQ_6_USER}");
        let got = kinds(&text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, 1);
        assert_eq!(got[1], (3, PasswordFileErrorKind::DuplicateUser { username: "user".into(), first_line: 2 }));
    }

    #[test]
    fn set_remove_and_rewrite_round_trip() {
        let mut file = PasswordFile::parse(&format!("# kept? no\n{MOSQ_7_USER}\n{MOSQ_6_ALICE}\n")).unwrap();
        let fast = HashScheme::Pbkdf2Sha512 { iterations: 1 };

        // Replacing keeps the position; adding appends.
        file.set("user", "new-secret", HashScheme::Sha512).unwrap();
        file.set("zed", "zzz", fast).unwrap();
        assert_eq!(file.usernames().collect::<Vec<_>>(), ["user", "alice", "zed"]);
        assert_eq!(file.verify("user", b"secret"), PasswordCheck::Mismatch);
        assert_eq!(file.verify("user", b"new-secret"), PasswordCheck::Match);
        assert_eq!(file.verify("zed", b"zzz"), PasswordCheck::Match);

        let text = file.to_file_string();
        assert!(!text.contains('#'));
        assert!(text.contains(MOSQ_6_ALICE), "untouched line must be byte-identical");
        let reread = PasswordFile::parse(&text).unwrap();
        assert_eq!(reread.to_file_string(), text);
        assert_eq!(reread.verify("user", b"new-secret"), PasswordCheck::Match);
        assert_eq!(reread.verify("alice", "p@ss word:ü".as_bytes()), PasswordCheck::Match);

        assert!(file.remove("alice"));
        assert!(!file.remove("alice"));
        assert!(!file.contains("alice"));
        assert_eq!(file.len(), 2);
        // The index must have been rebuilt after the shift.
        assert_eq!(file.verify("zed", b"zzz"), PasswordCheck::Match);
        assert_eq!(file.verify("user", b"new-secret"), PasswordCheck::Match);
        assert_eq!(file.verify("alice", b"x"), PasswordCheck::UnknownUser);
        assert_eq!(file.usernames().collect::<Vec<_>>(), ["user", "zed"]);

        assert!(file.remove("user"));
        assert!(file.remove("zed"));
        assert!(file.is_empty());
        assert_eq!(file.to_file_string(), "");
    }

    #[test]
    fn set_rejects_bad_usernames() {
        let mut file = PasswordFile::new();
        let fast = HashScheme::Pbkdf2Sha512 { iterations: 1 };
        for bad in ["", "a:b", "a\nb", "a\rb", " lead", "trail ", "#hash", "tab\t"] {
            assert!(matches!(file.set(bad, "pw", fast), Err(SetError::InvalidUsername(_))), "{bad:?} accepted");
        }
        assert!(file.is_empty());
        file.set("in ner", "pw", fast).unwrap();
        file.set("ünï", "pw", fast).unwrap();
        let reread = PasswordFile::parse(&file.to_file_string()).unwrap();
        assert_eq!(reread.verify("in ner", b"pw"), PasswordCheck::Match);
        assert_eq!(reread.verify("ünï", b"pw"), PasswordCheck::Match);
    }

    #[test]
    fn debug_does_not_print_hashes() {
        let file = PasswordFile::parse(MOSQ_7_USER).unwrap();
        let shown = format!("{file:?}");
        assert!(shown.contains("user"));
        assert!(!shown.contains("BsXyw"), "{shown}");
    }

    proptest! {
        #[test]
        fn parse_and_verify_never_panic(text in ".{0,300}", user in ".{0,20}", pw in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(file) = PasswordFile::parse(&text) {
                let _ = file.verify(&user, &pw);
            }
        }

        #[test]
        fn hash_like_lines_never_panic(
            scheme in prop_oneof![Just("$6$"), Just("$7$"), Just("$argon2id$"), Just("$")],
            body in "[A-Za-z0-9+/=$,.:-]{0,120}",
        ) {
            // Parse only: a random but valid `$7$` line could carry a huge iteration count and make verify slow.
            let _ = PasswordFile::parse(&format!("u:{scheme}{body}"));
        }
    }
}
