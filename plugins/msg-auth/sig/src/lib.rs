//! The msg-auth signed-message format, version 1.
//!
//! A signature covers an unambiguous byte string (every field length-prefixed, see [`canonical`]) and travels as
//! one header, `v1;alg=hs256;kid=…;sub=…;iss=…;ts=…;ctr=…;nonce=…;exp=…;mac=…` ([`Signature`]): in the MQTT 5 user
//! property [`PROPERTY`], or, where user properties cannot travel (MQTT 3.1.1), in front of the payload as
//! `x-sig:<header>\n<payload>` ([`split_envelope`]). QoS, DUP, packet ids, the message expiry interval and topic
//! aliases are not covered: brokers legitimately change them. `exp` is an absolute time inside the signature.
//!
//! This crate holds no keys unless built with the `keys` feature ([`keys`]), which backends use to sign and
//! verify with the key in hand; the broker plugin leaves keys to the broker's host-side HMAC.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The MQTT 5 user property that carries the header.
pub const PROPERTY: &str = "x-sig";
/// Set by the plugin's `tag` failure mode, and stripped from what clients send.
pub const STATUS_PROPERTY: &str = "x-sig-status";
/// The user property a re-signing broker keeps the signature it verified in (`resign_chain`), for the record:
/// the message is checked against `x-sig` only.
pub const PREVIOUS_PROPERTY: &str = "x-sig-prev";
/// Starts a MQTT 3.1.1 envelope.
pub const ENVELOPE_PREFIX: &[u8] = b"x-sig:";
/// The domain separator at the start of the signed input.
pub const DOMAIN: &[u8] = b"MQTT-SIG-v1";
/// Tags shorter than this are refused (128 bits).
pub const MIN_MAC_BYTES: usize = 16;

/// The MAC algorithm, named in the header and signed as the input's second field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// HMAC-SHA256 (RFC 2104), tags of 16 to 32 bytes (leftmost bytes when truncated).
    #[default]
    Hs256,
    /// AES-128-CMAC (RFC 4493), 16-byte tags: what SecOC ECUs and SHE/HSM key slots compute.
    CmacAes128,
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "hs256",
            Self::CmacAes128 => "cmac-aes128",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Hs256, Self::CmacAes128].into_iter().find(|alg| alg.name() == name)
    }

    /// The longest tag the algorithm produces.
    pub fn max_mac_bytes(self) -> usize {
        match self {
            Self::Hs256 => 32,
            Self::CmacAes128 => 16,
        }
    }
}

/// The fields of a message a signature covers, besides those in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Covered<'a> {
    pub topic: &'a str,
    pub retain: bool,
    pub content_type: Option<&'a str>,
    pub correlation_data: Option<&'a [u8]>,
    pub response_topic: Option<&'a str>,
    pub payload: &'a [u8],
}

/// A parsed `x-sig` header. Absent numbers are 0, absent names empty: they are signed that way too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Signature {
    pub alg: Algorithm,
    pub kid: String,
    /// The identity the message speaks for (a VIN).
    pub sub: String,
    /// Who signed: a site or broker id.
    pub iss: String,
    /// Milliseconds since the Unix epoch when signed.
    pub ts: u64,
    /// The signer's counter, strictly increasing per (kid, sub).
    pub ctr: u64,
    /// A value the signer never repeats (for signers without a persistent counter, such as replicated backends);
    /// empty when absent.
    pub nonce: String,
    /// Milliseconds since the Unix epoch after which the message is void; 0 for never.
    pub exp: u64,
    pub mac: Vec<u8>,
    /// Which optional fields the header carried, for `require` checks.
    pub present: Present,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Present {
    pub sub: bool,
    pub iss: bool,
    pub ts: bool,
    pub ctr: bool,
    pub nonce: bool,
    pub exp: bool,
}

/// Why a header or envelope could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

fn push_field(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// The bytes the MAC is computed over:
/// `DOMAIN | alg | kid | topic | sub | iss | ts | ctr | nonce | exp | retain | content_type | correlation_data |
/// response_topic | payload`, each as a u32 big-endian length and its bytes (numbers as 8 bytes big-endian,
/// retain as one byte, an absent option as an empty field).
pub fn canonical(signature: &Signature, message: &Covered<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + message.topic.len() + message.payload.len());
    push_field(&mut out, DOMAIN);
    push_field(&mut out, signature.alg.name().as_bytes());
    push_field(&mut out, signature.kid.as_bytes());
    push_field(&mut out, message.topic.as_bytes());
    push_field(&mut out, signature.sub.as_bytes());
    push_field(&mut out, signature.iss.as_bytes());
    push_field(&mut out, &signature.ts.to_be_bytes());
    push_field(&mut out, &signature.ctr.to_be_bytes());
    push_field(&mut out, signature.nonce.as_bytes());
    push_field(&mut out, &signature.exp.to_be_bytes());
    push_field(&mut out, &[u8::from(message.retain)]);
    push_field(&mut out, message.content_type.unwrap_or("").as_bytes());
    push_field(&mut out, message.correlation_data.unwrap_or(&[]));
    push_field(&mut out, message.response_topic.unwrap_or("").as_bytes());
    push_field(&mut out, message.payload);
    out
}

/// Names in a header (kid, sub, iss) are restricted so the header needs no escaping.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

impl Signature {
    /// The header, `mac` included.
    pub fn header(&self) -> String {
        let mut header = format!("v1;alg={};kid={}", self.alg.name(), self.kid);
        if !self.sub.is_empty() {
            header.push_str(&format!(";sub={}", self.sub));
        }
        if !self.iss.is_empty() {
            header.push_str(&format!(";iss={}", self.iss));
        }
        // A counter of 0 is never valid, so a signer without one (a nonce instead) leaves it out.
        if self.ts != 0 || self.present.ts {
            header.push_str(&format!(";ts={}", self.ts));
        }
        if self.ctr != 0 || self.present.ctr {
            header.push_str(&format!(";ctr={}", self.ctr));
        }
        if !self.nonce.is_empty() {
            header.push_str(&format!(";nonce={}", self.nonce));
        }
        if self.exp != 0 {
            header.push_str(&format!(";exp={}", self.exp));
        }
        header.push_str(";mac=");
        header.push_str(&URL_SAFE_NO_PAD.encode(&self.mac));
        header
    }

    /// Reads a header strictly: version 1, a known algorithm, known keys once each, `kid` and `mac` present, a
    /// tag as long as the algorithm allows.
    pub fn parse(header: &str) -> Result<Signature, Malformed> {
        let bad = |why: String| Malformed(why);
        let mut parts = split_at_byte(header, b';');
        if parts.next() != Some("v1") {
            return Err(bad("not a version 1 signature".into()));
        }
        let mut signature = Signature::default();
        let (mut kid, mut mac, mut alg) = (false, false, false);
        // Fields met so far, one bit each in FIELDS order (a set without allocating, on every message).
        let mut seen = 0u16;
        for part in parts {
            let (key, value) = split_at_byte(part, b'=')
                .next()
                .and_then(|key| Some((key, part.get(key.len() + 1..)?)))
                .ok_or_else(|| bad(format!("{part:?} is not key=value")))?;
            let field =
                FIELDS.iter().position(|&field| field == key).ok_or_else(|| bad(format!("unknown field {key:?}")))?;
            if seen & 1 << field != 0 {
                return Err(bad(format!("{key} appears twice")));
            }
            seen |= 1 << field;
            let number = |value: &str| {
                if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("{key} is not a number")));
                }
                value.parse::<u64>().map_err(|_| bad(format!("{key} is out of range")))
            };
            let name = |value: &str| {
                if valid_name(value) && !value.is_empty() {
                    Ok(value.to_owned())
                } else {
                    Err(bad(format!("{key} has characters outside [A-Za-z0-9._:-]")))
                }
            };
            match key {
                "alg" => {
                    signature.alg = Algorithm::from_name(value)
                        .ok_or_else(|| bad(format!("algorithm {value:?} is not supported")))?;
                    alg = true;
                }
                "kid" => {
                    signature.kid = name(value)?;
                    kid = true;
                }
                "sub" => {
                    signature.sub = name(value)?;
                    signature.present.sub = true;
                }
                "iss" => {
                    signature.iss = name(value)?;
                    signature.present.iss = true;
                }
                "ts" => {
                    signature.ts = number(value)?;
                    signature.present.ts = true;
                }
                "ctr" => {
                    signature.ctr = number(value)?;
                    signature.present.ctr = true;
                }
                "nonce" => {
                    signature.nonce = name(value)?;
                    signature.present.nonce = true;
                }
                "exp" => {
                    signature.exp = number(value)?;
                    signature.present.exp = true;
                }
                "mac" => {
                    signature.mac = URL_SAFE_NO_PAD.decode(value).map_err(|_| bad("mac is not base64url".into()))?;
                    mac = true;
                }
                other => return Err(bad(format!("unknown field {other:?}"))),
            }
        }
        if !alg || !kid || !mac {
            return Err(bad("alg, kid and mac are required".into()));
        }
        let longest = signature.alg.max_mac_bytes();
        if !(MIN_MAC_BYTES..=longest).contains(&signature.mac.len()) {
            return Err(bad(format!(
                "mac is {} bytes; {} takes {MIN_MAC_BYTES} to {longest}",
                signature.mac.len(),
                signature.alg.name()
            )));
        }
        Ok(signature)
    }
}

/// `text.split(sep)` for an ASCII separator, by a plain byte loop: `str::split` searches with `memchr`, whose
/// set-up costs more than the search in a header of a few short fields, on every message a plugin verifies.
fn split_at_byte(text: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let current = rest?;
        match current.bytes().position(|byte| byte == sep) {
            // An ASCII byte is never inside a multi-byte character, so both sides are whole UTF-8.
            Some(at) => {
                rest = current.get(at + 1..);
                current.get(..at)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// The header fields [`Signature::parse`] knows.
const FIELDS: [&str; 9] = ["alg", "kid", "sub", "iss", "ts", "ctr", "nonce", "exp", "mac"];

/// Splits an MQTT 3.1.1 envelope into its header and the original payload; `None` if the payload is not one.
pub fn split_envelope(payload: &[u8]) -> Option<Result<(Signature, &[u8]), Malformed>> {
    let rest = payload.strip_prefix(ENVELOPE_PREFIX)?;
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return Some(Err(Malformed("the envelope header has no end of line".into())));
    };
    let parsed = std::str::from_utf8(&rest[..end])
        .map_err(|_| Malformed("the envelope header is not UTF-8".into()))
        .and_then(Signature::parse)
        .map(|signature| (signature, &rest[end + 1..]));
    Some(parsed)
}

/// The signature a message carries and the payload it covers: the `x-sig` header when the message has one
/// (an MQTT 5 user property), otherwise an envelope at the start of the payload. `Ok(None)`: unsigned.
pub fn carried<'a>(header: Option<&str>, payload: &'a [u8]) -> Result<Option<(Signature, &'a [u8])>, Malformed> {
    match header {
        Some(header) => Signature::parse(header).map(|signature| Some((signature, payload))),
        None => split_envelope(payload).transpose(),
    }
}

/// Wraps a payload in an envelope carrying `signature`.
pub fn envelope(signature: &Signature, payload: &[u8]) -> Vec<u8> {
    let header = signature.header();
    let mut out = Vec::with_capacity(ENVELOPE_PREFIX.len() + header.len() + 1 + payload.len());
    out.extend_from_slice(ENVELOPE_PREFIX);
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Fills `${sub}` in a key-derivation template (`vin-mac-v1:${sub}`).
pub fn derive_info(template: &str, sub: &str) -> Vec<u8> {
    template.replace("${sub}", sub).into_bytes()
}

/// Signing and verification with the key in hand, for backends and the `tollgate sig` command.
#[cfg(feature = "keys")]
pub mod keys {
    use cmac::Cmac;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    use super::{Algorithm, Covered, Signature, canonical};

    /// The MAC key for `alg`: the secret itself, or its HKDF-SHA256 derivation (no salt) with `info`, 32 bytes for
    /// HMAC and 16 for AES-128-CMAC.
    pub fn mac_key(alg: Algorithm, secret: &[u8], derive_info: Option<&[u8]>) -> Vec<u8> {
        match derive_info {
            None => secret.to_vec(),
            Some(info) => {
                let mut key = vec![0; if alg == Algorithm::CmacAes128 { 16 } else { 32 }];
                // 16 and 32 bytes are valid HKDF-SHA256 output lengths.
                let _ = hkdf::Hkdf::<Sha256>::new(None, secret).expand(info, &mut key);
                key
            }
        }
    }

    /// The full tag over `data`; `Err` when the key does not fit the algorithm (AES-128 needs 16 bytes).
    pub fn tag(alg: Algorithm, key: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
        match alg {
            Algorithm::Hs256 => {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|error| error.to_string())?;
                mac.update(data);
                Ok(mac.finalize().into_bytes().to_vec())
            }
            Algorithm::CmacAes128 => {
                let mut mac = <Cmac<aes::Aes128> as Mac>::new_from_slice(key)
                    .map_err(|_| format!("cmac-aes128 takes a 16-byte key, not {} bytes", key.len()))?;
                mac.update(data);
                Ok(mac.finalize().into_bytes().to_vec())
            }
        }
    }

    /// Sets `signature.mac` with `signature.alg` (the full tag, or its `mac_len` leftmost bytes).
    pub fn sign(key: &[u8], signature: &mut Signature, message: &Covered<'_>, mac_len: usize) -> Result<(), String> {
        let tag = tag(signature.alg, key, &canonical(signature, message))?;
        signature.mac = tag[..mac_len.clamp(super::MIN_MAC_BYTES, tag.len())].to_vec();
        Ok(())
    }

    /// Constant-time check of `signature.mac` with `signature.alg`.
    pub fn verify(key: &[u8], signature: &Signature, message: &Covered<'_>) -> bool {
        if signature.mac.len() < super::MIN_MAC_BYTES {
            return false;
        }
        let data = canonical(signature, message);
        match signature.alg {
            Algorithm::Hs256 => <Hmac<Sha256> as Mac>::new_from_slice(key)
                .map(|mac| mac.chain_update(&data).verify_truncated_left(&signature.mac).is_ok())
                .unwrap_or(false),
            Algorithm::CmacAes128 => <Cmac<aes::Aes128> as Mac>::new_from_slice(key)
                .map(|mac| mac.chain_update(&data).verify_truncated_left(&signature.mac).is_ok())
                .unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Signature {
        Signature {
            alg: Algorithm::Hs256,
            kid: "site-2025-06".into(),
            sub: "1M8GDM9AXKP042788".into(),
            iss: "site-0042".into(),
            ts: 1_767_225_600_000,
            ctr: 7,
            nonce: String::new(),
            exp: 0,
            mac: vec![0xAB; 32],
            present: Present { sub: true, iss: true, ts: true, ctr: true, nonce: false, exp: false },
        }
    }

    #[test]
    fn splitting_at_a_byte_is_str_split() {
        for text in ["", ";", "a", "a;", ";a", "a;;b", "v1;kid=é;mac=x", "ü;;ß;", "=;=="] {
            for sep in [b';', b'='] {
                let ours: Vec<&str> = split_at_byte(text, sep).collect();
                let std: Vec<&str> = text.split(char::from(sep)).collect();
                assert_eq!(ours, std, "{text:?} at {:?}", char::from(sep));
            }
        }
    }

    #[test]
    fn header_round_trips() {
        let signature = sample();
        let header = signature.header();
        assert!(header.starts_with("v1;alg=hs256;kid=site-2025-06;sub=1M8GDM9AXKP042788;iss=site-0042;ts="));
        assert_eq!(Signature::parse(&header), Ok(signature));
        let with_nonce = Signature {
            alg: Algorithm::CmacAes128,
            nonce: "Jq0-x7_2".into(),
            mac: vec![1; 16],
            present: Present { nonce: true, ..sample().present },
            ..sample()
        };
        let header = with_nonce.header();
        assert!(header.starts_with("v1;alg=cmac-aes128;kid="), "{header}");
        assert!(header.contains(";ctr=7;nonce=Jq0-x7_2;mac="), "{header}");
        assert_eq!(Signature::parse(&header), Ok(with_nonce));
    }

    #[test]
    fn headers_are_read_strictly() {
        let good = sample().header();
        for bad in [
            "v2;alg=hs256;kid=a;mac=q6urq6urq6urq6urq6urqw".to_owned(),
            good.replace("alg=hs256", "alg=none"),
            good.replace(";kid=site-2025-06", ""),
            good.replace(";ctr=7", ";ctr=7;ctr=8"),
            good.replace(";ctr=7", ";ctr=-1"),
            good.replace(";ctr=7", ";ctr=99999999999999999999"),
            good.replace(";ctr=7", ";ctr=7;nonce="),
            good.replace(";ctr=7", ";ctr=7;nonce=a/b"),
            good.replace(";ctr=7", ";ctr=7;salt=1"),
            // A CMAC tag is 16 bytes; the sample's 32-byte tag is too long for it.
            good.replace("alg=hs256", "alg=cmac-aes128"),
            good.replace("sub=1M8GDM9AXKP042788", "sub=a/b"),
            format!("{good}x"),
            good.split(";mac=").next().unwrap_or_default().to_owned() + ";mac=AAAA",
        ] {
            assert!(Signature::parse(&bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn canonical_form_is_unambiguous() {
        let signature = sample();
        let message = Covered { topic: "a/b", payload: b"c", ..Covered::default() };
        // Moving a byte between two adjacent fields changes the input.
        let shifted = Covered { topic: "a/bc", payload: b"", ..Covered::default() };
        assert_ne!(canonical(&signature, &message), canonical(&signature, &shifted));
        // An absent option and an empty one sign the same (both are empty on the wire in MQTT 5).
        let with_empty = Covered { content_type: Some(""), ..message };
        assert_eq!(canonical(&signature, &message), canonical(&signature, &with_empty));
        let retained = Covered { retain: true, ..message };
        assert_ne!(canonical(&signature, &message), canonical(&signature, &retained));
    }

    #[test]
    fn canonical_vector() {
        // Published test vector (README): these exact bytes are what version 1 signs.
        let signature = Signature { kid: "k1".into(), sub: "S".into(), ts: 1, ctr: 2, ..Signature::default() };
        let message = Covered { topic: "t", payload: b"p", ..Covered::default() };
        let expected = concat!(
            "0000000b4d5154542d5349472d7631", // "MQTT-SIG-v1"
            "000000056873323536",             // "hs256"
            "000000026b31",                   // kid "k1"
            "0000000174",                     // topic "t"
            "0000000153",                     // sub "S"
            "00000000",                       // iss ""
            "000000080000000000000001",       // ts 1
            "000000080000000000000002",       // ctr 2
            "00000000",                       // nonce ""
            "000000080000000000000000",       // exp 0
            "0000000100",                     // retain 0
            "00000000",                       // content type
            "00000000",                       // correlation data
            "00000000",                       // response topic
            "0000000170",                     // payload "p"
        );
        let hex: String = canonical(&signature, &message).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, expected);
    }

    #[test]
    fn envelopes_wrap_and_unwrap() {
        let signature = sample();
        let wrapped = envelope(&signature, b"{\"a\":1}\nline two");
        let (parsed, payload) = split_envelope(&wrapped).expect("an envelope").expect("well formed");
        assert_eq!((parsed, payload), (signature, &b"{\"a\":1}\nline two"[..]));
        assert!(split_envelope(b"plain").is_none());
        assert!(matches!(split_envelope(b"x-sig:v1;alg=hs256"), Some(Err(_))));
    }

    #[test]
    fn a_header_wins_over_the_payload_and_unsigned_is_none() {
        let signature = sample();
        let wrapped = envelope(&signature, b"inner");
        // With a header the whole payload is covered, even one that looks like an envelope.
        assert_eq!(carried(Some(&signature.header()), &wrapped), Ok(Some((signature.clone(), &wrapped[..]))));
        assert_eq!(carried(None, &wrapped), Ok(Some((signature, &b"inner"[..]))));
        assert_eq!(carried(None, b"plain"), Ok(None));
        assert!(carried(Some("v1;alg=none"), b"plain").is_err());
    }

    #[cfg(feature = "keys")]
    #[test]
    fn sign_then_verify_and_tamper() {
        let key =
            keys::mac_key(Algorithm::Hs256, b"master", Some(&derive_info("vin-mac-v1:${sub}", "1M8GDM9AXKP042788")));
        let mut signature = sample();
        let message =
            Covered { topic: "v1/vehicles/1M8GDM9AXKP042788/cmd/x/req", payload: b"unlock", ..Covered::default() };
        keys::sign(&key, &mut signature, &message, 32).expect("signed");
        assert!(keys::verify(&key, &signature, &message));
        let tampered = Covered { payload: b"unlocK", ..message };
        assert!(!keys::verify(&key, &signature, &tampered));
        let other =
            keys::mac_key(Algorithm::Hs256, b"master", Some(&derive_info("vin-mac-v1:${sub}", "1J9RP1A36A1644345")));
        assert!(!keys::verify(&other, &signature, &message));
        let mut renonced = signature.clone();
        renonced.nonce = "n2".into();
        assert!(!keys::verify(&key, &renonced, &message), "the nonce is signed");
    }

    #[cfg(feature = "keys")]
    #[test]
    fn cmac_follows_rfc4493_and_signs_16_bytes() {
        let hex = |text: &str| -> Vec<u8> {
            (0..text.len()).step_by(2).map(|at| u8::from_str_radix(&text[at..at + 2], 16).unwrap_or(0)).collect()
        };
        // RFC 4493 section 4, example 2 (one 16-byte block).
        let key = hex("2b7e151628aed2a6abf7158809cf4f3c");
        let tag = keys::tag(Algorithm::CmacAes128, &key, &hex("6bc1bee22e409f96e93d7e117393172a"));
        assert_eq!(tag, Ok(hex("070a16b46b4d4144f79bdd9dd04a287c")));
        assert!(keys::tag(Algorithm::CmacAes128, b"short", b"x").is_err());

        let mut signature = Signature { alg: Algorithm::CmacAes128, ..sample() };
        let message =
            Covered { topic: "v1/vehicles/1M8GDM9AXKP042788/cmd/x/req", payload: b"go", ..Covered::default() };
        keys::sign(&key, &mut signature, &message, 32).expect("signed");
        assert_eq!(signature.mac.len(), 16);
        assert!(keys::verify(&key, &signature, &message));
        assert_eq!(Signature::parse(&signature.header()).as_ref(), Ok(&signature));
        // The algorithm is signed: the same tag does not pass as another algorithm's.
        let relabelled = Signature { alg: Algorithm::Hs256, ..signature.clone() };
        assert!(!keys::verify(&key, &relabelled, &message));
        assert_eq!(keys::mac_key(Algorithm::CmacAes128, b"master", Some(b"info")).len(), 16);
    }
}
