//! Mosquitto-compatible ACL file.
//!
//! ```text
//! # anonymous clients (before any `user` line)
//! topic read public/#
//! user alice
//! topic readwrite alice/#
//! topic deny alice/secret
//! pattern write vehicle/%u/#
//! ```
//!
//! `topic` lines belong to the section they appear in (anonymous before the first `user` line, else that user);
//! `pattern` lines apply to every client wherever they appear, with `%u` replaced by the username and `%c` by the
//! client id. The access word defaults to `readwrite`.
//!
//! Substituted values are literals: a value that is missing, empty, or contains `+`, `#` or `/` makes the pattern not
//! apply at all, so a client can never widen a rule by choosing its client id or username. Matching is done level by
//! level on the parsed rule, never by pasting the value into a string and re-parsing it as a filter.

use std::borrow::Cow;
use std::collections::HashMap;

/// What a client wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive a message published on a topic name.
    Read,
    /// Publish to a topic name.
    Write,
    /// Subscribe with a topic filter, which may contain wildcards. For a shared subscription pass the filter without
    /// its `$share/<group>/` prefix: with the prefix it starts with a `$` level that no wildcard rule covers.
    Subscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclVerdict {
    Allow,
    Deny,
}

/// One problem found by [`AclFile::parse`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct AclFileError {
    /// 1-based line number.
    pub line: usize,
    pub kind: AclFileErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclFileErrorKind {
    #[error("unknown keyword {0:?} (expected topic, user or pattern)")]
    UnknownKeyword(String),
    #[error("bad access {0:?} (expected read, write, readwrite or deny)")]
    BadAccess(String),
    #[error("missing topic after {keyword:?}")]
    MissingTopic { keyword: &'static str },
    #[error("invalid topic filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: &'static str },
    #[error("\"user\" without a username")]
    MissingUsername,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuleAccess {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl RuleAccess {
    fn from_word(word: &str) -> Option<Self> {
        // Case-sensitive, as in Mosquitto.
        match word {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "readwrite" => Some(Self::ReadWrite),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }

    fn grants(self, access: Access) -> bool {
        match access {
            Access::Write => matches!(self, Self::Write | Self::ReadWrite),
            Access::Read | Access::Subscribe => matches!(self, Self::Read | Self::ReadWrite),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    SingleWild,
    MultiWild,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Username,
    ClientId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternLevel {
    Fixed(Level),
    /// A level containing `%u` and/or `%c`, possibly mixed with text (`dev-%c`).
    Template(Vec<Piece>),
}

#[derive(Debug, Clone)]
struct TopicRule {
    access: RuleAccess,
    levels: Vec<Level>,
}

#[derive(Debug, Clone)]
struct PatternRule {
    access: RuleAccess,
    levels: Vec<PatternLevel>,
}

/// A parsed ACL file. Authoritative: whatever no rule allows is denied, so an empty file denies everything.
#[derive(Debug, Clone, Default)]
pub struct AclFile {
    anonymous: Vec<TopicRule>,
    /// Several `user X` sections for the same X are merged, as Mosquitto does.
    users: HashMap<String, Vec<TopicRule>>,
    patterns: Vec<PatternRule>,
}

impl AclFile {
    /// Parses the file's text, reporting every bad line rather than stopping at the first.
    pub fn parse(text: &str) -> Result<AclFile, Vec<AclFileError>> {
        let mut acl = AclFile::default();
        let mut errors = Vec::new();
        // None = the anonymous section before the first `user` line.
        let mut section: Option<String> = None;

        for (line_no, line) in crate::content_lines(text) {
            let mut fail = |kind| errors.push(AclFileError { line: line_no, kind });
            let (keyword, rest) = split_word(line);
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        fail(AclFileErrorKind::MissingUsername);
                    } else {
                        acl.users.entry(rest.to_owned()).or_default();
                        section = Some(rest.to_owned());
                    }
                }
                "topic" => match parse_access_and_filter("topic", rest) {
                    Ok((access, filter)) => {
                        let rule = TopicRule { access, levels: filter.split('/').map(fixed_level).collect() };
                        match &section {
                            None => acl.anonymous.push(rule),
                            Some(user) => acl.users.entry(user.clone()).or_default().push(rule),
                        }
                    }
                    Err(kind) => fail(kind),
                },
                "pattern" => match parse_access_and_filter("pattern", rest) {
                    Ok((access, filter)) => acl
                        .patterns
                        .push(PatternRule { access, levels: filter.split('/').map(pattern_level).collect() }),
                    Err(kind) => fail(kind),
                },
                other => fail(AclFileErrorKind::UnknownKeyword(other.to_owned())),
            }
        }

        if errors.is_empty() { Ok(acl) } else { Err(errors) }
    }

    /// Decides whether `client_id` / `username` (None = anonymous) may perform `access` on `topic_or_filter`: a topic
    /// name for [`Access::Read`] and [`Access::Write`], a topic filter for [`Access::Subscribe`].
    ///
    /// A matching `deny` rule wins over any allow; otherwise some applicable rule must grant the access. For
    /// subscriptions "matching" means containment: every topic the filter can match must be matched by the rule.
    /// A malformed topic or filter is denied.
    pub fn check(&self, client_id: &str, username: Option<&str>, topic_or_filter: &str, access: Access) -> AclVerdict {
        let request = match access {
            Access::Read | Access::Write => {
                if validate_topic_name(topic_or_filter).is_err() {
                    return AclVerdict::Deny;
                }
                Request::Topic(topic_or_filter)
            }
            Access::Subscribe => {
                if validate_filter(topic_or_filter).is_err() {
                    return AclVerdict::Deny;
                }
                Request::Filter(topic_or_filter.split('/').map(view_of_str).collect())
            }
        };

        let topic_rules: &[TopicRule] = match username {
            None => &self.anonymous,
            Some(user) => self.users.get(user).map_or(&[], Vec::as_slice),
        };

        let mut allowed = false;
        for rule in topic_rules {
            match evaluate(rule.access, &rule.levels, &request, access) {
                Outcome::Deny => return AclVerdict::Deny,
                Outcome::Allow => allowed = true,
                Outcome::NoMatch => {}
            }
        }
        for rule in &self.patterns {
            let Some(levels) = resolve(&rule.levels, client_id, username) else {
                continue;
            };
            match evaluate(rule.access, &levels, &request, access) {
                Outcome::Deny => return AclVerdict::Deny,
                Outcome::Allow => allowed = true,
                Outcome::NoMatch => {}
            }
        }

        if allowed { AclVerdict::Allow } else { AclVerdict::Deny }
    }
}

enum Request<'a> {
    Topic(&'a str),
    Filter(Vec<View<'a>>),
}

enum Outcome {
    Allow,
    Deny,
    NoMatch,
}

fn evaluate<L: AsView>(rule_access: RuleAccess, levels: &[L], request: &Request<'_>, access: Access) -> Outcome {
    let deny = rule_access == RuleAccess::Deny;
    // Skip the match when the rule could not change the verdict either way.
    if !deny && !rule_access.grants(access) {
        return Outcome::NoMatch;
    }
    let hit = match request {
        Request::Topic(topic) => topic_matches(levels, topic),
        Request::Filter(filter) => filter_covered(levels, filter),
    };
    match (hit, deny) {
        (false, _) => Outcome::NoMatch,
        (true, true) => Outcome::Deny,
        (true, false) => Outcome::Allow,
    }
}

/// A borrowed view of one level, so stored rules and per-check substituted rules share the matching code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View<'a> {
    Literal(&'a str),
    SingleWild,
    MultiWild,
}

impl View<'_> {
    fn is_wildcard(self) -> bool {
        !matches!(self, View::Literal(_))
    }
}

trait AsView {
    fn view(&self) -> View<'_>;
}

impl AsView for Level {
    fn view(&self) -> View<'_> {
        match self {
            Level::Literal(s) => View::Literal(s),
            Level::SingleWild => View::SingleWild,
            Level::MultiWild => View::MultiWild,
        }
    }
}

impl AsView for View<'_> {
    fn view(&self) -> View<'_> {
        *self
    }
}

/// A pattern level after substitution; only levels that needed concatenation own their text.
enum Resolved<'a> {
    Literal(Cow<'a, str>),
    SingleWild,
    MultiWild,
}

impl AsView for Resolved<'_> {
    fn view(&self) -> View<'_> {
        match self {
            Resolved::Literal(s) => View::Literal(s),
            Resolved::SingleWild => View::SingleWild,
            Resolved::MultiWild => View::MultiWild,
        }
    }
}

fn view_of_str(level: &str) -> View<'_> {
    match level {
        "+" => View::SingleWild,
        "#" => View::MultiWild,
        other => View::Literal(other),
    }
}

/// MQTT topic-name matching against a rule filter.
fn topic_matches<L: AsView>(rule: &[L], topic: &str) -> bool {
    // MQTT-4.7.2-1: a filter starting with a wildcard must not match `$`-topics such as `$SYS/...`.
    if topic.starts_with('$') && rule.first().is_some_and(|l| l.view().is_wildcard()) {
        return false;
    }
    let mut levels = topic.split('/');
    for level in rule {
        match level.view() {
            // `#` also matches the parent level itself (`a/#` matches `a`).
            View::MultiWild => return true,
            View::SingleWild => {
                if levels.next().is_none() {
                    return false;
                }
            }
            View::Literal(lit) => {
                if levels.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

/// Whether every topic that `filter` can match is also matched by `rule` (filter containment).
fn filter_covered<L: AsView>(rule: &[L], filter: &[View<'_>]) -> bool {
    // Mirrors MQTT-4.7.2-1: a wildcard-first rule matches no `$`-topic, so it covers no `$`-filter.
    let dollar_filter = matches!(filter.first(), Some(View::Literal(f)) if f.starts_with('$'));
    if dollar_filter && rule.first().is_some_and(|l| l.view().is_wildcard()) {
        return false;
    }
    for (i, level) in rule.iter().enumerate() {
        let rule_level = level.view();
        if rule_level == View::MultiWild {
            return true;
        }
        let Some(&filter_level) = filter.get(i) else {
            // The filter matches topics shorter than any the rule matches.
            return false;
        };
        match (rule_level, filter_level) {
            (View::SingleWild, View::Literal(_) | View::SingleWild) => {}
            (View::SingleWild, View::MultiWild) => {
                // Only at the top level is `#` the same set as `+/#`: a topic has at least one level, so there is
                // no "zero levels" case. Deeper down `a/#` matches `a` while `a/+/#` does not.
                return i == 0 && rule.get(1).map(AsView::view) == Some(View::MultiWild);
            }
            (View::Literal(r), View::Literal(f)) if r == f => {}
            _ => return false,
        }
    }
    filter.len() == rule.len()
}

/// Substitutes `%u` / `%c`; None when the pattern must not apply to this client at all.
fn resolve<'a>(levels: &'a [PatternLevel], client_id: &'a str, username: Option<&'a str>) -> Option<Vec<Resolved<'a>>> {
    let value = |piece: &Piece| -> Option<&'a str> {
        let v = match piece {
            Piece::Username => username?,
            Piece::ClientId => client_id,
            Piece::Text(_) => return None,
        };
        // Any of these would turn the value into more than one level or into a wildcard.
        let literal = !v.is_empty() && !v.contains(['+', '#', '/']);
        literal.then_some(v)
    };

    let mut out = Vec::with_capacity(levels.len());
    for (i, level) in levels.iter().enumerate() {
        let resolved = match level {
            PatternLevel::Fixed(Level::Literal(s)) => Resolved::Literal(Cow::Borrowed(s.as_str())),
            PatternLevel::Fixed(Level::SingleWild) => Resolved::SingleWild,
            PatternLevel::Fixed(Level::MultiWild) => Resolved::MultiWild,
            PatternLevel::Template(pieces) => {
                let text = match pieces.as_slice() {
                    [only @ (Piece::Username | Piece::ClientId)] => Cow::Borrowed(value(only)?),
                    _ => {
                        let mut s = String::new();
                        for piece in pieces {
                            match piece {
                                Piece::Text(t) => s.push_str(t),
                                other => s.push_str(value(other)?),
                            }
                        }
                        Cow::Owned(s)
                    }
                };
                // A client-chosen value must not move the rule into the `$` namespace (client id `$SYS` with
                // pattern `%c/#` would otherwise reach `$SYS/#`). Text the admin wrote starting with `$` is fine.
                if i == 0 && text.starts_with('$') && !matches!(pieces.first(), Some(Piece::Text(_))) {
                    return None;
                }
                Resolved::Literal(text)
            }
        };
        out.push(resolved);
    }
    Some(out)
}

/// Splits off the first space/tab-separated word; the rest is returned with leading blanks removed.
fn split_word(s: &str) -> (&str, &str) {
    match s.split_once([' ', '\t']) {
        Some((word, rest)) => (word, rest.trim_start()),
        None => (s, ""),
    }
}

fn parse_access_and_filter<'a>(
    keyword: &'static str,
    rest: &'a str,
) -> Result<(RuleAccess, &'a str), AclFileErrorKind> {
    let (first, after) = split_word(rest);
    if first.is_empty() {
        return Err(AclFileErrorKind::MissingTopic { keyword });
    }
    let (access, filter) = if after.is_empty() {
        // Mosquitto would take a lone access word as the topic itself; that is almost always a forgotten topic.
        if RuleAccess::from_word(first).is_some() {
            return Err(AclFileErrorKind::MissingTopic { keyword });
        }
        (RuleAccess::ReadWrite, first)
    } else {
        // As in Mosquitto: with more than one word, the first must be the access (the topic may contain spaces).
        let access = RuleAccess::from_word(first).ok_or_else(|| AclFileErrorKind::BadAccess(first.to_owned()))?;
        (access, after)
    };
    validate_filter(filter).map_err(|reason| AclFileErrorKind::InvalidFilter { filter: filter.to_owned(), reason })?;
    Ok((access, filter))
}

fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("empty");
    }
    if filter.contains('\0') {
        return Err("contains a null character");
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err("'#' must be the whole last level");
        }
        if level.contains('+') && level != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

fn validate_topic_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("empty");
    }
    if topic.contains(['+', '#', '\0']) {
        return Err("wildcards and null characters are not allowed in a topic name");
    }
    Ok(())
}

fn fixed_level(level: &str) -> Level {
    match level {
        "+" => Level::SingleWild,
        "#" => Level::MultiWild,
        other => Level::Literal(other.to_owned()),
    }
}

fn pattern_level(level: &str) -> PatternLevel {
    if !level.contains("%u") && !level.contains("%c") {
        return PatternLevel::Fixed(fixed_level(level));
    }
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = level;
    while let Some(pos) = rest.find('%') {
        text.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let var = if let Some(r) = after.strip_prefix('u') {
            rest = r;
            Piece::Username
        } else if let Some(r) = after.strip_prefix('c') {
            rest = r;
            Piece::ClientId
        } else {
            // Any other `%` is ordinary text.
            text.push('%');
            rest = after;
            continue;
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(var);
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    PatternLevel::Template(pieces)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use AclVerdict::{Allow, Deny};
    use proptest::prelude::*;

    fn acl(text: &str) -> AclFile {
        AclFile::parse(text).unwrap()
    }

    /// (read, write, subscribe) verdicts for one client and topic, to keep tables short.
    fn rws(acl: &AclFile, client: &str, user: Option<&str>, topic: &str) -> (AclVerdict, AclVerdict, AclVerdict) {
        (
            acl.check(client, user, topic, Access::Read),
            acl.check(client, user, topic, Access::Write),
            acl.check(client, user, topic, Access::Subscribe),
        )
    }

    #[test]
    fn vin_pattern() {
        let a = acl("pattern vehicle/%u/#");
        let vin = Some("1J9RP1A36A1644345");
        assert_eq!(a.check("c", vin, "vehicle/1J9RP1A36A1644345/state", Access::Write), Allow);
        assert_eq!(a.check("c", vin, "vehicle/1J9RP1A36A1644345/state", Access::Read), Allow);
        assert_eq!(a.check("c", vin, "vehicle/1J9RP1A36A1644345", Access::Write), Allow);
        assert_eq!(a.check("c", vin, "vehicle/1J9RP1A36A1644345/#", Access::Subscribe), Allow);
        assert_eq!(rws(&a, "c", vin, "vehicle/OTHER/state"), (Deny, Deny, Deny));
        assert_eq!(a.check("c", vin, "vehicle/+/state", Access::Subscribe), Deny);
        assert_eq!(a.check("c", vin, "vehicle/#", Access::Subscribe), Deny);
        assert_eq!(a.check("c", vin, "#", Access::Subscribe), Deny);
        // Anonymous has no %u, so the pattern does not apply.
        assert_eq!(rws(&a, "c", None, "vehicle/1J9RP1A36A1644345/state"), (Deny, Deny, Deny));
    }

    #[test]
    fn hostile_usernames_gain_nothing() {
        let a = acl("pattern vehicle/%u/#\npattern readwrite %u\npattern read x/%u/y\npattern read p-%u-s/z");
        for user in ["a/b", "+", "#", "", "a+", "b#", "/", "a/+/#"] {
            let u = Some(user);
            for topic in [
                "vehicle/a/b/state",
                "vehicle/a/b",
                "vehicle/a",
                "vehicle//state",
                "vehicle/x",
                "a",
                "b",
                "a/b",
                "x/a/b/y",
                "x//y",
                "x/q/y",
                "p-a/b-s/z",
                "p--s/z",
                "p-a+-s/z",
            ] {
                assert_eq!(rws(&a, "c", u, topic), (Deny, Deny, Deny), "user {user:?} topic {topic:?}");
            }
            for filter in ["vehicle/+/#", "vehicle/#", "#", "+", "x/+/y", "x/#", "+/+", "p-+-s/z"] {
                assert_eq!(a.check("c", u, filter, Access::Subscribe), Deny, "user {user:?} filter {filter:?}");
            }
        }
    }

    #[test]
    fn hostile_client_ids_gain_nothing() {
        let a = acl("pattern clients/%c/#\npattern read in/%c");
        assert_eq!(a.check("dev1", None, "clients/dev1/x", Access::Write), Allow);
        assert_eq!(a.check("dev1", None, "in/dev1", Access::Read), Allow);
        for id in ["x/y", "+", "#", "", "x+"] {
            for topic in ["clients/x/y", "clients/x/y/z", "clients//a", "in/x/y", "in/", "clients/x/a"] {
                assert_eq!(rws(&a, id, None, topic), (Deny, Deny, Deny), "id {id:?} topic {topic:?}");
            }
            for filter in ["clients/+/#", "clients/#", "in/+", "in/#", "#"] {
                assert_eq!(a.check(id, None, filter, Access::Subscribe), Deny, "id {id:?} filter {filter:?}");
            }
        }
    }

    #[test]
    fn substitution_cannot_reach_dollar_topics() {
        let a = acl("pattern %c/#\npattern read $SYS/clients/%c");
        assert_eq!(a.check("dev", None, "dev/x", Access::Write), Allow);
        assert_eq!(rws(&a, "$SYS", None, "$SYS/broker/load"), (Deny, Deny, Deny));
        assert_eq!(a.check("$SYS", None, "$SYS/#", Access::Subscribe), Deny);
        // An admin-written `$` prefix is honoured.
        assert_eq!(a.check("dev", None, "$SYS/clients/dev", Access::Read), Allow);
        assert_eq!(a.check("dev", None, "$SYS/clients/other", Access::Read), Deny);
    }

    #[test]
    fn mixed_templates_and_stray_percent() {
        let a = acl("pattern read dev-%u-%c/data\npattern write raw/100%/%x/%u%%");
        let u = Some("alice");
        assert_eq!(a.check("c1", u, "dev-alice-c1/data", Access::Read), Allow);
        assert_eq!(a.check("c1", u, "dev-alice-c2/data", Access::Read), Deny);
        assert_eq!(a.check("c/1", u, "dev-alice-c/1/data", Access::Read), Deny);
        assert_eq!(a.check("c1", u, "raw/100%/%x/alice%%", Access::Write), Allow);
        assert_eq!(a.check("c1", None, "dev--c1/data", Access::Read), Deny);
    }

    #[test]
    fn percent_in_topic_lines_is_literal() {
        let a = acl("user alice\ntopic read users/%u");
        assert_eq!(a.check("c", Some("alice"), "users/alice", Access::Read), Deny);
        assert_eq!(a.check("c", Some("alice"), "users/%u", Access::Read), Allow);
    }

    #[test]
    fn leading_bom_is_ignored() {
        let a = acl("\u{feff}topic read a");
        assert_eq!(a.check("c", None, "a", Access::Read), Allow);
    }

    #[test]
    fn empty_file_denies_everything() {
        for text in ["", "\n\n", "# only a comment\n   \n\t# another"] {
            let a = acl(text);
            for user in [None, Some("alice"), Some("")] {
                for topic in ["a", "#", "$SYS/x", "a/b/c"] {
                    assert_eq!(rws(&a, "c", user, topic), (Deny, Deny, Deny));
                }
            }
        }
    }

    #[test]
    fn sections_scope_topic_rules() {
        let a = acl("\
topic read anon/#
user alice
topic alice/#
user bob smith
topic read bob/#
user alice
topic write alice2/#
pattern read all/#
");
        let alice = Some("alice");
        let bob = Some("bob smith");
        // Anonymous rules only for anonymous clients (not even an empty username).
        assert_eq!(a.check("c", None, "anon/x", Access::Read), Allow);
        assert_eq!(a.check("c", alice, "anon/x", Access::Read), Deny);
        assert_eq!(a.check("c", Some(""), "anon/x", Access::Read), Deny);
        // alice's two sections are merged; her first rule defaults to readwrite.
        assert_eq!(rws(&a, "c", alice, "alice/x"), (Allow, Allow, Allow));
        assert_eq!(rws(&a, "c", alice, "alice2/x"), (Deny, Allow, Deny));
        assert_eq!(rws(&a, "c", bob, "alice/x"), (Deny, Deny, Deny));
        assert_eq!(rws(&a, "c", None, "alice/x"), (Deny, Deny, Deny));
        // Usernames may contain spaces and are matched exactly.
        assert_eq!(rws(&a, "c", bob, "bob/x"), (Allow, Deny, Allow));
        assert_eq!(a.check("c", Some("bob"), "bob/x", Access::Read), Deny);
        assert_eq!(a.check("c", Some("Alice"), "alice/x", Access::Read), Deny);
        // Patterns apply to everyone, including anonymous, wherever they appear in the file.
        for user in [None, alice, bob, Some("zed"), Some("")] {
            assert_eq!(rws(&a, "c", user, "all/x"), (Allow, Deny, Allow));
        }
    }

    #[test]
    fn access_words() {
        let a = acl("topic read r\ntopic write w\ntopic readwrite rw\ntopic d\ntopic deny x");
        assert_eq!(rws(&a, "c", None, "r"), (Allow, Deny, Allow));
        assert_eq!(rws(&a, "c", None, "w"), (Deny, Allow, Deny));
        assert_eq!(rws(&a, "c", None, "rw"), (Allow, Allow, Allow));
        assert_eq!(rws(&a, "c", None, "d"), (Allow, Allow, Allow));
        assert_eq!(rws(&a, "c", None, "x"), (Deny, Deny, Deny));
    }

    #[test]
    fn deny_takes_precedence() {
        let a = acl("\
topic #
topic deny secret/#
topic deny test/nosubscribe
user alice
topic readwrite #
pattern deny private/%u/#
");
        assert_eq!(rws(&a, "c", None, "public/x"), (Allow, Allow, Allow));
        assert_eq!(rws(&a, "c", None, "secret"), (Deny, Deny, Deny));
        assert_eq!(rws(&a, "c", None, "secret/x/y"), (Deny, Deny, Deny));
        assert_eq!(a.check("c", None, "secret/+", Access::Subscribe), Deny);
        assert_eq!(rws(&a, "c", None, "test/nosubscribe"), (Deny, Deny, Deny));
        // Filters that only overlap a deny rule are allowed; delivery is still filtered by Read checks.
        assert_eq!(a.check("c", None, "#", Access::Subscribe), Allow);
        assert_eq!(a.check("c", None, "test/+", Access::Subscribe), Allow);
        assert_eq!(a.check("c", None, "secret2/#", Access::Subscribe), Allow);
        // A pattern deny beats a user's allow, regardless of order in the file.
        let alice = Some("alice");
        assert_eq!(rws(&a, "c", alice, "private/alice/x"), (Deny, Deny, Deny));
        assert_eq!(rws(&a, "c", alice, "private/bob/x"), (Allow, Allow, Allow));
        assert_eq!(rws(&a, "c", alice, "secret/x"), (Allow, Allow, Allow));
    }

    #[test]
    fn subscribe_containment() {
        let a = acl("topic read vehicle/ABC/#\ntopic read a/+\ntopic read x/+/#\ntopic read exact");
        let sub = |f: &str| a.check("c", None, f, Access::Subscribe);
        assert_eq!(sub("vehicle/+/state"), Deny);
        assert_eq!(sub("vehicle/ABC/state"), Allow);
        assert_eq!(sub("vehicle/ABC/#"), Allow);
        assert_eq!(sub("vehicle/ABC/+/+"), Allow);
        assert_eq!(sub("vehicle/ABC"), Allow);
        assert_eq!(sub("vehicle/#"), Deny);
        assert_eq!(sub("vehicle/+/#"), Deny);
        assert_eq!(sub("#"), Deny);
        assert_eq!(sub("a/b"), Allow);
        assert_eq!(sub("a/+"), Allow);
        assert_eq!(sub("a/#"), Deny);
        assert_eq!(sub("a"), Deny);
        assert_eq!(sub("a/b/c"), Deny);
        assert_eq!(sub("x/+/#"), Allow);
        assert_eq!(sub("x/y"), Allow);
        assert_eq!(sub("x/#"), Deny);
        assert_eq!(sub("x"), Deny);
        assert_eq!(sub("exact"), Allow);
        assert_eq!(sub("+"), Deny);
        assert_eq!(sub("exact/#"), Deny);

        let all = acl("topic read #");
        assert_eq!(all.check("c", None, "#", Access::Subscribe), Allow);
        assert_eq!(all.check("c", None, "+/+", Access::Subscribe), Allow);
        assert_eq!(all.check("c", None, "$SYS/#", Access::Subscribe), Deny);
        assert_eq!(all.check("c", None, "$SYS/x", Access::Subscribe), Deny);
        // At the top level `+/#` is the same set of topics as `#`.
        let plus_hash = acl("topic read +/#");
        assert_eq!(plus_hash.check("c", None, "#", Access::Subscribe), Allow);
        assert_eq!(plus_hash.check("c", None, "$SYS/#", Access::Subscribe), Deny);
    }

    #[test]
    fn topic_matching_rules() {
        let a = acl("topic read a/#\ntopic read +/b\ntopic read #\ntopic read $SYS/broker/#\ntopic read q/+/+");
        let read = |t: &str| a.check("c", None, t, Access::Read);
        assert_eq!(read("a"), Allow);
        assert_eq!(read("a/b/c"), Allow);
        assert_eq!(read("/"), Allow);
        assert_eq!(read("$SYS/x"), Deny);
        assert_eq!(read("$SYS/b"), Deny);
        assert_eq!(read("$other"), Deny);
        assert_eq!(read("$SYS/broker"), Allow);
        assert_eq!(read("$SYS/broker/load/1m"), Allow);

        let b = acl("topic read q/+/+\ntopic read /lead\ntopic read t/");
        let read = |t: &str| b.check("c", None, t, Access::Read);
        assert_eq!(read("q/1/2"), Allow);
        assert_eq!(read("q//"), Allow);
        assert_eq!(read("q/1"), Deny);
        assert_eq!(read("q/1/2/3"), Deny);
        assert_eq!(read("/lead"), Allow);
        assert_eq!(read("lead"), Deny);
        assert_eq!(read("t/"), Allow);
        assert_eq!(read("t"), Deny);
    }

    #[test]
    fn topics_may_contain_spaces() {
        let a = acl("  topic   read   my topic/with spaces  \n\ttopic\twrite\tx y");
        assert_eq!(a.check("c", None, "my topic/with spaces", Access::Read), Allow);
        assert_eq!(a.check("c", None, "x y", Access::Write), Allow);
        assert_eq!(a.check("c", None, "my", Access::Read), Deny);
    }

    #[test]
    fn malformed_requests_are_denied() {
        let a = acl("topic #");
        assert_eq!(a.check("c", None, "a/+", Access::Write), Deny);
        assert_eq!(a.check("c", None, "a/#", Access::Read), Deny);
        assert_eq!(a.check("c", None, "", Access::Write), Deny);
        assert_eq!(a.check("c", None, "", Access::Subscribe), Deny);
        assert_eq!(a.check("c", None, "a/#/b", Access::Subscribe), Deny);
        assert_eq!(a.check("c", None, "a+", Access::Subscribe), Deny);
        assert_eq!(a.check("c", None, "a\0b", Access::Write), Deny);
        assert_eq!(a.check("c", None, "a/b", Access::Write), Allow);
    }

    #[test]
    fn parse_errors_reported_all_at_once() {
        let text = "\
# fine
topic read ok/#
Topic read a
toppic read a
topic rw a/b
topic
topic read
pattern deny
topic a/#/b
pattern read a/b#
topic write +a/b
user
user   \t
topic my topic
pattern %u/#
";
        use AclFileErrorKind as K;
        let errs = AclFile::parse(text).unwrap_err();
        let got: Vec<(usize, K)> = errs.iter().map(|e| (e.line, e.kind.clone())).collect();
        let invalid = |filter: &str, reason| K::InvalidFilter { filter: filter.into(), reason };
        assert_eq!(
            got,
            vec![
                (3, K::UnknownKeyword("Topic".into())),
                (4, K::UnknownKeyword("toppic".into())),
                (5, K::BadAccess("rw".into())),
                (6, K::MissingTopic { keyword: "topic" }),
                (7, K::MissingTopic { keyword: "topic" }),
                (8, K::MissingTopic { keyword: "pattern" }),
                (9, invalid("a/#/b", "'#' must be the whole last level")),
                (10, invalid("a/b#", "'#' must be the whole last level")),
                (11, invalid("+a/b", "'+' must be a whole level")),
                (12, K::MissingUsername),
                (13, K::MissingUsername),
                (14, K::BadAccess("my".into())),
            ]
        );
        assert_eq!(errs[0].to_string(), r#"line 3: unknown keyword "Topic" (expected topic, user or pattern)"#);
        assert_eq!(errs[6].to_string(), r#"line 9: invalid topic filter "a/#/b": '#' must be the whole last level"#);
    }

    /// Every topic over a small alphabet, up to `max_levels` levels.
    fn all_paths(alphabet: &[&str], max_levels: usize) -> Vec<String> {
        let mut out: Vec<String> = alphabet.iter().map(|s| s.to_string()).collect();
        let mut frontier = out.clone();
        for _ in 1..max_levels {
            let next: Vec<String> =
                frontier.iter().flat_map(|p| alphabet.iter().map(move |l| format!("{p}/{l}"))).collect();
            out.extend(next.iter().cloned());
            frontier = next;
        }
        out
    }

    fn levels(s: &str) -> Vec<View<'_>> {
        s.split('/').map(view_of_str).collect()
    }

    /// Containment must agree exactly with its definition, checked by brute force: with a fresh literal (`z`) that
    /// no filter names and topics one level longer than any filter, this finite universe is a complete witness set.
    #[test]
    fn containment_agrees_with_brute_force() {
        let filters: Vec<String> =
            all_paths(&["a", "$s", "+", "#"], 3).into_iter().filter(|f| validate_filter(f).is_ok()).collect();
        let topics = all_paths(&["a", "z", "$s"], 4);
        let matched: Vec<Vec<bool>> =
            filters.iter().map(|f| topics.iter().map(|t| topic_matches(&levels(f), t)).collect()).collect();
        for (ri, rule) in filters.iter().enumerate() {
            for (fi, filter) in filters.iter().enumerate() {
                let expected = matched[fi].iter().zip(&matched[ri]).all(|(&f, &r)| !f || r);
                assert_eq!(filter_covered(&levels(rule), &levels(filter)), expected, "rule {rule:?} filter {filter:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn check_never_panics(
            text in "((topic|pattern|user|deny|read|write|readwrite|%u|%c|\\+|#|/|\\$|[a-z ]{0,3}|\n){0,12})",
            client in ".{0,8}",
            user in proptest::option::of(".{0,8}"),
            topic in "([a-z+#/$% ]|%u|%c){0,12}",
        ) {
            if let Ok(a) = AclFile::parse(&text) {
                for access in [Access::Read, Access::Write, Access::Subscribe] {
                    let _ = a.check(&client, user.as_deref(), &topic, access);
                }
            }
        }

        #[test]
        fn parse_and_check_never_panic_on_arbitrary_text(text in ".{0,200}", topic in ".{0,40}", client in ".{0,10}", user in proptest::option::of(".{0,10}")) {
            if let Ok(a) = AclFile::parse(&text) {
                for access in [Access::Read, Access::Write, Access::Subscribe] {
                    let _ = a.check(&client, user.as_deref(), &topic, access);
                }
            }
        }

        /// A substituted username can only ever grant access to topics containing it verbatim as one level.
        #[test]
        fn username_pattern_only_grants_its_own_level(user in "[a-z/+#$]{0,4}", topic in "[a-z/+#$]{1,10}") {
            let a = AclFile::parse("pattern read u/%u").unwrap();
            let verdict = a.check("c", Some(&user), &topic, Access::Subscribe);
            let literal = !user.is_empty() && !user.contains(['+', '#', '/']);
            if verdict == Allow {
                prop_assert!(literal);
                prop_assert_eq!(topic, format!("u/{user}"));
            }
        }
    }
}
