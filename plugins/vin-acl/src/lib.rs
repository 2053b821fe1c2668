//! `vin-acl`: a car reaches only its own VIN's topics. The identity comes from the car's verified client
//! certificate (never from a user name), is validated as a VIN (syntax, regional check digit, model year), bound
//! to the client id, and substituted as a literal into `${vin}` rule templates. Backends and tools get roles by
//! certificate OU or user name. See README.md for the configuration and what is not done yet.

pub mod rules;
pub mod vin;

use tollgate_sdk::prelude::*;

use crate::rules::{Operation, Template};
use crate::vin::{CheckDigitMode, VinPolicy};

/// Where the identity is read from, first match wins.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    /// A SAN URI with this prefix; the rest is the VIN (`urn:vin:`).
    SanUri(String),
    SubjectSerialNumber,
    CommonName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientIdPolicy {
    /// The client id is the VIN.
    Equal,
    /// The client id is `<VIN>-<suffix>` with a suffix of 1–16 `[A-Za-z0-9_-]`.
    Prefix,
    Any,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Principal {
    Vehicle,
    Role(String),
    /// A non-VIN identity (end-of-line station, test rig) of this namespace; `${id}` binds its identity.
    Namespace(String),
}

/// Certificates whose identity is not a VIN but matches `pattern` (anchored at both ends) belong to `name`.
#[derive(Clone, Debug)]
struct Namespace {
    name: String,
    pattern: regex_lite::Regex,
}

#[derive(Clone, Debug)]
struct Rule {
    id: String,
    who: Principal,
    publish: bool,
    subscribe: bool,
    topics: Vec<Template>,
    max_qos: Option<Qos>,
    /// `scope = "granted"`: `${vin}` is only a VIN the client holds a live grant for.
    granted: bool,
}

/// A time-boxed grant: `who` (user name or client id) may reach `vin` through `scope = "granted"` rules until
/// `until_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Grant {
    who: String,
    vin: String,
    until_ms: u64,
}

/// Milliseconds since the Unix epoch for `YYYY-MM-DDTHH:MM:SSZ` (UTC only) or a plain number of seconds.
fn parse_time(text: &str) -> Option<u64> {
    if let Ok(seconds) = text.parse::<u64>() {
        return seconds.checked_mul(1000);
    }
    tollgate_sdk::time::rfc3339_ms(text)
}

/// The refusal (0x87, counted and logged) of a CONNECT whose identity is on the revocation list.
fn refuse_revoked(info: &ConnectInfo, identity: &str) -> ConnectDecision {
    host::counter_add("identity_revoked", 1);
    host::security_event(
        host::LogLevel::Warn,
        "identity_revoked",
        &[("client_id", &info.client_id), ("identity", identity)],
    );
    ConnectDecision::Deny(DenyReason::NotAuthorized)
}

/// A certificate serial as the broker reports it: lower-case hex without separators.
fn normalize_serial(serial: &str) -> String {
    serial
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect::<String>()
        .trim_start_matches('0')
        .to_owned()
}

#[derive(Clone, Debug)]
enum RoleMatch {
    CertificateOu(String),
    Username(String),
}

#[derive(Clone, Debug)]
struct Role {
    name: String,
    matcher: RoleMatch,
}

pub struct VinAcl {
    sources: Vec<Source>,
    namespaces: Vec<Namespace>,
    /// `allow_token_identity`: the client attribute (set by an authentication plugin that verified a token)
    /// that may carry a car's VIN when its certificate does not.
    token_claim: Option<String>,
    /// `deny_retained_commands`: a retained message on a topic with a `cmd` level is refused, from anyone. A
    /// retained command would be replayed to the car at every reconnect and subscription.
    deny_retained_commands: bool,
    /// `case = "upper"`: lower-case VINs are accepted and upper-cased.
    upper_case: bool,
    client_id_policy: ClientIdPolicy,
    policy: VinPolicy,
    rules: Vec<Rule>,
    roles: Vec<Role>,
    revoked_vins: std::collections::HashSet<String>,
    revoked_serials: std::collections::HashSet<String>,
    /// Non-VIN identities (`id:<identity>` lines), e.g. an end-of-line station's.
    revoked_ids: std::collections::HashSet<String>,
    grants: Vec<Grant>,
    /// The `grants_active` gauge as this instance last set it, so a connect sets it only when a grant ran out.
    grants_active: std::cell::Cell<i64>,
}

/// Attribute names this plugin attaches at CONNECT. `vin` is for other plugins (msg-auth binds it); this plugin
/// itself trusts only its own `vin-acl.vin`, so a `vin` attribute another authenticator attached is never taken
/// for a verified identity unless `allow_token_identity` says so.
const VIN_ATTRIBUTE: &str = "vin";
const VERIFIED_VIN_ATTRIBUTE: &str = "vin-acl.vin";
const ROLE_ATTRIBUTE: &str = "vin-acl.role";
/// What `revoked` and `files.revoked` list.
struct Revocations {
    vins: std::collections::HashSet<String>,
    serials: std::collections::HashSet<String>,
    ids: std::collections::HashSet<String>,
}

const NAMESPACE_ATTRIBUTE: &str = "vin-acl.namespace";
const ID_ATTRIBUTE: &str = "vin-acl.id";

/// Longest non-VIN identity accepted; it becomes a topic level.
const MAX_ID_LEN: usize = 64;

fn parse_qos(value: &str) -> Result<Qos, String> {
    match value {
        "0" => Ok(Qos::AtMostOnce),
        "1" => Ok(Qos::AtLeastOnce),
        "2" => Ok(Qos::ExactlyOnce),
        other => Err(format!("max_qos {other:?} is not 0, 1 or 2")),
    }
}

fn qos_level(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

impl VinAcl {
    fn parse_rules(config: &Config, namespaces: &[Namespace]) -> Result<Vec<Rule>, String> {
        let mut rules = Vec::new();
        for index in config.table_indices("rules") {
            let key = |name: &str| format!("rules.{index}.{name}");
            let id = config.get(&key("id")).unwrap_or("").to_owned();
            let name = if id.is_empty() { format!("rules[{index}]") } else { id.clone() };
            let who = match config.get(&key("who")).unwrap_or("vehicle") {
                "vehicle" => Principal::Vehicle,
                other => match other.strip_prefix("role:") {
                    Some(role) if !role.is_empty() => Principal::Role(role.to_owned()),
                    _ if namespaces.iter().any(|namespace| namespace.name == other) => {
                        Principal::Namespace(other.to_owned())
                    }
                    _ => {
                        return Err(format!(
                            "{name}: who {other:?} is not \"vehicle\", \"role:<name>\" or a non_vin_identities namespace"
                        ));
                    }
                },
            };
            let mut publish = false;
            let mut subscribe = false;
            for operation in config.list(&key("allow")) {
                match operation {
                    "publish" => publish = true,
                    "subscribe" => subscribe = true,
                    other => return Err(format!("{name}: allow {other:?} is not publish or subscribe")),
                }
            }
            if !publish && !subscribe {
                return Err(format!("{name}: allow lists nothing (publish, subscribe)"));
            }
            let topics = config
                .list(&key("topics"))
                .into_iter()
                .map(|topic| Template::parse(topic).map_err(|error| format!("{name}: {error}")))
                .collect::<Result<Vec<_>, _>>()?;
            if topics.is_empty() {
                return Err(format!("{name}: no topics"));
            }
            if who == Principal::Vehicle && topics.iter().any(|topic| !topic.uses_vin()) {
                return Err(format!("{name}: every vehicle topic must contain ${{vin}}, or cars would share it"));
            }
            let max_qos = config.get(&key("max_qos")).map(parse_qos).transpose().map_err(|e| format!("{name}: {e}"))?;
            let granted = match config.get(&key("scope")).unwrap_or("any") {
                "any" => false,
                "granted" if matches!(who, Principal::Role(_)) && topics.iter().all(Template::uses_vin) => true,
                "granted" => {
                    return Err(format!("{name}: scope \"granted\" is for role rules whose every topic has ${{vin}}"));
                }
                other => return Err(format!("{name}: scope {other:?} is not \"any\" or \"granted\"")),
            };
            rules.push(Rule { id: name, who, publish, subscribe, topics, max_qos, granted });
        }
        Ok(rules)
    }

    /// `non_vin_identities.N.{pattern,namespace}`.
    fn parse_namespaces(config: &Config) -> Result<Vec<Namespace>, String> {
        let mut namespaces = Vec::new();
        for index in config.table_indices("non_vin_identities") {
            let key = |name: &str| format!("non_vin_identities.{index}.{name}");
            let name = config.require(&key("namespace"))?.to_owned();
            if name == "vehicle" || name.starts_with("role:") || name.is_empty() {
                return Err(format!("{}: {name:?} cannot name a namespace", key("namespace")));
            }
            let text = config.require(&key("pattern"))?;
            let pattern = regex_lite::Regex::new(&format!("^(?:{text})$"))
                .map_err(|error| format!("{}: {text:?} is not a regular expression: {error}", key("pattern")))?;
            namespaces.push(Namespace { name, pattern });
        }
        Ok(namespaces)
    }

    /// The namespace of a certificate identity that is not a VIN, if one claims it. The identity becomes a
    /// topic level, so it must be one: no `/`, wildcards or NUL, whatever the pattern allows.
    fn namespace_of(&self, identity: &str) -> Option<&Namespace> {
        if identity.is_empty() || identity.len() > MAX_ID_LEN || identity.contains(['/', '+', '#', '\0']) {
            return None;
        }
        self.namespaces.iter().find(|namespace| namespace.pattern.is_match(identity))
    }

    /// A VIN carried by a verified token (`allow_token_identity`): validated like a certificate's on every use,
    /// since this plugin did not see the CONNECT that brought it.
    fn token_vin(&self, client: &Client, vin: &str) -> Result<(), String> {
        self.policy.validate(vin).map_err(|error| error.to_string())?;
        if self.revoked_vins.contains(vin) {
            return Err("revoked".to_owned());
        }
        if !self.client_id_ok(&client.client_id, vin) {
            return Err("client id does not match".to_owned());
        }
        Ok(())
    }

    /// The refusal (0x85, counted and logged) of a client id that `client_id_policy` does not allow for
    /// `identity`, which also keeps one certificate from taking over another client's session.
    fn check_client_id(&self, info: &ConnectInfo, identity: &str) -> Option<ConnectDecision> {
        if self.client_id_ok(&info.client_id, identity) {
            return None;
        }
        host::counter_add("clientid_mismatch", 1);
        host::security_event(
            host::LogLevel::Warn,
            "clientid_mismatch",
            &[("client_id", &info.client_id), ("identity", identity)],
        );
        Some(ConnectDecision::Deny(DenyReason::ClientIdentifierNotValid))
    }

    /// CONNECT of a certificate whose identity is in a non-VIN namespace (its serial was checked already).
    fn admit_non_vin(&self, info: &ConnectInfo, identity: String) -> ConnectDecision {
        let Some(namespace) = self.namespace_of(&identity) else {
            return ConnectDecision::Deny(DenyReason::NotAuthorized);
        };
        if self.revoked_ids.contains(&identity) {
            return refuse_revoked(info, &identity);
        }
        if let Some(refusal) = self.check_client_id(info, &identity) {
            return refusal;
        }
        host::counter_add("non_vin_connected", 1);
        ConnectDecision::Allow(vec![
            (NAMESPACE_ATTRIBUTE.to_owned(), namespace.name.clone()),
            (ID_ATTRIBUTE.to_owned(), identity),
        ])
    }

    fn parse_roles(config: &Config) -> Result<Vec<Role>, String> {
        let mut roles = Vec::new();
        for index in config.table_indices("roles") {
            let name = config.require(&format!("roles.{index}.name"))?.to_owned();
            let spec = config.require(&format!("roles.{index}.match"))?;
            let matcher = if let Some(ou) = spec.strip_prefix("cert.ou=") {
                RoleMatch::CertificateOu(ou.to_owned())
            } else if let Some(user) = spec.strip_prefix("username=") {
                RoleMatch::Username(user.to_owned())
            } else {
                return Err(format!("roles.{index}.match {spec:?}: expected cert.ou=<OU> or username=<name>"));
            };
            roles.push(Role { name, matcher });
        }
        Ok(roles)
    }

    /// Revoked VINs, certificate serials and non-VIN identities: `revoked.N` in the configuration, and the lines
    /// of the file the broker reads as `files.revoked` (a VIN, `serial:<hex>` or `id:<identity>` per line, `#`
    /// comments).
    fn parse_revocations(config: &Config) -> Result<Revocations, String> {
        let mut vins = std::collections::HashSet::new();
        let mut serials = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        let file = config.get("files.revoked").unwrap_or("");
        let lines = config.list("revoked").into_iter().chain(file.lines());
        for line in lines {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            if let Some(id) = entry.strip_prefix("id:") {
                if id.is_empty() || id.chars().any(char::is_whitespace) {
                    return Err(format!("revoked: {entry:?} has no identity"));
                }
                ids.insert(id.to_owned());
                continue;
            }
            match entry.strip_prefix("serial:") {
                Some(serial) if !normalize_serial(serial).is_empty() => {
                    serials.insert(normalize_serial(serial));
                }
                Some(_) => return Err(format!("revoked: {entry:?} has no serial")),
                None if entry.len() == 17 && entry.chars().all(|c| c.is_ascii_alphanumeric()) => {
                    vins.insert(entry.to_ascii_uppercase());
                }
                None => {
                    return Err(format!(
                        "revoked: {entry:?} is neither a 17-character VIN, serial:<hex> nor id:<identity>"
                    ));
                }
            }
        }
        Ok(Revocations { vins, serials, ids })
    }

    /// `grants.N.{who,vin,until}` and the lines `<who> <VIN> <until>` of `files.grants`.
    fn parse_grants(config: &Config) -> Result<Vec<Grant>, String> {
        let mut grants = Vec::new();
        let mut add = |who: &str, vin: &str, until: &str, origin: &str| -> Result<(), String> {
            let until_ms = parse_time(until)
                .ok_or_else(|| format!("{origin}: until {until:?} is not YYYY-MM-DDTHH:MM:SSZ or Unix seconds"))?;
            if vin.len() != 17 || !vin.chars().all(|c| c.is_ascii_alphanumeric()) || who.is_empty() {
                return Err(format!("{origin}: a grant is <who> <17-character VIN> <until>"));
            }
            grants.push(Grant { who: who.to_owned(), vin: vin.to_ascii_uppercase(), until_ms });
            Ok(())
        };
        for index in config.table_indices("grants") {
            let field = |name: &str| config.require(&format!("grants.{index}.{name}"));
            add(field("who")?, field("vin")?, field("until")?, &format!("grants.{index}"))?;
        }
        for (number, line) in config.get("files.grants").unwrap_or("").lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let fields: Vec<&str> = entry.split_whitespace().collect();
            let [who, vin, until] = fields[..] else {
                return Err(format!("grants file line {}: expected <who> <VIN> <until>", number + 1));
            };
            add(who, vin, until, &format!("grants file line {}", number + 1))?;
        }
        Ok(grants)
    }

    fn revoked(&self, vin: Option<&str>) -> bool {
        vin.is_some_and(|vin| self.revoked_vins.contains(vin))
            || host::client_attribute("cert.serial")
                .is_some_and(|serial| self.revoked_serials.contains(&normalize_serial(&serial)))
    }

    /// The VIN claimed by the certificate, from the first source that has one.
    fn identity(&self, peer: &PeerCertificate) -> Option<String> {
        self.sources.iter().find_map(|source| match source {
            Source::SanUri(prefix) => {
                peer.san_uris.iter().find_map(|uri| uri.strip_prefix(prefix.as_str()).map(str::to_owned))
            }
            Source::SubjectSerialNumber => peer.subject_serial_number.clone(),
            Source::CommonName => peer.common_name.clone(),
        })
    }

    fn client_id_ok(&self, client_id: &str, vin: &str) -> bool {
        // With `case = "upper"` the VIN part of the client id may be in either case, like the certificate's.
        let is_vin = |text: &str| if self.upper_case { text.eq_ignore_ascii_case(vin) } else { text == vin };
        match self.client_id_policy {
            ClientIdPolicy::Any => true,
            ClientIdPolicy::Equal => is_vin(client_id),
            ClientIdPolicy::Prefix => {
                is_vin(client_id)
                    || client_id.split_at_checked(vin.len()).is_some_and(|(head, rest)| {
                        is_vin(head)
                            && rest.strip_prefix('-').is_some_and(|suffix| {
                                (1..=16).contains(&suffix.len())
                                    && suffix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                            })
                    })
            }
        }
    }

    /// `case = "upper"`: an identity that is a VIN once upper-cased is taken upper-cased (some certificate
    /// authorities issue lower-case VINs); anything else stays as it is, for the non-VIN patterns.
    fn normalized(&self, identity: String) -> String {
        if self.upper_case && identity.bytes().any(|byte| byte.is_ascii_lowercase()) {
            let upper = identity.to_ascii_uppercase();
            if self.policy.validate(&upper).is_ok() {
                return upper;
            }
        }
        identity
    }

    /// The VIN a verified token claims (`allow_token_identity`), normalized as a certificate's would be; not yet
    /// validated. Both authorization and the session recheck read the claim through this.
    fn claimed_vin(&self) -> Option<String> {
        let claim = self.token_claim.as_deref()?;
        host::client_attribute(claim).map(|claimed| self.normalized(claimed))
    }

    /// Who the client is for authorization: its VIN or non-VIN identity (set at CONNECT by this plugin), a VIN
    /// from a verified token (if allowed), or a role.
    fn principal(&self, client: &Client) -> Option<(Principal, Option<String>)> {
        if let Some(vin) = host::client_attribute(VERIFIED_VIN_ATTRIBUTE) {
            return Some((Principal::Vehicle, Some(vin)));
        }
        if let Some(namespace) = host::client_attribute(NAMESPACE_ATTRIBUTE) {
            return Some((Principal::Namespace(namespace), Some(host::client_attribute(ID_ATTRIBUTE)?)));
        }
        if let Some(role) = host::client_attribute(ROLE_ATTRIBUTE) {
            return Some((Principal::Role(role), None));
        }
        if let Some(vin) = self.claimed_vin() {
            return match self.token_vin(client, &vin) {
                Ok(()) => Some((Principal::Vehicle, Some(vin))),
                Err(reason) => {
                    host::security_event(
                        host::LogLevel::Warn,
                        "identity_invalid",
                        &[
                            ("client_id", &client.client_id),
                            ("identity", &vin),
                            ("source", "token"),
                            ("reason", &reason),
                        ],
                    );
                    None
                }
            };
        }
        let username = client.username.as_deref()?;
        self.roles.iter().find_map(|role| match &role.matcher {
            RoleMatch::Username(name) if name == username => Some((Principal::Role(role.name.clone()), None)),
            _ => None,
        })
    }

    fn decide(&self, client: &Client, operation: Operation, topic: &str, qos: Qos) -> AclDecision {
        self.decide_as(&self.principal(client), client, operation, topic, qos)
    }

    /// [`VinAcl::decide`] for a principal already looked up: a burst's requests share their client's.
    fn decide_as(
        &self,
        principal: &Option<(Principal, Option<String>)>,
        client: &Client,
        operation: Operation,
        topic: &str,
        qos: Qos,
    ) -> AclDecision {
        let Some((principal, vin)) = principal else {
            host::counter_add("denied_no_identity", 1);
            return AclDecision::Deny(DenyReason::NotAuthorized);
        };
        for rule in self.rules.iter().filter(|rule| rule.who == *principal) {
            let allowed = match operation {
                Operation::Publish => rule.publish,
                Operation::Subscribe => rule.subscribe,
            };
            if !allowed {
                continue;
            }
            let check = |template: &Template, vin: Option<&str>| match operation {
                Operation::Publish => template.matches_topic(topic, vin),
                Operation::Subscribe => template.contains_filter(topic, vin),
            };
            let hit = if rule.granted {
                let now = host::now_ms();
                let holder = [Some(client.client_id.as_str()), client.username.as_deref()];
                self.grants
                    .iter()
                    .filter(|grant| grant.until_ms > now && holder.contains(&Some(grant.who.as_str())))
                    .any(|grant| rule.topics.iter().any(|template| check(template, Some(&grant.vin))))
            } else {
                rule.topics.iter().any(|template| check(template, vin.as_deref()))
            };
            if hit {
                return match rule.max_qos {
                    Some(max) if qos_level(qos) > qos_level(max) => AclDecision::AllowMaxQos(max),
                    _ => AclDecision::Allow,
                };
            }
        }
        host::counter_add("denied", 1);
        let identity = vin.clone().unwrap_or_else(|| format!("{principal:?}"));
        let event = if operation == Operation::Publish { "publish_denied" } else { "subscribe_denied" };
        host::security_event(
            host::LogLevel::Info,
            event,
            &[("client_id", &client.client_id), ("identity", &identity), ("topic", topic)],
        );
        AclDecision::Deny(DenyReason::NotAuthorized)
    }
}

impl VinAcl {
    /// The `grants_active` gauge: grants whose deadline is still ahead. Set at start and re-read at each connect,
    /// where a host call is paid only when a grant has run out since.
    fn update_grants_active(&self) {
        if self.grants.is_empty() && self.grants_active.get() == 0 {
            return;
        }
        let now = host::now_ms();
        let active = self.grants.iter().filter(|grant| grant.until_ms > now).count();
        let active = i64::try_from(active).unwrap_or(i64::MAX);
        if self.grants_active.replace(active) != active {
            host::gauge_set("grants_active", active);
        }
    }

    /// A retained command (a `cmd` level) when `deny_retained_commands` is on: refused, and told as an event.
    fn refuses_retained_command(&self, client: &Client, topic: &str, retain: bool) -> bool {
        if !(retain && self.deny_retained_commands && topic.split('/').any(|level| level == "cmd")) {
            return false;
        }
        host::counter_add("denied_retained_command", 1);
        host::security_event(
            host::LogLevel::Info,
            "retained_command_denied",
            &[("client_id", &client.client_id), ("topic", topic)],
        );
        true
    }
}

/// Whether the current client carries an identity vin-acl bound at CONNECT (not a role, not a token claim: those
/// are other plugins' or the broker's).
fn has_bound_identity() -> bool {
    host::client_attribute(VERIFIED_VIN_ATTRIBUTE).is_some() || host::client_attribute(NAMESPACE_ATTRIBUTE).is_some()
}

impl Plugin for VinAcl {
    const NAME: &'static str = "vin-acl";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const HOOKS: &'static [Hook] = &[Hook::Authenticate, Hook::Authorize, Hook::Session];

    fn init(config: Config) -> Result<Self, String> {
        let mut sources = Vec::new();
        let configured = config.list("identity_sources");
        let spelled = if configured.is_empty() {
            vec!["cert.san-uri:urn:vin:", "cert.subject-serial-number", "cert.common-name"]
        } else {
            configured
        };
        for source in spelled {
            sources.push(match source {
                "cert.subject-serial-number" => Source::SubjectSerialNumber,
                "cert.common-name" => Source::CommonName,
                other => match other.strip_prefix("cert.san-uri:") {
                    Some(prefix) if !prefix.is_empty() => Source::SanUri(prefix.to_owned()),
                    _ => {
                        return Err(format!(
                            "identity_sources: {other:?} is not cert.san-uri:<prefix>, cert.subject-serial-number or cert.common-name"
                        ));
                    }
                },
            });
        }
        let client_id_policy = match config.get("client_id_policy").unwrap_or("equal") {
            "equal" => ClientIdPolicy::Equal,
            "prefix" => ClientIdPolicy::Prefix,
            "any" => ClientIdPolicy::Any,
            other => return Err(format!("client_id_policy {other:?}: expected equal, prefix or any")),
        };
        let mut policy = VinPolicy {
            check_digit: CheckDigitMode::parse(config.get("check_digit").unwrap_or("regional"))?,
            ..VinPolicy::default()
        };
        let wmi = config.list("check_digit_wmi");
        if !wmi.is_empty() {
            policy.check_digit_wmi = wmi.iter().filter_map(|text| text.chars().next()).collect();
        }
        match config.get("model_year_check").unwrap_or("warn") {
            "strict" => policy.model_year_strict = true,
            "warn" => {}
            "off" => policy.model_year_check = false,
            other => return Err(format!("model_year_check {other:?}: expected strict, warn or off")),
        }
        let namespaces = Self::parse_namespaces(&config)?;
        let rules = Self::parse_rules(&config, &namespaces)?;
        if rules.is_empty() {
            return Err("no rules: an empty rule set would deny every client everything".to_owned());
        }
        let roles = Self::parse_roles(&config)?;
        for rule in &rules {
            if let Principal::Role(name) = &rule.who
                && !roles.iter().any(|role| &role.name == name)
            {
                return Err(format!("{}: role {name:?} is not defined under roles", rule.id));
            }
        }
        let Revocations { vins: revoked_vins, serials: revoked_serials, ids: revoked_ids } =
            Self::parse_revocations(&config)?;
        let grants = Self::parse_grants(&config)?;
        let token_claim = config
            .bool("allow_token_identity", false)?
            .then(|| config.get("token_claim").unwrap_or(VIN_ATTRIBUTE).to_owned());
        let deny_retained_commands = config.bool("deny_retained_commands", false)?;
        let upper_case = match config.get("case").unwrap_or("strict") {
            "strict" => false,
            "upper" => true,
            other => return Err(format!("case {other:?}: expected strict or upper")),
        };
        Ok(VinAcl {
            sources,
            namespaces,
            token_claim,
            deny_retained_commands,
            upper_case,
            client_id_policy,
            policy,
            rules,
            roles,
            revoked_vins,
            revoked_serials,
            revoked_ids,
            grants,
            grants_active: std::cell::Cell::new(-1),
        })
        .inspect(|acl| {
            let revoked = acl.revoked_vins.len() + acl.revoked_serials.len() + acl.revoked_ids.len();
            host::gauge_set("revoked", i64::try_from(revoked).unwrap_or(i64::MAX));
            host::gauge_set("grants", i64::try_from(acl.grants.len()).unwrap_or(i64::MAX));
            acl.update_grants_active();
        })
    }

    /// `identities_active`: connections with an identity this plugin bound at CONNECT (a VIN, or a non-VIN
    /// identity in its namespace), up at each one accepted and down at its end, whichever instance hears it.
    fn on_connected(&self, _client: &Client) {
        if has_bound_identity() {
            host::gauge_add("identities_active", 1);
        }
    }

    fn on_disconnected(&self, _client: &Client, _cause: DisconnectCause) {
        if has_bound_identity() {
            host::gauge_add("identities_active", -1);
        }
    }

    fn on_connect(&self, info: &ConnectInfo) -> ConnectDecision {
        self.update_grants_active();
        let Some(peer) = &info.peer else {
            // No certificate: not a car. A role by user name is decided by the authenticators after this one.
            return ConnectDecision::Ignore;
        };
        if self.revoked_serials.contains(&normalize_serial(&peer.serial)) {
            host::counter_add("identity_revoked", 1);
            host::security_event(
                host::LogLevel::Warn,
                "identity_revoked",
                &[("client_id", &info.client_id), ("serial", &peer.serial)],
            );
            return ConnectDecision::Deny(DenyReason::NotAuthorized);
        }
        for role in &self.roles {
            if let RoleMatch::CertificateOu(ou) = &role.matcher
                && peer.organizational_units.iter().any(|unit| unit == ou)
            {
                return ConnectDecision::Allow(vec![(ROLE_ATTRIBUTE.to_owned(), role.name.clone())]);
            }
        }
        let Some(vin) = self.identity(peer).map(|identity| self.normalized(identity)) else {
            host::counter_add("identity_missing", 1);
            host::security_event(
                host::LogLevel::Warn,
                "identity_invalid",
                &[("client_id", &info.client_id), ("reason", "no identity in the certificate")],
            );
            return ConnectDecision::Deny(DenyReason::NotAuthorized);
        };
        match self.policy.validate(&vin) {
            Err(_) if self.namespace_of(&vin).is_some() => return self.admit_non_vin(info, vin),
            Err(error) => {
                host::counter_add("identity_invalid", 1);
                host::security_event(
                    host::LogLevel::Warn,
                    "identity_invalid",
                    &[("client_id", &info.client_id), ("identity", &vin), ("reason", &error.to_string())],
                );
                return ConnectDecision::Deny(DenyReason::NotAuthorized);
            }
            Ok(warnings) => {
                for warning in warnings.0 {
                    host::security_event(
                        host::LogLevel::Warn,
                        "identity_warning",
                        &[("identity", &vin), ("reason", &warning.to_string())],
                    );
                }
            }
        }
        if self.revoked_vins.contains(&vin) {
            return refuse_revoked(info, &vin);
        }
        if let Some(refusal) = self.check_client_id(info, &vin) {
            return refusal;
        }
        host::counter_add("vehicles_connected", 1);
        ConnectDecision::Allow(vec![(VIN_ATTRIBUTE.to_owned(), vin.clone()), (VERIFIED_VIN_ATTRIBUTE.to_owned(), vin)])
    }

    /// A reload with a new revocation list, or a periodic recheck, ends the sessions of revoked cars and
    /// certificates; their subscriptions go with them, and expired grants lose theirs through the subscribe recheck.
    fn authorize_session(&self, client: &Client) -> AclDecision {
        let vin = host::client_attribute(VERIFIED_VIN_ATTRIBUTE).or_else(|| {
            let other_principal = host::client_attribute(NAMESPACE_ATTRIBUTE).is_some()
                || host::client_attribute(ROLE_ATTRIBUTE).is_some();
            if other_principal { None } else { self.claimed_vin() }
        });
        let revoked_id = host::client_attribute(ID_ATTRIBUTE).filter(|id| self.revoked_ids.contains(id));
        if self.revoked(vin.as_deref()) || revoked_id.is_some() {
            let vin = vin.or(revoked_id);
            host::counter_add("sessions_revoked", 1);
            host::security_event(
                host::LogLevel::Warn,
                "session_revoked",
                &[("client_id", &client.client_id), ("identity", vin.as_deref().unwrap_or(""))],
            );
            return AclDecision::Deny(DenyReason::NotAuthorized);
        }
        AclDecision::Ignore
    }

    fn authorize_publish(
        &self,
        client: &Client,
        topic: &str,
        qos: Qos,
        retain: bool,
        _kind: PublishKind,
    ) -> AclDecision {
        if self.refuses_retained_command(client, topic, retain) {
            return AclDecision::Deny(DenyReason::NotAuthorized);
        }
        self.decide(client, Operation::Publish, topic, qos)
    }

    /// A burst from one client: its principal (a few host calls) is looked up once for all the requests.
    fn authorize_publish_batch(&self, client: &Client, requests: Vec<PublishRequest>) -> Vec<AclDecision> {
        let principal = self.principal(client);
        requests
            .iter()
            .map(|request| {
                if self.refuses_retained_command(client, &request.topic, request.retain) {
                    return AclDecision::Deny(DenyReason::NotAuthorized);
                }
                self.decide_as(&principal, client, Operation::Publish, &request.topic, request.qos)
            })
            .collect()
    }

    fn authorize_subscribe(&self, client: &Client, filter: &str, qos: Qos, _share_group: Option<&str>) -> AclDecision {
        self.decide(client, Operation::Subscribe, filter, qos)
    }
}

export_plugin!(VinAcl);

#[cfg(test)]
mod tests {
    use super::*;

    const VIN: &str = "1J9RP1A36A1644345";
    const OTHER: &str = "1G1BN53E6NW128495";

    fn config() -> Config {
        [
            ("rules.0.id", "vehicle-uplink"),
            ("rules.0.allow.0", "publish"),
            ("rules.0.topics.0", "vehicle/${vin}/status"),
            ("rules.0.topics.1", "vehicle/updates/${vin}/progress"),
            ("rules.0.max_qos", "1"),
            ("rules.1.id", "vehicle-downlink"),
            ("rules.1.allow.0", "subscribe"),
            ("rules.1.topics.0", "vehicle/updates/${vin}"),
            ("rules.2.id", "backend"),
            ("rules.2.who", "role:backend"),
            ("rules.2.allow.0", "publish"),
            ("rules.2.allow.1", "subscribe"),
            ("rules.2.topics.0", "vehicle/#"),
            ("roles.0.name", "backend"),
            ("roles.0.match", "username=ota-backend"),
        ]
        .into_iter()
        .collect()
    }

    fn peer(cn: &str, uri: Option<&str>) -> PeerCertificate {
        PeerCertificate {
            subject: format!("CN={cn}"),
            common_name: Some(cn.to_owned()),
            subject_serial_number: None,
            organizational_units: vec![],
            san_uris: uri.map(|uri| vec![uri.to_owned()]).unwrap_or_default(),
            san_dns: vec![],
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
        }
    }

    fn connect(client_id: &str, peer: Option<PeerCertificate>) -> ConnectInfo {
        ConnectInfo {
            client_id: client_id.into(),
            username: None,
            username_from_certificate: false,
            password: None,
            protocol: ProtocolVersion::V5,
            remote_addr: None,
            listener: "tls".into(),
            peer,
            auth_method: None,
            auth_data: None,
        }
    }

    /// Each identity, as both client id and certificate CN, is refused as not authorized.
    fn refuses_identities(acl: &VinAcl, identities: &[&str]) {
        for bad in identities {
            assert_eq!(
                acl.on_connect(&connect(bad, Some(peer(bad, None)))),
                ConnectDecision::Deny(DenyReason::NotAuthorized),
                "{bad:?}"
            );
        }
    }

    fn refuses_client_id(acl: &VinAcl, client_id: &str, identity: &str) {
        assert_eq!(
            acl.on_connect(&connect(client_id, Some(peer(identity, None)))),
            ConnectDecision::Deny(DenyReason::ClientIdentifierNotValid)
        );
    }

    fn with(extra: &[(&str, &str)]) -> Config {
        config().iter().chain(extra.iter().copied()).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    #[test]
    fn revoked_vins_and_serials_are_refused_and_their_sessions_end() {
        let revoked = format!("# revoked after theft\n{VIN}\nserial:0A:FF\n");
        let acl = VinAcl::init(with(&[("files.revoked", &revoked)])).expect("init");
        let car = peer("ignored", Some(&format!("urn:vin:{VIN}")));
        assert_eq!(acl.on_connect(&connect(VIN, Some(car))), ConnectDecision::Deny(DenyReason::NotAuthorized));
        let mut by_serial = peer("ignored", Some(&format!("urn:vin:{OTHER}")));
        by_serial.serial = "0aff".into();
        assert_eq!(acl.on_connect(&connect(OTHER, Some(by_serial))), ConnectDecision::Deny(DenyReason::NotAuthorized));
        // A live session of a car revoked after it connected.
        tollgate_sdk::testing::set_attribute("vin-acl.vin", VIN);
        assert_eq!(acl.authorize_session(&Client::new(VIN, None)), AclDecision::Deny(DenyReason::NotAuthorized));
        tollgate_sdk::testing::set_attribute("vin-acl.vin", OTHER);
        assert_eq!(acl.authorize_session(&Client::new(OTHER, None)), AclDecision::Ignore);
        assert!(
            VinAcl::init(with(&[("files.revoked", "not-a-vin")]))
                .err()
                .is_some_and(|error| error.contains("not-a-vin"))
        );
    }

    #[test]
    fn grants_open_one_vin_until_their_deadline() {
        let acl = VinAcl::init(with(&[
            ("rules.3.id", "dealer"),
            ("rules.3.who", "role:dealer"),
            ("rules.3.allow.0", "subscribe"),
            ("rules.3.allow.1", "publish"),
            ("rules.3.topics.0", "vehicle/${vin}/status"),
            ("rules.3.scope", "granted"),
            ("roles.1.name", "dealer"),
            ("roles.1.match", "username=dealer-7"),
            ("files.grants", &format!("dealer-7 {VIN} 2026-11-22T15:00:00Z\n")),
        ]))
        .expect("init");
        let tool = Client::new("diag-1", Some("dealer-7"));
        let before = parse_time("2026-11-22T14:59:59Z").expect("time");
        tollgate_sdk::testing::set_now_ms(Some(before));
        let own = format!("vehicle/{VIN}/status");
        assert_eq!(acl.authorize_subscribe(&tool, &own, Qos::AtMostOnce, None), AclDecision::Allow);
        let other = format!("vehicle/{OTHER}/status");
        assert_eq!(
            acl.authorize_subscribe(&tool, &other, Qos::AtMostOnce, None),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        tollgate_sdk::testing::set_now_ms(Some(before + 1000));
        assert_eq!(
            acl.authorize_subscribe(&tool, &own, Qos::AtMostOnce, None),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        tollgate_sdk::testing::set_now_ms(None);
    }

    #[test]
    fn gauges_count_grants_and_revocations_and_a_connect_notices_a_grant_running_out() {
        let deadline = parse_time("2026-11-22T15:00:00Z").expect("time");
        tollgate_sdk::testing::set_now_ms(Some(deadline - 1000));
        let acl = VinAcl::init(with(&[
            ("files.grants", &format!("dealer-7 {VIN} 2026-11-22T15:00:00Z\ndealer-8 {OTHER} 2026-12-01T00:00:00Z\n")),
            ("revoked.0", VIN),
            ("revoked.1", "serial:0A:FF"),
        ]))
        .expect("init");
        let gauge = |name: &str| tollgate_sdk::testing::gauge(name);
        assert_eq!((gauge("grants"), gauge("grants_active"), gauge("revoked")), (Some(2), Some(2), Some(2)));
        tollgate_sdk::testing::set_now_ms(Some(deadline));
        assert_eq!(acl.on_connect(&connect("backend", None)), ConnectDecision::Ignore);
        assert_eq!(gauge("grants_active"), Some(1), "dealer-7's grant ran out");
        tollgate_sdk::testing::set_now_ms(None);
    }

    #[test]
    fn identities_active_counts_bound_identities_up_and_down() {
        let acl = VinAcl::init(config()).expect("init");
        let gauge = || tollgate_sdk::testing::gauge("identities_active");
        let before = gauge().unwrap_or(0);
        let car = Client::new(VIN, None);
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin-acl.vin", VIN);
        acl.on_connected(&car);
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin-acl.namespace", "preprod");
        tollgate_sdk::testing::set_attribute("vin-acl.id", "EOL-STATION-04");
        acl.on_connected(&Client::new("EOL-STATION-04", None));
        // A backend by role is not an identity this plugin bound.
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin-acl.role", "backend");
        acl.on_connected(&Client::new("backend-1", None));
        assert_eq!(gauge(), Some(before + 2));
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin-acl.vin", VIN);
        acl.on_disconnected(&car, DisconnectCause::ConnectionLost);
        assert_eq!(gauge(), Some(before + 1));
        tollgate_sdk::testing::clear_attributes();
    }

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2000-03-01T00:00:00Z"), Some(951_868_800_000));
        assert_eq!(parse_time("2026-11-22T15:00:00Z"), Some(1_795_359_600_000));
        assert_eq!(parse_time("42"), Some(42_000));
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("2026-11-22 15:00:00"), None);
    }

    #[test]
    fn a_valid_certificate_binds_the_vin() {
        let acl = VinAcl::init(config()).expect("init");
        let decision = acl.on_connect(&connect(VIN, Some(peer("ignored", Some(&format!("urn:vin:{VIN}"))))));
        assert_eq!(
            decision,
            ConnectDecision::Allow(vec![("vin".into(), VIN.into()), ("vin-acl.vin".into(), VIN.into())])
        );
        // CN is the fallback source.
        assert!(matches!(acl.on_connect(&connect(VIN, Some(peer(VIN, None)))), ConnectDecision::Allow(_)));
    }

    #[test]
    fn bad_identities_and_client_ids_are_refused() {
        let acl = VinAcl::init(config()).expect("init");
        refuses_identities(
            &acl,
            &["1J9RP1A36A1644346", "1j9rp1a36a1644345", "1J9RP1A36A164434", "1J9RP1A36A164434+", "+", "#", "a/b"],
        );
        refuses_client_id(&acl, "someone-else", VIN);
        assert_eq!(acl.on_connect(&connect(VIN, None)), ConnectDecision::Ignore, "no certificate: not a car");
    }

    #[test]
    fn a_car_reaches_only_its_own_topics() {
        let acl = VinAcl::init(config()).expect("init");
        tollgate_sdk::testing::set_attribute("vin-acl.vin", VIN);
        let car = Client::new(VIN, None);
        let publish = |topic: &str, qos| acl.authorize_publish(&car, topic, qos, false, PublishKind::Publish);
        assert_eq!(publish(&format!("vehicle/{VIN}/status"), Qos::AtMostOnce), AclDecision::Allow);
        assert_eq!(
            publish(&format!("vehicle/{VIN}/status"), Qos::ExactlyOnce),
            AclDecision::AllowMaxQos(Qos::AtLeastOnce)
        );
        assert_eq!(
            publish(&format!("vehicle/{OTHER}/status"), Qos::AtMostOnce),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        let subscribe = |filter: &str| acl.authorize_subscribe(&car, filter, Qos::AtLeastOnce, None);
        assert_eq!(subscribe(&format!("vehicle/updates/{VIN}")), AclDecision::Allow);
        for filter in ["vehicle/updates/+", "vehicle/updates/#", "#", &format!("vehicle/updates/{OTHER}")] {
            assert_eq!(subscribe(filter), AclDecision::Deny(DenyReason::NotAuthorized), "{filter}");
        }
    }

    #[test]
    fn a_burst_gets_the_decisions_of_its_publishes_one_by_one() {
        let acl = VinAcl::init(with(&[("deny_retained_commands", "true")])).expect("init");
        tollgate_sdk::testing::set_attribute("vin-acl.vin", VIN);
        let car = Client::new(VIN, None);
        let own = format!("vehicle/{VIN}/status");
        let other = format!("vehicle/{OTHER}/status");
        let command = format!("vehicle/{VIN}/cmd/unlock");
        let requests = [
            (own.as_str(), Qos::AtMostOnce, false),
            (other.as_str(), Qos::AtMostOnce, false),
            (own.as_str(), Qos::ExactlyOnce, false),
            (command.as_str(), Qos::AtLeastOnce, true),
        ];
        let one_by_one: Vec<AclDecision> = requests
            .iter()
            .map(|&(topic, qos, retain)| acl.authorize_publish(&car, topic, qos, retain, PublishKind::Publish))
            .collect();
        let burst = requests
            .iter()
            .map(|&(topic, qos, retain)| PublishRequest { topic: topic.to_owned(), qos, retain })
            .collect();
        assert_eq!(acl.authorize_publish_batch(&car, burst), one_by_one);
        assert_eq!(
            one_by_one,
            [
                AclDecision::Allow,
                AclDecision::Deny(DenyReason::NotAuthorized),
                AclDecision::AllowMaxQos(Qos::AtLeastOnce),
                AclDecision::Deny(DenyReason::NotAuthorized),
            ]
        );
    }

    #[test]
    fn a_backend_role_by_user_name_sees_the_fleet() {
        let acl = VinAcl::init(config()).expect("init");
        let backend = Client::new("backend-1", Some("ota-backend"));
        assert_eq!(acl.authorize_subscribe(&backend, "vehicle/#", Qos::AtLeastOnce, None), AclDecision::Allow);
        let stranger = Client::new("x", Some("someone"));
        assert_eq!(
            acl.authorize_subscribe(&stranger, "vehicle/#", Qos::AtLeastOnce, None),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
    }

    #[test]
    fn a_role_by_certificate_ou_is_attached_at_connect() {
        let config: Config = [
            ("rules.0.who", "role:diag"),
            ("rules.0.allow.0", "subscribe"),
            ("rules.0.topics.0", "vehicle/${vin}/state"),
            ("roles.0.name", "diag"),
            ("roles.0.match", "cert.ou=DealerDiag"),
        ]
        .into_iter()
        .collect();
        let acl = VinAcl::init(config).expect("init");
        let mut tool = peer("dealer-tool-7", None);
        tool.organizational_units = vec!["DealerDiag".into()];
        assert_eq!(
            acl.on_connect(&connect("tool-7", Some(tool))),
            ConnectDecision::Allow(vec![("vin-acl.role".into(), "diag".into())])
        );
        tollgate_sdk::testing::set_attribute("vin-acl.role", "diag");
        let client = Client::new("tool-7", None);
        assert_eq!(acl.authorize_subscribe(&client, "vehicle/+/state", Qos::AtMostOnce, None), AclDecision::Allow);
        assert_eq!(
            acl.authorize_subscribe(&client, "vehicle/#", Qos::AtMostOnce, None),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
    }

    #[test]
    fn configuration_errors_are_named() {
        let mut bad = config();
        bad = bad
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain([
                ("rules.3.allow.0".to_owned(), "publish".to_owned()),
                ("rules.3.topics.0".to_owned(), "vehicle/shared".to_owned()),
            ])
            .collect();
        assert!(VinAcl::init(bad).err().is_some_and(|error| error.contains("${vin}")));
        let no_rules: Config = [("client_id_policy", "equal")].into_iter().collect();
        assert!(VinAcl::init(no_rules).err().is_some_and(|error| error.contains("no rules")));
        let unknown_role: Config =
            [("rules.0.who", "role:ghost"), ("rules.0.allow.0", "publish"), ("rules.0.topics.0", "x/#")]
                .into_iter()
                .collect();
        assert!(VinAcl::init(unknown_role).err().is_some_and(|error| error.contains("ghost")));
    }

    #[test]
    fn end_of_line_stations_get_their_own_namespace() {
        let acl = VinAcl::init(with(&[
            ("non_vin_identities.0.pattern", "EOL-[0-9A-Z]{6,12}"),
            ("non_vin_identities.0.namespace", "preprod"),
            ("rules.3.id", "eol"),
            ("rules.3.who", "preprod"),
            ("rules.3.allow.0", "publish"),
            ("rules.3.allow.1", "subscribe"),
            ("rules.3.topics.0", "eol/${id}/#"),
            ("rules.3.topics.1", "eol/config"),
        ]))
        .expect("init");
        let station = "EOL-ABC123";
        let decision = acl.on_connect(&connect(station, Some(peer(station, None))));
        assert_eq!(
            decision,
            ConnectDecision::Allow(vec![
                ("vin-acl.namespace".into(), "preprod".into()),
                ("vin-acl.id".into(), station.into())
            ])
        );
        // Not a VIN and not the pattern (anchored at both ends), or not usable as a topic level: refused.
        refuses_identities(&acl, &["EOL-abc123", "XEOL-ABC123", "EOL-ABC123X/", "EOL-ABC", "EOL-ABC123+"]);
        // Revoked by name (`id:`): refused at CONNECT, and a live session ends at the next recheck.
        let revoking = VinAcl::init(with(&[
            ("non_vin_identities.0.pattern", "EOL-[0-9A-Z]{6,12}"),
            ("non_vin_identities.0.namespace", "preprod"),
            ("files.revoked", "id:EOL-ABC123  # station retired\n"),
        ]))
        .expect("init");
        assert_eq!(
            revoking.on_connect(&connect(station, Some(peer(station, None)))),
            ConnectDecision::Deny(DenyReason::NotAuthorized)
        );
        tollgate_sdk::testing::set_attribute("vin-acl.namespace", "preprod");
        tollgate_sdk::testing::set_attribute("vin-acl.id", station);
        assert_eq!(
            revoking.authorize_session(&Client::new(station, None)),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        assert_eq!(acl.authorize_session(&Client::new(station, None)), AclDecision::Ignore);
        tollgate_sdk::testing::clear_attributes();
        assert!(VinAcl::init(with(&[("files.revoked", "id:")])).err().is_some_and(|error| error.contains("id:")));
        refuses_client_id(&acl, "other-id", station);

        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin-acl.namespace", "preprod");
        tollgate_sdk::testing::set_attribute("vin-acl.id", station);
        let client = Client::new(station, None);
        let publish = |topic: &str| acl.authorize_publish(&client, topic, Qos::AtMostOnce, false, PublishKind::Publish);
        assert_eq!(publish("eol/EOL-ABC123/result"), AclDecision::Allow);
        assert_eq!(publish("eol/EOL-XYZ789/result"), AclDecision::Deny(DenyReason::NotAuthorized));
        assert_eq!(publish("eol/config"), AclDecision::Allow);
        assert_eq!(publish(&format!("vehicle/{VIN}/status")), AclDecision::Deny(DenyReason::NotAuthorized));
        assert_eq!(
            acl.authorize_subscribe(&client, "eol/+/result", Qos::AtMostOnce, None),
            AclDecision::Deny(DenyReason::NotAuthorized),
            "a station cannot watch the others"
        );
        tollgate_sdk::testing::clear_attributes();

        assert!(
            VinAcl::init(with(&[
                ("rules.3.id", "x"),
                ("rules.3.who", "nowhere"),
                ("rules.3.allow.0", "publish"),
                ("rules.3.topics.0", "a")
            ]))
            .err()
            .is_some_and(|error| error.contains("non_vin_identities namespace"))
        );
        assert!(
            VinAcl::init(with(&[("non_vin_identities.0.pattern", "EOL-("), ("non_vin_identities.0.namespace", "p")]))
                .err()
                .is_some_and(|error| error.contains("non_vin_identities.0.pattern"))
        );
    }

    #[test]
    fn a_token_vin_counts_only_when_allowed_and_valid() {
        let status = format!("vehicle/{VIN}/status");
        // Another authenticator attached `vin` (a token claim): not an identity unless the operator says so.
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin", VIN);
        let car = Client::new(VIN, None);
        let strict = VinAcl::init(config()).expect("init");
        assert_eq!(
            strict.authorize_publish(&car, &status, Qos::AtMostOnce, false, PublishKind::Publish),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        let tokens = VinAcl::init(with(&[("allow_token_identity", "true")])).expect("init");
        assert_eq!(
            tokens.authorize_publish(&car, &status, Qos::AtMostOnce, false, PublishKind::Publish),
            AclDecision::Allow
        );
        let other = format!("vehicle/{OTHER}/status");
        assert_eq!(
            tokens.authorize_publish(&car, &other, Qos::AtMostOnce, false, PublishKind::Publish),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        // The claim is validated like a certificate's: check digit, client id, revocation.
        assert_eq!(
            tokens.authorize_publish(
                &Client::new("someone", None),
                &status,
                Qos::AtMostOnce,
                false,
                PublishKind::Publish
            ),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        tollgate_sdk::testing::set_attribute("vin", "1J9RP1A36A1644346");
        let bad = Client::new("1J9RP1A36A1644346", None);
        let bad_status = "vehicle/1J9RP1A36A1644346/status";
        assert_eq!(
            tokens.authorize_publish(&bad, bad_status, Qos::AtMostOnce, false, PublishKind::Publish),
            AclDecision::Deny(DenyReason::NotAuthorized)
        );
        tollgate_sdk::testing::set_attribute("vin", VIN);
        let revoking = VinAcl::init(with(&[("allow_token_identity", "true"), ("revoked.0", VIN)])).expect("init");
        assert_eq!(revoking.authorize_session(&car), AclDecision::Deny(DenyReason::NotAuthorized));
        // A custom claim name.
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("jwt.vin", VIN);
        let custom = VinAcl::init(with(&[("allow_token_identity", "true"), ("token_claim", "jwt.vin")])).expect("init");
        assert_eq!(
            custom.authorize_publish(&car, &status, Qos::AtMostOnce, false, PublishKind::Publish),
            AclDecision::Allow
        );
        tollgate_sdk::testing::clear_attributes();
    }

    #[test]
    fn retained_commands_are_refused_when_configured() {
        let topic = format!("vehicle/{VIN}/cmd/unlock");
        let backend = Client::new("ota", Some("ota-backend"));
        let publish = |acl: &VinAcl, retain: bool| {
            acl.authorize_publish(&backend, &topic, Qos::AtLeastOnce, retain, PublishKind::Publish)
        };
        let lenient = VinAcl::init(config()).expect("init");
        assert_eq!(publish(&lenient, true), AclDecision::Allow, "off by default");
        let strict = VinAcl::init(with(&[("deny_retained_commands", "true")])).expect("init");
        assert_eq!(publish(&strict, true), AclDecision::Deny(DenyReason::NotAuthorized));
        assert_eq!(publish(&strict, false), AclDecision::Allow, "a live command passes");
        let status = format!("vehicle/{VIN}/status");
        assert_eq!(
            strict.authorize_publish(&backend, &status, Qos::AtLeastOnce, true, PublishKind::Publish),
            AclDecision::Allow,
            "retained state is fine"
        );
        assert!(VinAcl::init(with(&[("deny_retained_commands", "yes")])).is_err());
    }

    #[test]
    fn upper_case_mode_accepts_lower_case_vins_as_upper_case() {
        let lower = VIN.to_ascii_lowercase();
        let strict = VinAcl::init(config()).expect("init");
        refuses_identities(&strict, &[&lower]);
        let upper = VinAcl::init(with(&[("case", "upper")])).expect("init");
        let expected = ConnectDecision::Allow(vec![("vin".into(), VIN.into()), ("vin-acl.vin".into(), VIN.into())]);
        assert_eq!(upper.on_connect(&connect(&lower, Some(peer(&lower, None)))), expected);
        assert_eq!(upper.on_connect(&connect(VIN, Some(peer(&lower, None)))), expected);
        // Still a VIN: a lower-case string with a bad check digit stays refused.
        refuses_identities(&upper, &["1j9rp1a36a1644346"]);
        assert!(VinAcl::init(with(&[("case", "lower")])).is_err());
    }

    #[test]
    fn a_revoked_lower_case_token_vin_ends_its_session_in_upper_case_mode() {
        tollgate_sdk::testing::clear_attributes();
        tollgate_sdk::testing::set_attribute("vin", &VIN.to_ascii_lowercase());
        let acl = VinAcl::init(with(&[("allow_token_identity", "true"), ("case", "upper"), ("revoked.0", VIN)]))
            .expect("init");
        assert_eq!(acl.authorize_session(&Client::new(VIN, None)), AclDecision::Deny(DenyReason::NotAuthorized));
        tollgate_sdk::testing::clear_attributes();
    }
}
