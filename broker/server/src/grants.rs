//! `tollgate grant`: time-boxed grants (a dealer tool may reach one VIN until a deadline) added, removed and
//! listed at runtime. Grants live in the grants file the vin-acl plugin reads (`[plugins.files] grants`, lines
//! `<who> <VIN> <until>`), so they persist across restarts; every change is appended to an audit log beside it,
//! and the running broker re-reads the file through its admin socket. Expired grants stop applying at their
//! deadline whatever the file says, and are dropped from the file at the next change.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One grant line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// A user name or client id.
    pub who: String,
    pub vin: String,
    /// Seconds since the Unix epoch.
    pub until: u64,
    pub reason: Option<String>,
}

impl std::fmt::Display for Grant {
    /// The grant as a line of the file: `<who> <VIN> <until>`, and `  # <reason>` when it has one.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} {} {}", self.who, self.vin, format_time(self.until))?;
        match &self.reason {
            Some(reason) => write!(formatter, "  # {reason}"),
            None => Ok(()),
        }
    }
}

/// A line of the file: a grant, or anything else (comments, blank lines), kept as written.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    Grant(Grant),
    Other(String),
}

/// The grants file, as read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrantsFile {
    lines: Vec<Line>,
}

/// What `add` or `remove` did to the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// An existing grant for the same (who, VIN) was replaced or removed.
    pub replaced: Option<Grant>,
    /// Expired grants dropped from the file on the way.
    pub expired: usize,
}

/// Whether `vin` is written like a VIN: 17 of `A-H J-N P R-Z 0-9` (I, O and Q never appear). The check digit and
/// the region rules are the plugin's to enforce.
pub fn vin_shaped(vin: &str) -> bool {
    vin.len() == 17 && vin.bytes().all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"IOQ".contains(&b)))
}

/// A grantee as the file can hold it: one word without `#`.
pub fn valid_who(who: &str) -> bool {
    !who.is_empty() && !who.contains('#') && !who.chars().any(char::is_whitespace)
}

/// An RFC 3339 time (`2026-11-22T15:00:00Z`), or a duration from `now` (`+2h`, `90m`, `1d`).
pub fn parse_until(text: &str, now: SystemTime) -> Result<u64, String> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let duration = humantime::parse_duration(text.trim_start_matches('+')).map_err(|_| {
                format!("{text:?} is neither a time (2026-11-22T15:00:00Z) nor a duration from now (+2h, 90m)")
            })?;
            now + duration
        }
    };
    Ok(at.duration_since(UNIX_EPOCH).map_err(|_| format!("{text:?} is before 1970"))?.as_secs())
}

fn format_time(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(seconds)).to_string()
}

/// Reads a grants time the way vin-acl does: RFC 3339 or whole Unix seconds.
fn read_time(text: &str) -> Option<u64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(seconds);
    }
    humantime::parse_rfc3339_weak(text).ok()?.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

impl GrantsFile {
    /// Parses the file; a grant line that vin-acl would refuse is an error naming its line, so the command
    /// never rewrites (and loses) something it did not understand.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = Vec::new();
        for (number, raw) in text.lines().enumerate() {
            let (entry, comment) = match raw.split_once('#') {
                Some((entry, comment)) => (entry.trim(), Some(comment.trim())),
                None => (raw.trim(), None),
            };
            if entry.is_empty() {
                lines.push(Line::Other(raw.to_owned()));
                continue;
            }
            let fields: Vec<&str> = entry.split_whitespace().collect();
            let [who, vin, until] = fields[..] else {
                return Err(format!("line {}: expected <who> <VIN> <until>, found {raw:?}", number + 1));
            };
            let until = read_time(until)
                .ok_or_else(|| format!("line {}: {until:?} is not YYYY-MM-DDTHH:MM:SSZ or Unix seconds", number + 1))?;
            let reason = comment.filter(|comment| !comment.is_empty()).map(str::to_owned);
            lines.push(Line::Grant(Grant { who: who.to_owned(), vin: vin.to_ascii_uppercase(), until, reason }));
        }
        Ok(Self { lines })
    }

    pub fn grants(&self) -> impl Iterator<Item = &Grant> {
        self.lines.iter().filter_map(|line| match line {
            Line::Grant(grant) => Some(grant),
            Line::Other(_) => None,
        })
    }

    fn drop_expired(&mut self, now: u64) -> usize {
        let before = self.lines.len();
        self.lines.retain(|line| !matches!(line, Line::Grant(grant) if grant.until <= now));
        before - self.lines.len()
    }

    fn take(&mut self, who: &str, vin: &str) -> Option<Grant> {
        let index =
            self.lines.iter().position(|line| matches!(line, Line::Grant(g) if g.who == who && g.vin == vin))?;
        match self.lines.remove(index) {
            Line::Grant(grant) => Some(grant),
            Line::Other(_) => None,
        }
    }

    /// Adds `grant`, replacing one for the same (who, VIN), and drops expired ones.
    pub fn add(&mut self, grant: Grant, now: u64) -> Result<Change, String> {
        if !valid_who(&grant.who) {
            return Err(format!("{:?} cannot be a grantee: one word, without '#'", grant.who));
        }
        if !vin_shaped(&grant.vin) {
            return Err(format!("{:?} is not a VIN: 17 characters of A-H, J-N, P, R-Z and 0-9", grant.vin));
        }
        if grant.until <= now {
            return Err(format!("until {} is not in the future", format_time(grant.until)));
        }
        if grant.reason.as_deref().is_some_and(|reason| reason.contains(['\n', '\r'])) {
            return Err("the reason must be one line".into());
        }
        let replaced = self.take(&grant.who, &grant.vin);
        let expired = self.drop_expired(now);
        self.lines.push(Line::Grant(grant));
        Ok(Change { replaced, expired })
    }

    /// Removes the grant for (who, VIN), and drops expired ones; `replaced` is `None` when there was none.
    pub fn remove(&mut self, who: &str, vin: &str, now: u64) -> Change {
        let replaced = self.take(who, &vin.to_ascii_uppercase());
        let expired = self.drop_expired(now);
        Change { replaced, expired }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            let _ = match line {
                Line::Other(text) => writeln!(out, "{text}"),
                Line::Grant(grant) => writeln!(out, "{grant}"),
            };
        }
        out
    }
}

/// Holds `<grants file>.lock` exclusively until dropped (advisory: other `tollgate grant` commands wait for it).
pub fn lock(path: &Path) -> Result<std::fs::File, String> {
    let lock_path = beside(path, ".lock");
    let fail = |error: std::io::Error| format!("{}: {error}", lock_path.display());
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(fail)?;
    file.lock().map_err(fail)?;
    Ok(file)
}

/// Reads the grants file (absent: no grants yet).
pub fn read(path: &Path) -> Result<GrantsFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => GrantsFile::parse(&text).map_err(|error| format!("{}: {error}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(GrantsFile::default()),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

/// Replaces the file in one step (a temporary file beside it, then a rename), so the broker never reads half of it.
pub fn write(path: &Path, file: &GrantsFile) -> Result<(), String> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let fail = |error: std::io::Error| format!("{}: {error}", path.display());
    let mut temporary = tempfile::NamedTempFile::new_in(directory).map_err(fail)?;
    temporary.write_all(file.render().as_bytes()).map_err(fail)?;
    temporary.as_file().sync_all().map_err(fail)?;
    temporary.persist(path).map_err(|error| fail(error.error))?;
    Ok(())
}

/// The audit log beside the grants file: `<grants file>.audit.log`.
pub fn audit_path(path: &Path) -> PathBuf {
    beside(path, ".audit.log")
}

/// `<path><suffix>`, in the same directory.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Appends one JSON line for a change: when, what, the grant, and the operating-system user who made it.
pub fn audit(path: &Path, action: &str, grant: &Grant, now: u64) -> Result<(), String> {
    let by = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_else(|_| "unknown".into());
    let record = serde_json::json!({
        "at": format_time(now),
        "action": action,
        "who": grant.who,
        "vin": grant.vin,
        "until": format_time(grant.until),
        "reason": grant.reason,
        "by": by,
    });
    let log = audit_path(path);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|error| format!("{}: {error}", log.display()))?;
    writeln!(file, "{record}").map_err(|error| format!("{}: {error}", log.display()))
}

pub fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const VIN: &str = "1M8GDM9AXKP042788";
    const NOW: u64 = 1_800_000_000;

    fn grant(who: &str, vin: &str, until: u64) -> Grant {
        Grant { who: who.into(), vin: vin.into(), until, reason: None }
    }

    #[test]
    fn comments_survive_and_grants_round_trip() {
        let text = "# work orders\n\ndealer-7 1m8gdm9axkp042788 2027-01-15T08:00:00Z  # WO-1\ntool-2 1G1BN53E6NW128495 1800003600\n";
        let file = GrantsFile::parse(text).unwrap();
        let grants: Vec<&Grant> = file.grants().collect();
        assert_eq!(grants.len(), 2);
        assert_eq!(grants[0].vin, VIN, "upper-cased as vin-acl does");
        assert_eq!(grants[0].reason.as_deref(), Some("WO-1"));
        assert_eq!(grants[1].until, 1_800_003_600);
        let rendered = file.render();
        assert!(rendered.starts_with("# work orders\n\ndealer-7 1M8GDM9AXKP042788 2027-01-15T08:00:00Z  # WO-1\n"));
        assert_eq!(GrantsFile::parse(&rendered).unwrap(), file);
    }

    #[test]
    fn a_line_vin_acl_would_refuse_stops_the_command() {
        let error = GrantsFile::parse("ok 1M8GDM9AXKP042788 1800003600\ntwo words\n").unwrap_err();
        assert!(error.starts_with("line 2:"), "{error}");
        let error = GrantsFile::parse("x 1M8GDM9AXKP042788 tomorrow\n").unwrap_err();
        assert!(error.contains("tomorrow"), "{error}");
    }

    #[test]
    fn add_replaces_the_same_pair_and_drops_expired_grants() {
        let mut file = GrantsFile::default();
        file.add(grant("dealer-7", VIN, NOW + 60), NOW).unwrap();
        file.add(grant("old", VIN, NOW + 10), NOW).unwrap();
        let change = file.add(grant("dealer-7", VIN, NOW + 3600), NOW + 20).unwrap();
        assert_eq!(change.replaced, Some(grant("dealer-7", VIN, NOW + 60)));
        assert_eq!(change.expired, 1);
        assert_eq!(file.grants().cloned().collect::<Vec<_>>(), vec![grant("dealer-7", VIN, NOW + 3600)]);
        let change = file.remove("dealer-7", &VIN.to_lowercase(), NOW);
        assert!(change.replaced.is_some());
        assert_eq!(file.grants().count(), 0);
        assert_eq!(file.remove("dealer-7", VIN, NOW).replaced, None);
    }

    #[test]
    fn bad_grants_are_refused_with_the_reason() {
        let mut file = GrantsFile::default();
        for (bad, expected) in [
            (grant("two words", VIN, NOW + 1), "grantee"),
            (grant("a#b", VIN, NOW + 1), "grantee"),
            (grant("", VIN, NOW + 1), "grantee"),
            (grant("d", "1M8GDM9AXKP04278", NOW + 1), "not a VIN"),
            (grant("d", "1M8GDM9AXKP04278O", NOW + 1), "not a VIN"),
            (grant("d", VIN, NOW), "not in the future"),
        ] {
            let error = file.add(bad, NOW).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let mut multi_line = grant("d", VIN, NOW + 1);
        multi_line.reason = Some("a\nb".into());
        assert!(file.add(multi_line, NOW).is_err());
    }

    #[test]
    fn until_is_a_time_or_a_duration_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(NOW);
        assert_eq!(parse_until("+2h", now), Ok(NOW + 7200));
        assert_eq!(parse_until("90m", now), Ok(NOW + 5400));
        assert_eq!(parse_until("2027-01-15T08:00:00Z", now), Ok(NOW));
        assert!(parse_until("soon", now).unwrap_err().contains("soon"));
    }

    #[test]
    fn writes_replace_the_file_and_audits_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.txt");
        let mut file = read(&path).unwrap();
        let added = grant("dealer-7", VIN, NOW + 60);
        file.add(added.clone(), NOW).unwrap();
        write(&path, &file).unwrap();
        audit(&path, "add", &added, NOW).unwrap();
        audit(&path, "remove", &added, NOW + 1).unwrap();
        assert_eq!(read(&path).unwrap(), file);
        let log = std::fs::read_to_string(audit_path(&path)).unwrap();
        let records: Vec<serde_json::Value> = log.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["action"], "add");
        assert_eq!(records[1]["vin"], VIN);
    }
}
