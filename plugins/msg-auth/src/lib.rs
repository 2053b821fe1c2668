//! msg-auth: verifies signed messages (`verify` rules), signs on behalf of authenticated clients that cannot sign
//! (`attest` rules), and refuses replays, with freshness state kept durably by the broker. The signed form lives in
//! `tollgate-sig`; the keys live in the broker (`[plugins.secrets]`) and never enter this plugin.

use std::cell::{Cell, RefCell};

use tollgate_sdk::crypto::MacAlgorithm;
use tollgate_sdk::prelude::*;
use tollgate_sig::{
    Algorithm, Covered, Malformed, PREVIOUS_PROPERTY, PROPERTY, STATUS_PROPERTY, Signature, derive_info,
};

/// How many counters behind the highest seen are still accepted (once each), for senders whose messages arrive
/// slightly out of order.
const REPLAY_WINDOW: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyState {
    /// Signs and verifies.
    Active,
    /// Verifies only: the grace period after a rotation.
    VerifyOnly,
    /// Refused.
    Retired,
}

#[derive(Clone, Debug)]
struct Key {
    kid: String,
    /// The MAC this key makes and accepts: a signature naming another algorithm is refused (`unknown_kid`).
    alg: Algorithm,
    state: KeyState,
    /// The secret's id in the broker's `[plugins.secrets]`.
    secret: String,
    /// HKDF info template (`vin-mac-v1:${sub}`): a key per identity, derived by the host.
    derive: Option<String>,
    /// `not_after`: from this instant (ms since the epoch) the key neither verifies nor signs (`expired_kid`).
    not_after_ms: Option<u64>,
    /// `not_after` as configured, for the expiry warnings.
    not_after_text: String,
    /// The highest durable reservation of this key's signing counter this instance has seen (see
    /// `counter_reserve`).
    reserved: Cell<u64>,
}

/// The host's name for a signature algorithm.
fn host_algorithm(alg: Algorithm) -> MacAlgorithm {
    match alg {
        Algorithm::Hs256 => MacAlgorithm::HmacSha256,
        Algorithm::CmacAes128 => MacAlgorithm::CmacAes128,
    }
}

/// When timestamps may refuse a message (`clock_trust`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClockTrust {
    Always,
    Never,
    /// While the broker's clock is synchronized (NTP), or when the broker cannot tell.
    Synchronized,
}

impl Key {
    fn expired(&self, now_ms: u64) -> bool {
        self.not_after_ms.is_some_and(|not_after| now_ms >= not_after)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Verify,
    Attest,
    /// Signs each copy sent to the rule's subscribers (a bridge toward the cloud), at send time.
    Sign,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum OnFail {
    Reject,
    /// Deliver with `x-sig-status: invalid:<reason>` (rollouts).
    Tag,
    /// Count and log only.
    Log,
    /// Publish under `<prefix>/<topic>` instead, not retained, with `x-sig-status: invalid:<reason>`: nobody
    /// subscribed to the real topic gets it, and an operator can read what was refused.
    Quarantine(String),
}

impl OnFail {
    fn parse(key: &str, value: &str) -> Result<Self, String> {
        match value {
            "reject" => Ok(Self::Reject),
            "tag" => Ok(Self::Tag),
            "log" => Ok(Self::Log),
            _ => match value.strip_prefix("quarantine:") {
                Some(prefix) => {
                    let valid = !prefix.ends_with('/') && tollgate_sdk::topic::validate_topic_name(prefix).is_ok();
                    if valid {
                        Ok(Self::Quarantine(prefix.to_owned()))
                    } else {
                        Err(format!(
                            "{key} = {value:?}: the quarantine prefix must be a topic name without wildcards or a \
                             trailing '/'"
                        ))
                    }
                }
                None => Err(format!("{key} = {value:?} is not reject, tag, log or quarantine:<topic prefix>")),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carrier {
    Property,
    Envelope,
}

#[derive(Clone, Debug)]
struct Rule {
    id: String,
    topics: Vec<String>,
    mode: Mode,
    /// The signing key of an attest or sign rule.
    key: Option<String>,
    /// The subscribers (client ids; a trailing `*` matches a prefix) whose copies a sign rule signs; empty: all.
    subscribers: Vec<String>,
    /// Keep the signature a copy already carries in `x-sig-prev` when signing it (sign rules).
    chain: bool,
    /// Key ids a verify rule accepts (`cloud-*` matches a prefix); empty: any key in the ring.
    accept_kids: Vec<String>,
    require: Vec<String>,
    /// The topic level (0-based) that must equal `sub`.
    sub_level: Option<usize>,
    /// `sub` must equal the publisher's identity attribute.
    bind_publisher: bool,
    on_fail: OnFail,
    deny_retained: bool,
    carrier: Carrier,
    /// A verify rule's re-signing key: what passed verification is signed again by the broker (for the `sub` it
    /// was signed for), so the receiver checks one key it holds (a per-VIN derived key) instead of the cloud's.
    resign: Option<String>,
    /// Keep the verified signature in `x-sig-prev` when re-signing.
    resign_chain: bool,
}

impl Rule {
    fn applies_to(&self, topic: &str) -> bool {
        self.topics.iter().any(|filter| tollgate_sdk::topic::matches(filter, topic))
    }
}

pub struct MsgAuth {
    site_id: String,
    enforce: bool,
    clock_skew_ms: u64,
    max_age_ms: u64,
    clock_trust: ClockTrust,
    /// When this broker's nonce records began (its first plugin instance since the broker started): a message
    /// relying on its nonce alone and signed before that may have been seen before the restart.
    nonce_floor_ms: u64,
    mac_len: usize,
    identity_attribute: String,
    disconnect_v3: bool,
    /// Bad MACs per client and minute after which the client is disconnected (0: never).
    bad_mac_limit: u64,
    keys: Vec<Key>,
    rules: Vec<Rule>,
    /// Signing counters are made durable this many at a time (`counter_reserve`): a reservation reaches the
    /// state file before any counter under it is used, and a restart resumes above it, so a counter never repeats
    /// while the state file is written once per reservation instead of once per signature.
    counter_reserve: u64,
    /// Warn this long before a key's `not_after` (0: never).
    expiry_warning_ms: u64,
    next_expiry_check_ms: Cell<u64>,
    /// Set while a burst is being verified (`on_publish_batch`).
    burst: RefCell<Option<Burst>>,
    /// The `clock_trusted` gauge as this instance last set it (-1: not yet), so it is set only when it changes.
    clock_trusted_gauge: Cell<i64>,
}

/// What the messages of one burst share. They arrived in one read, so they are judged at one instant (one clock
/// reading and one clock-trust answer for all of them), and the counters they move are added once: three host
/// calls per burst instead of three per message.
#[derive(Default)]
struct Burst {
    now_ms: Option<u64>,
    clock_synchronized: Option<bool>,
    counts: Vec<(&'static str, u64)>,
}

/// Why a message failed, as metrics and events name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Missing,
    Malformed,
    UnknownKid,
    ExpiredKid,
    BadMac,
    MissingField,
    Stale,
    Future,
    Expired,
    Replay,
    SubMismatch,
    Retained,
    NoIdentity,
    SignFailed,
}

impl Failure {
    fn name(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::UnknownKid => "unknown_kid",
            Failure::ExpiredKid => "expired_kid",
            Failure::BadMac => "bad_mac",
            Failure::MissingField => "missing_field",
            Failure::Stale => "stale",
            Failure::Future => "future",
            Failure::Expired => "expired",
            Failure::Replay => "replay",
            Failure::SubMismatch => "sub_mismatch",
            Failure::Retained => "retained",
            Failure::NoIdentity => "no_identity",
            Failure::SignFailed => "sign_failed",
        }
    }

    fn reason(self) -> DenyReason {
        match self {
            Failure::Malformed => DenyReason::PayloadFormatInvalid,
            _ => DenyReason::NotAuthorized,
        }
    }
}

/// The start of this broker's nonce records, shared by its instances (and kept over a reload, which keeps the
/// claims too); a restart forgets both.
fn nonce_floor() -> u64 {
    const FLOOR_KEY: &str = "nonce-floor";
    if let Some(floor) = host::kv_get(FLOOR_KEY).and_then(|bytes| <[u8; 8]>::try_from(bytes).ok()) {
        return u64::from_be_bytes(floor);
    }
    let now = host::now_ms();
    let _ = host::kv_set(FLOOR_KEY, &now.to_be_bytes());
    now
}

/// One of a fixed set of spellings, with an error naming the key and the choices.
fn pick<T: Copy>(config: &Config, key: &str, default: &str, choices: &[(&str, T)]) -> Result<T, String> {
    let value = config.get(key).unwrap_or(default);
    choices.iter().find(|(name, _)| *name == value).map(|(_, choice)| *choice).ok_or_else(|| {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        format!("{key} = {value:?} is not {}", names.join(" or "))
    })
}

/// The last signing counter issued under `kid` (in memory only).
fn counter_key(kid: &str) -> String {
    format!("tx/{kid}")
}

/// The durable reservation above every signing counter issued under `kid`.
fn reserve_key(kid: &str) -> String {
    format!("txr/{kid}")
}

fn parse_u64(key: &str, value: Option<&str>, default: u64) -> Result<u64, String> {
    value.map_or(Ok(default), |value| value.parse().map_err(|_| format!("{key} = {value:?} is not a whole number")))
}

/// Whether `name` (a key id, a client id) is one of `patterns`, where a trailing `*` matches a prefix; an empty
/// list accepts every name.
fn pattern_accepts(patterns: &[String], name: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        })
}

/// The absolute expiry (ms) a signature made now carries for a message with MQTT 5 message expiry; 0: none.
fn expiry_ms(message: &Message, now: u64) -> u64 {
    message.message_expiry_secs.map_or(0, |seconds| now + u64::from(seconds) * 1000)
}

/// Takes the signatures off a message the way a verifier reads them: its `x-sig` properties, or, when it has
/// none, an envelope around its payload. Returns their headers.
fn take_signatures(message: &mut Message) -> Vec<String> {
    let mut taken = Vec::new();
    message.user_properties.retain(|property| {
        let signature = property.key == PROPERTY;
        if signature {
            taken.push(property.value.clone());
        }
        !signature
    });
    if taken.is_empty()
        && let Some(Ok((signature, inner))) = tollgate_sig::split_envelope(&message.payload)
    {
        taken.push(signature.header());
        message.payload = inner.to_vec();
    }
    taken
}

/// The receive-side replay state of one (key, sender): the highest counter seen and a bitmap of the
/// [`REPLAY_WINDOW`] counters below it.
fn replay_key(kid: &str, sub: &str) -> String {
    // Built by hand: `format!` costs several times as much, on every message.
    let mut key = String::with_capacity(4 + kid.len() + sub.len());
    key.push_str("rx/");
    key.push_str(kid);
    key.push('/');
    key.push_str(sub);
    key
}

/// A nonce seen from (key, sender), remembered while its timestamp could still pass.
fn nonce_key(kid: &str, sub: &str, nonce: &str) -> String {
    format!("nonce/{kid}/{sub}/{nonce}")
}

fn read_window(bytes: Option<&[u8]>) -> (u64, u64) {
    match bytes.and_then(|bytes| <[u8; 16]>::try_from(bytes).ok()) {
        Some(state) => {
            let (high, bits) = state.split_at(8);
            (
                u64::from_be_bytes(high.try_into().unwrap_or_default()),
                u64::from_be_bytes(bits.try_into().unwrap_or_default()),
            )
        }
        None => (0, 0),
    }
}

/// Accepts `counter` against (highest, bitmap) and returns the new state, or `None` for a replay. Bit `i` of the
/// bitmap stands for `highest - 1 - i`.
fn advance_window(highest: u64, bits: u64, counter: u64) -> Option<(u64, u64)> {
    if counter == 0 {
        return None;
    }
    if counter > highest {
        let shift = counter - highest;
        let moved = if shift >= REPLAY_WINDOW { 0 } else { bits << shift };
        // The old highest becomes bit `shift - 1`, if it is still inside the window.
        let marked = if highest > 0 && shift <= REPLAY_WINDOW { moved | 1 << (shift - 1) } else { moved };
        return Some((counter, marked));
    }
    let behind = highest - counter;
    if behind == 0 || behind > REPLAY_WINDOW {
        return None;
    }
    let bit = 1u64 << (behind - 1);
    if bits & bit != 0 { None } else { Some((highest, bits | bit)) }
}

impl Plugin for MsgAuth {
    const NAME: &'static str = "msg-auth";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const HOOKS: &'static [Hook] = &[Hook::Transform, Hook::Deliver];

    fn init(config: Config) -> Result<Self, String> {
        let mut keys = Vec::new();
        for index in config.table_indices("keys") {
            let key = |name: &str| format!("keys.{index}.{name}");
            let kid = config.require(&key("kid"))?.to_owned();
            if !tollgate_sig::valid_name(&kid) || kid.is_empty() {
                return Err(format!("{} = {kid:?}: a key id is letters, digits, '.', '_', ':' or '-'", key("kid")));
            }
            let state = pick(
                &config,
                &key("state"),
                "active",
                &[("active", KeyState::Active), ("verify-only", KeyState::VerifyOnly), ("retired", KeyState::Retired)],
            )?;
            if keys.iter().any(|existing: &Key| existing.kid == kid) {
                return Err(format!("key {kid:?} is configured twice"));
            }
            let alg = config.get(&key("alg")).unwrap_or("hs256");
            let alg = Algorithm::from_name(alg)
                .ok_or_else(|| format!("{} = {alg:?} is not hs256 or cmac-aes128", key("alg")))?;
            let secret = config.get(&key("secret")).unwrap_or(&kid).to_owned();
            let derive = config.get(&key("derive")).map(str::to_owned);
            // The host refuses unknown secret ids, and CMAC secrets that are not 16 bytes; finding out now beats
            // failing on the first message.
            if state != KeyState::Retired {
                let probe_info = derive.as_ref().map(|_| b"probe".as_slice());
                crypto::mac(host_algorithm(alg), &secret, probe_info, b"probe")
                    .map_err(|error| format!("{}: {error}", key("secret")))?;
            }
            let not_after_ms = match config.get(&key("not_after")) {
                None => None,
                Some(text) => Some(
                    tollgate_sdk::time::rfc3339_ms(text)
                        .ok_or_else(|| format!("{} = {text:?} is not an RFC 3339 UTC time", key("not_after")))?,
                ),
            };
            let not_after_text = config.get(&key("not_after")).unwrap_or("").to_owned();
            keys.push(Key { kid, alg, state, secret, derive, not_after_ms, not_after_text, reserved: Cell::new(0) });
        }
        if keys.is_empty() {
            return Err("no keys configured ([[plugins.config.keys]])".to_owned());
        }
        let mut rules = Vec::new();
        for index in config.table_indices("rules") {
            let key = |name: &str| format!("rules.{index}.{name}");
            let id = config.get(&key("id")).map_or_else(|| format!("rule-{index}"), str::to_owned);
            let topics: Vec<String> = config.list(&key("topics")).into_iter().map(str::to_owned).collect();
            if topics.is_empty() {
                return Err(format!("{}: at least one topic filter is required", key("topics")));
            }
            config.require(&key("mode"))?;
            let mode = pick(
                &config,
                &key("mode"),
                "",
                &[("verify", Mode::Verify), ("attest", Mode::Attest), ("sign", Mode::Sign)],
            )?;
            let signing_key = config.get(&key("key")).map(str::to_owned);
            let active_key = |name: &str, kid: &str| match keys.iter().find(|candidate| candidate.kid == kid) {
                Some(found) if found.state == KeyState::Active => Ok(found),
                Some(_) => Err(format!("{} = {kid:?} is not an active key", key(name))),
                None => Err(format!("{} = {kid:?} is not in keys", key(name))),
            };
            if mode == Mode::Attest || mode == Mode::Sign {
                let Some(kid) = &signing_key else {
                    return Err(format!("{}: an {} rule names the key it signs with", key("key"), mode_name(mode)));
                };
                let found = active_key("key", kid)?;
                // A sign rule's sub comes from the topic: a key derived per sub needs that level.
                if mode == Mode::Sign && found.derive.is_some() && config.get(&key("sub_level")).is_none() {
                    return Err(format!("{}: {kid:?} is derived per sub, so the rule needs sub_level", key("key")));
                }
            }
            let require: Vec<String> = if config.get(&key("require.0")).is_some() {
                config.list(&key("require")).into_iter().map(str::to_owned).collect()
            } else {
                vec!["ts".into(), "ctr".into()]
            };
            if let Some(unknown) =
                require.iter().find(|field| !["ts", "ctr", "nonce", "exp", "sub", "iss"].contains(&field.as_str()))
            {
                return Err(format!("{}: {unknown:?} is not ts, ctr, nonce, exp, sub or iss", key("require")));
            }
            let resign = config.get(&key("resign")).map(str::to_owned);
            if let Some(kid) = &resign {
                if mode != Mode::Verify {
                    return Err(format!("{}: only a verify rule re-signs", key("resign")));
                }
                let found = active_key("resign", kid)?;
                // A derived key is the key of one `sub`: without a required `sub` there would be none to derive.
                if found.derive.is_some() && !require.iter().any(|field| field == "sub") {
                    return Err(format!(
                        "{}: {kid:?} is derived per sub, so the rule must require \"sub\"",
                        key("resign")
                    ));
                }
            }
            let on_fail = OnFail::parse(&key("on_fail"), config.get(&key("on_fail")).unwrap_or("reject"))?;
            if mode == Mode::Sign && matches!(on_fail, OnFail::Quarantine(_)) {
                // A sign rule acts on one subscriber's copy, which cannot be sent to another topic.
                return Err(format!("{}: a sign rule cannot quarantine (reject, tag or log)", key("on_fail")));
            }
            let carrier = pick(
                &config,
                &key("carrier"),
                "property",
                &[("property", Carrier::Property), ("envelope", Carrier::Envelope)],
            )?;
            let sub_level = match config.get(&key("sub_level")) {
                None => None,
                Some(level) => {
                    Some(level.parse().map_err(|_| format!("{} = {level:?} is not a level index", key("sub_level")))?)
                }
            };
            rules.push(Rule {
                id,
                topics,
                mode,
                key: signing_key,
                subscribers: config.list(&key("subscribers")).into_iter().map(str::to_owned).collect(),
                chain: config.bool(&key("chain"), false)?,
                accept_kids: config.list(&key("accept_kids")).into_iter().map(str::to_owned).collect(),
                require,
                sub_level,
                bind_publisher: config.bool(&key("bind_publisher"), false)?,
                on_fail,
                deny_retained: config.bool(&key("deny_retained"), false)?,
                carrier,
                resign,
                resign_chain: config.bool(&key("resign_chain"), false)?,
            });
        }
        if rules.is_empty() {
            return Err("no rules configured ([[plugins.config.rules]])".to_owned());
        }
        let allow_volatile = config.bool("allow_volatile_state", false)?;
        // Replay state and signing counters must survive a restart, or a restart reopens the replay window.
        if let Err(error) = host::kv_set_durable("msg-auth/state-probe", b"1")
            && !allow_volatile
        {
            return Err(format!(
                "replay protection needs durable state ({error}); set the broker's runtime.state_dir, or \
                 allow_volatile_state = true to accept replays across restarts"
            ));
        }
        let mac_len = parse_u64("mac_len", config.get("mac_len"), 32)?;
        if !(16..=32).contains(&mac_len) {
            return Err(format!("mac_len = {mac_len}: between 16 and 32 bytes"));
        }
        let site_id = config.get("site_id").unwrap_or("").to_owned();
        if !tollgate_sig::valid_name(&site_id) {
            return Err(format!("site_id = {site_id:?}: letters, digits, '.', '_', ':' or '-'"));
        }
        let counter_reserve = parse_u64("counter_reserve", config.get("counter_reserve"), 1000)?;
        if counter_reserve == 0 {
            return Err("counter_reserve = 0: at least 1".into());
        }
        let warning_days = parse_u64("key_expiry_warning_days", config.get("key_expiry_warning_days"), 14)?;
        // A restart resumes every signing counter at its reservation: counters issued before a crash were all
        // under it. Several instances starting at once may each move it up; counters only need to increase.
        for key in &keys {
            let reservation = host::kv_add(&reserve_key(&key.kid), 0, false).unwrap_or(0);
            let issued = host::kv_add(&counter_key(&key.kid), 0, false).unwrap_or(0);
            if issued < reservation {
                let _ = host::kv_add(&counter_key(&key.kid), reservation - issued, false);
            }
            key.reserved.set(reservation);
        }
        let plugin = MsgAuth {
            site_id,
            enforce: config.bool("enforce", true)?,
            clock_skew_ms: parse_u64("clock_skew_ms", config.get("clock_skew_ms"), 30_000)?,
            max_age_ms: parse_u64("max_age_ms", config.get("max_age_ms"), 120_000)?,
            clock_trust: pick(
                &config,
                "clock_trust",
                "always",
                &[
                    ("always", ClockTrust::Always),
                    ("never", ClockTrust::Never),
                    ("synchronized", ClockTrust::Synchronized),
                    ("ntp-synced", ClockTrust::Synchronized),
                ],
            )?,
            nonce_floor_ms: nonce_floor(),
            mac_len: mac_len as usize,
            identity_attribute: config.get("identity_attribute").unwrap_or("vin").to_owned(),
            disconnect_v3: pick(&config, "on_fail_v3", "drop", &[("drop", false), ("disconnect", true)])?,
            bad_mac_limit: {
                let text = config.get("bad_mac_disconnect").unwrap_or("5");
                text.parse().map_err(|_| format!("bad_mac_disconnect = {text:?} is not a count"))?
            },
            keys,
            rules,
            counter_reserve,
            expiry_warning_ms: warning_days.saturating_mul(86_400_000),
            next_expiry_check_ms: Cell::new(0),
            burst: RefCell::new(None),
            clock_trusted_gauge: Cell::new(-1),
        };
        plugin.check_key_ages(host::now_ms());
        for key in &plugin.keys {
            if let Some(not_after) = key.not_after_ms {
                let seconds = i64::try_from(not_after / 1000).unwrap_or(i64::MAX);
                host::gauge_set(&format!("keys/{}/not_after_s", key.kid), seconds);
            }
        }
        plugin.show_clock_trust(match plugin.clock_trust {
            ClockTrust::Always => true,
            ClockTrust::Never => false,
            ClockTrust::Synchronized => host::clock_synchronized() != Some(false),
        });
        Ok(plugin)
    }

    /// `deliver` only when a sign rule needs it: it is a call per subscriber copy. `transform` always, since it
    /// also strips client-supplied broker properties on every rule's topics.
    fn hooks(&self) -> Vec<Hook> {
        let mut hooks = vec![Hook::Transform];
        if self.rules.iter().any(|rule| rule.mode == Mode::Sign) {
            hooks.push(Hook::Deliver);
        }
        hooks
    }

    fn on_publish_batch(&self, client: &Client, messages: Vec<Message>) -> Vec<TransformResult> {
        *self.burst.borrow_mut() = Some(Burst::default());
        let results = tollgate_sdk::publish_one_by_one(self, client, messages);
        if let Some(burst) = self.burst.borrow_mut().take() {
            for (name, count) in burst.counts {
                host::counter_add(name, count);
            }
        }
        results
    }

    fn on_publish(&self, client: &Client, mut message: Message) -> TransformResult {
        // Sign rules act at delivery; at ingress the first verify or attest rule applies. One pass over the rules,
        // each topic match made once.
        let mut any_applies = false;
        let mut ingress_rule = None;
        for rule in &self.rules {
            if rule.applies_to(&message.topic) {
                any_applies = true;
                if rule.mode != Mode::Sign {
                    ingress_rule = Some(rule);
                    break;
                }
            }
        }
        if !any_applies {
            return TransformResult::Unchanged;
        }
        // What a client claims about signatures is never passed on as if the broker had said it.
        let before = message.user_properties.len();
        message.user_properties.retain(|property| property.key != STATUS_PROPERTY && property.key != PREVIOUS_PROPERTY);
        let stripped = message.user_properties.len() != before;
        let Some(rule) = ingress_rule else {
            return if stripped { TransformResult::Modified(message) } else { TransformResult::Unchanged };
        };
        let outcome = match rule.mode {
            Mode::Verify => self.verify(rule, &message).and_then(|verified| match &rule.resign {
                None => Ok(false),
                Some(kid) => self.resign(rule, kid, *verified, &mut message).map(|()| true),
            }),
            Mode::Attest => self.attest(rule, &mut message).map(|()| true),
            Mode::Sign => Ok(false),
        };
        match outcome {
            Ok(modified) => {
                let ok = match rule.mode {
                    Mode::Verify => "verify/ok",
                    Mode::Attest => "attest/ok",
                    Mode::Sign => "sign/ok",
                };
                self.count(ok);
                if rule.resign.is_some() {
                    self.count("verify/resigned");
                }
                if modified || stripped { TransformResult::Modified(message) } else { TransformResult::Unchanged }
            }
            Err((failure, detail)) => self.fail(rule, client, message, failure, &detail, stripped),
        }
    }

    /// Sign rules: the copy for a matching subscriber leaves signed by this broker, now.
    fn on_deliver(&self, subscriber: &Client, mut message: Message) -> TransformResult {
        let Some(rule) = self.rules.iter().find(|rule| {
            rule.mode == Mode::Sign
                && rule.applies_to(&message.topic)
                && pattern_accepts(&rule.subscribers, &subscriber.client_id)
        }) else {
            return TransformResult::Unchanged;
        };
        match self.sign_copy(rule, &mut message) {
            Ok(()) => {
                self.count("sign/ok");
                TransformResult::Modified(message)
            }
            Err((failure, detail)) => self.fail(rule, subscriber, message, failure, &detail, false),
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Verify => "verify",
        Mode::Attest => "attest",
        Mode::Sign => "sign",
    }
}

fn rule_mode(rule: &Rule) -> &'static str {
    mode_name(rule.mode)
}

/// A failure and the signature it concerns (for the security event), boxed: failures are the rare path.
type Outcome<T> = Result<T, (Failure, Box<Signature>)>;

impl MsgAuth {
    /// The host's clock, read once per burst.
    fn now_ms(&self) -> u64 {
        match self.burst.borrow_mut().as_mut() {
            Some(burst) => *burst.now_ms.get_or_insert_with(host::now_ms),
            None => host::now_ms(),
        }
    }

    /// Whether the host's clock is synchronized (unknown counts as yes), asked once per burst.
    fn clock_synchronized(&self) -> bool {
        let ask = || host::clock_synchronized() != Some(false);
        match self.burst.borrow_mut().as_mut() {
            Some(burst) => *burst.clock_synchronized.get_or_insert_with(ask),
            None => ask(),
        }
    }

    /// Adds one to a counter; during a burst, once for the whole burst when it ends.
    fn count(&self, name: &'static str) {
        match self.burst.borrow_mut().as_mut() {
            Some(burst) => match burst.counts.iter_mut().find(|(counted, _)| *counted == name) {
                Some((_, count)) => *count += 1,
                None => burst.counts.push((name, 1)),
            },
            None => host::counter_add(name, 1),
        }
    }

    fn key(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|key| key.kid == kid)
    }

    fn derive(key: &Key, sub: &str) -> Option<Vec<u8>> {
        key.derive.as_deref().map(|template| derive_info(template, sub))
    }

    /// Reads the signature: the user property, else an envelope in the payload. Returns the signature and the
    /// payload it covers.
    fn carried(message: &Message) -> Result<Option<(Signature, &[u8])>, Malformed> {
        let mut headers = message.user_properties.iter().filter(|property| property.key == PROPERTY);
        let header = headers.next();
        if headers.next().is_some() {
            return Err(Malformed("more than one x-sig property".into()));
        }
        tollgate_sig::carried(header.map(|property| property.value.as_str()), &message.payload)
    }

    /// Checks the message's signature; returns it once everything passed (and the replay window moved).
    fn verify(&self, rule: &Rule, message: &Message) -> Outcome<Box<Signature>> {
        let no_signature = Box::<Signature>::default;
        if rule.deny_retained && message.retain {
            return Err((Failure::Retained, no_signature()));
        }
        let (signature, payload) = match Self::carried(message) {
            Ok(Some(found)) => found,
            Ok(None) => return Err((Failure::Missing, no_signature())),
            Err(_) => return Err((Failure::Malformed, no_signature())),
        };
        let covered = Covered {
            topic: &message.topic,
            retain: message.retain,
            content_type: message.content_type.as_deref(),
            correlation_data: message.correlation_data.as_deref(),
            response_topic: message.response_topic.as_deref(),
            payload,
        };
        let input = tollgate_sig::canonical(&signature, &covered);
        let usable = self.key(&signature.kid).filter(|key| {
            key.state != KeyState::Retired && key.alg == signature.alg && pattern_accepts(&rule.accept_kids, &key.kid)
        });
        // An unknown key id costs the same as a known one: no timing oracle for which ids exist.
        let key = usable
            .or_else(|| self.keys.iter().find(|key| key.alg == signature.alg && key.state != KeyState::Retired))
            .unwrap_or(&self.keys[0]);
        let valid = crypto::verify_mac(
            host_algorithm(signature.alg),
            &key.secret,
            Self::derive(key, &signature.sub).as_deref(),
            &input,
            &signature.mac,
        )
        .unwrap_or(false);
        if usable.is_none() {
            return Err((Failure::UnknownKid, Box::new(signature)));
        }
        if !valid {
            return Err((Failure::BadMac, Box::new(signature)));
        }
        let now = self.now_ms();
        self.check_key_ages(now);
        if key.expired(now) {
            return Err((Failure::ExpiredKid, Box::new(signature)));
        }
        let present = signature.present;
        for field in &rule.require {
            let there = match field.as_str() {
                "ts" => present.ts,
                "ctr" => present.ctr,
                "nonce" => present.nonce,
                "exp" => present.exp,
                "sub" => present.sub,
                _ => present.iss,
            };
            if !there {
                return Err((Failure::MissingField, Box::new(signature)));
            }
        }
        if let Some(level) = rule.sub_level
            && message.topic.split('/').nth(level) != Some(signature.sub.as_str())
        {
            return Err((Failure::SubMismatch, Box::new(signature)));
        }
        if rule.bind_publisher
            && host::client_attribute(&self.identity_attribute).as_deref() != Some(signature.sub.as_str())
        {
            return Err((Failure::SubMismatch, Box::new(signature)));
        }
        if present.exp && signature.exp != 0 && signature.exp < now {
            return Err((Failure::Expired, Box::new(signature)));
        }
        // Only a timestamp needs the clock: messages without one do not ask the host.
        let check_time = present.ts && self.clock_trusted();
        if check_time {
            if signature.ts > now.saturating_add(self.clock_skew_ms) {
                return Err((Failure::Future, Box::new(signature)));
            }
            if now.saturating_sub(signature.ts) > self.max_age_ms + self.clock_skew_ms {
                return Err((Failure::Stale, Box::new(signature)));
            }
        }
        if present.nonce {
            // A nonce is remembered as long as its timestamp could pass, so it needs one.
            if !present.ts {
                return Err((Failure::MissingField, Box::new(signature)));
            }
            // Nonce records do not survive a restart: what relies on its nonce alone and was signed before this
            // broker started could have been accepted already. A counter, which is durable, does not need this.
            if check_time && !present.ctr && signature.ts < self.nonce_floor_ms {
                return Err((Failure::Replay, Box::new(signature)));
            }
            let remembered = self.max_age_ms.saturating_add(self.clock_skew_ms.saturating_mul(2));
            if !host::kv_claim(&nonce_key(&signature.kid, &signature.sub, &signature.nonce), remembered) {
                return Err((Failure::Replay, Box::new(signature)));
            }
        }
        if present.ctr {
            // Checked only now, after the tag: a forged message must not move the window.
            //
            // The broker runs one instance per worker, so two messages of one sender (a copy replayed on another
            // connection, or the sender on two connections) can be verified at the same instant. The window moves
            // by compare-and-set: an instance that finds it moved since it read it reads it again, and a copy in
            // flight then meets the window its original moved. Every retry means another message got through, and
            // the call's CPU budget bounds the loop anyway.
            let state_key = replay_key(&signature.kid, &signature.sub);
            loop {
                let current = host::kv_get(&state_key);
                let (highest, bits) = read_window(current.as_deref());
                let Some((highest, bits)) = advance_window(highest, bits, signature.ctr) else {
                    return Err((Failure::Replay, Box::new(signature)));
                };
                let mut state = [0; 16];
                state[..8].copy_from_slice(&highest.to_be_bytes());
                state[8..].copy_from_slice(&bits.to_be_bytes());
                // Durable, or in memory when the broker keeps no state (`allow_volatile_state`); if even that fails
                // (the state table is full) the message passes with the window unmoved.
                let stored = host::kv_compare_and_set(&state_key, current.as_deref(), &state, true)
                    .or_else(|_| host::kv_compare_and_set(&state_key, current.as_deref(), &state, false));
                if stored != Ok(false) {
                    break;
                }
            }
        }
        Ok(Box::new(signature))
    }

    /// Whether timestamps may refuse messages now (`clock_trust`); counts `verify/clock_untrusted` when not because
    /// the clock is not synchronized.
    fn clock_trusted(&self) -> bool {
        let trusted = match self.clock_trust {
            ClockTrust::Always => true,
            ClockTrust::Never => false,
            ClockTrust::Synchronized => {
                let synchronized = self.clock_synchronized();
                if !synchronized {
                    self.count("verify/clock_untrusted");
                }
                synchronized
            }
        };
        self.show_clock_trust(trusted);
        trusted
    }

    /// The `clock_trusted` gauge (1 or 0), set when it changes.
    fn show_clock_trust(&self, trusted: bool) {
        if self.clock_trusted_gauge.replace(i64::from(trusted)) != i64::from(trusted) {
            host::gauge_set("clock_trusted", i64::from(trusted));
        }
    }

    /// Replaces a verified signature with the broker's, made with the rule's `resign` key for the same `sub` and
    /// expiry, at this instant and with the broker's own counter. The verified one goes away (or into
    /// `x-sig-prev`), and so does an envelope it came in: the receiver sees one signature, in the rule's carrier.
    fn resign(&self, rule: &Rule, kid: &str, verified: Signature, message: &mut Message) -> Outcome<()> {
        take_signatures(message);
        if rule.resign_chain {
            message.user_properties.push(UserProperty { key: PREVIOUS_PROPERTY.to_owned(), value: verified.header() });
        }
        let Some(key) = self.key(kid) else {
            return Err((Failure::SignFailed, Box::new(verified)));
        };
        let exp = if verified.present.exp { verified.exp } else { 0 };
        self.sign(key, verified.sub.clone(), exp, rule.carrier, message)
            .map_err(|(failure, _)| (failure, Box::new(verified)))
    }

    fn attest(&self, rule: &Rule, message: &mut Message) -> Outcome<()> {
        // A client's own signature claims are replaced by the broker's.
        message.user_properties.retain(|property| property.key != PROPERTY);
        let Some(sub) = host::client_attribute(&self.identity_attribute) else {
            return Err((Failure::NoIdentity, Box::default()));
        };
        if !tollgate_sig::valid_name(&sub) {
            return Err((Failure::NoIdentity, Box::default()));
        }
        let Some(key) = rule.key.as_deref().and_then(|kid| self.key(kid)) else {
            return Err((Failure::SignFailed, Box::default()));
        };
        let exp = expiry_ms(message, self.now_ms());
        self.sign(key, sub, exp, rule.carrier, message)
    }

    /// A sign rule's work on one copy: what it carries as a signature goes (or into `x-sig-prev` with `chain`), an
    /// envelope is unwrapped, and the copy is signed for the `sub` at the rule's topic level.
    fn sign_copy(&self, rule: &Rule, message: &mut Message) -> Outcome<()> {
        let previous = take_signatures(message);
        // x-sig-status stays: what this broker found at ingress (tag mode) must not be laundered by signing.
        message.user_properties.retain(|property| property.key != PREVIOUS_PROPERTY);
        if rule.chain {
            for header in previous {
                message.user_properties.push(UserProperty { key: PREVIOUS_PROPERTY.to_owned(), value: header });
            }
        }
        let sub = match rule.sub_level {
            None => String::new(),
            Some(level) => match message.topic.split('/').nth(level) {
                Some(sub) if tollgate_sig::valid_name(sub) && !sub.is_empty() => sub.to_owned(),
                _ => return Err((Failure::NoIdentity, Box::default())),
            },
        };
        let Some(key) = rule.key.as_deref().and_then(|kid| self.key(kid)) else {
            return Err((Failure::SignFailed, Box::default()));
        };
        let exp = expiry_ms(message, self.now_ms());
        self.sign(key, sub, exp, rule.carrier, message)
    }

    /// Signs `message` as this broker (`iss` = site id) with `key` for `sub`, timestamped now and numbered with the
    /// key's counter, which is incremented and written to the state file in one step so it never repeats across
    /// restarts; the signature goes in `carrier`.
    fn sign(&self, key: &Key, sub: String, exp: u64, carrier: Carrier, message: &mut Message) -> Outcome<()> {
        let now = self.now_ms();
        self.check_key_ages(now);
        if key.expired(now) {
            return Err((Failure::ExpiredKid, Box::default()));
        }
        let ctr = self.next_counter(key).ok_or_else(|| (Failure::SignFailed, Box::default()))?;
        let mut signature = Signature {
            alg: key.alg,
            kid: key.kid.clone(),
            sub,
            iss: self.site_id.clone(),
            ts: now,
            ctr,
            exp,
            ..Signature::default()
        };
        let covered = Covered {
            topic: &message.topic,
            retain: message.retain,
            content_type: message.content_type.as_deref(),
            correlation_data: message.correlation_data.as_deref(),
            response_topic: message.response_topic.as_deref(),
            payload: &message.payload,
        };
        let input = tollgate_sig::canonical(&signature, &covered);
        let tag =
            crypto::mac(host_algorithm(key.alg), &key.secret, Self::derive(key, &signature.sub).as_deref(), &input)
                .map_err(|_| (Failure::SignFailed, Box::default()))?;
        signature.mac = tag[..self.mac_len.min(tag.len())].to_vec();
        match carrier {
            Carrier::Property => {
                message.user_properties.push(UserProperty { key: PROPERTY.to_owned(), value: signature.header() });
            }
            Carrier::Envelope => message.payload = tollgate_sig::envelope(&signature, &message.payload),
        }
        Ok(())
    }

    /// The next signing counter of `key`, under a durable reservation (see `counter_reserve`).
    fn next_counter(&self, key: &Key) -> Option<u64> {
        let issued = host::kv_add(&counter_key(&key.kid), 1, false).ok()?;
        let seen = key.reserved.get();
        if issued > seen {
            // Reserve past this counter in one step, even when another instance already reserved some of the way.
            let delta = issued - seen + self.counter_reserve;
            let reservation = reserve_key(&key.kid);
            let reserved =
                host::kv_add(&reservation, delta, true).or_else(|_| host::kv_add(&reservation, delta, false)).ok()?;
            key.reserved.set(reserved);
        }
        Some(issued)
    }

    /// At most once an hour per instance: a security event (and counter) per key within `key_expiry_warning_days`
    /// of its `not_after`, or past it; once a day per key for the whole broker, whatever the instances.
    fn check_key_ages(&self, now: u64) {
        if self.expiry_warning_ms == 0 || now < self.next_expiry_check_ms.get() {
            return;
        }
        self.next_expiry_check_ms.set(now.saturating_add(3_600_000));
        for key in self.keys.iter().filter(|key| key.state != KeyState::Retired) {
            let Some(not_after) = key.not_after_ms else { continue };
            let event = if now >= not_after {
                "key_expired"
            } else if not_after - now <= self.expiry_warning_ms {
                "key_expiring"
            } else {
                continue;
            };
            let day = now / 86_400_000;
            if host::kv_add(&format!("expiry-warned/{}/{day}", key.kid), 1, false) != Ok(1) {
                continue;
            }
            host::kv_delete(&format!("expiry-warned/{}/{}", key.kid, day.saturating_sub(1)));
            host::counter_add(&format!("keys/{event}"), 1);
            let hours_left = (not_after.saturating_sub(now) / 3_600_000).to_string();
            host::security_event(
                host::LogLevel::Warn,
                event,
                &[("kid", &key.kid), ("not_after", &key.not_after_text), ("hours_left", &hours_left)],
            );
        }
    }

    /// Counts a bad MAC against the client in the current minute; true once it reaches `bad_mac_disconnect`. A
    /// client guessing tags, or replaying tampered messages, is cut off rather than answered forever.
    fn too_many_bad_macs(&self, client: &Client) -> bool {
        if self.bad_mac_limit == 0 {
            return false;
        }
        let minute = self.now_ms() / 60_000;
        let count = host::kv_add(&format!("bad-mac/{}/{minute}", client.client_id), 1, false).unwrap_or(u64::MAX);
        if count == 1 {
            // The first of a new minute: the previous minute's count is no longer needed.
            host::kv_delete(&format!("bad-mac/{}/{}", client.client_id, minute.saturating_sub(1)));
        }
        if count >= self.bad_mac_limit {
            host::counter_add("verify/bad_mac_disconnect", 1);
            return true;
        }
        false
    }

    fn fail(
        &self,
        rule: &Rule,
        client: &Client,
        mut message: Message,
        failure: Failure,
        signature: &Signature,
        stripped: bool,
    ) -> TransformResult {
        host::counter_add(&format!("{}/{}", rule_mode(rule), failure.name()), 1);
        // Tags are logged as a 4-byte prefix at most.
        let mac_prefix: String = signature.mac.iter().take(4).map(|b| format!("{b:02x}")).collect();
        // Shadow mode only logs, whatever the rule says.
        let on_fail = if self.enforce { &rule.on_fail } else { &OnFail::Log };
        let action = match on_fail {
            OnFail::Log => "logged",
            OnFail::Tag => "tagged",
            OnFail::Reject => "rejected",
            OnFail::Quarantine(_) => "quarantined",
        };
        host::security_event(
            host::LogLevel::Warn,
            "msg_auth_failed",
            &[
                ("rule", &rule.id),
                ("mode", rule_mode(rule)),
                ("result", failure.name()),
                ("action", action),
                ("client_id", &client.client_id),
                ("topic", &message.topic),
                ("kid", &signature.kid),
                ("sub", &signature.sub),
                ("mac_prefix", &mac_prefix),
            ],
        );
        match on_fail {
            OnFail::Reject => {
                let disconnect = (self.disconnect_v3 && client.protocol != ProtocolVersion::V5)
                    || (failure == Failure::BadMac && self.too_many_bad_macs(client));
                TransformResult::reject(failure.reason(), format!("msg-auth: {}", failure.name()), disconnect)
            }
            OnFail::Tag => {
                message.user_properties.push(UserProperty {
                    key: STATUS_PROPERTY.to_owned(),
                    value: format!("invalid:{}", failure.name()),
                });
                TransformResult::Modified(message)
            }
            OnFail::Quarantine(prefix) if prefix.len() + 1 + message.topic.len() > usize::from(u16::MAX) => {
                // No topic can hold it: refused rather than risk the broker treating a bad answer as a pass.
                TransformResult::reject(failure.reason(), format!("msg-auth: {}", failure.name()), false)
            }
            OnFail::Quarantine(prefix) => {
                host::counter_add("quarantined", 1);
                message.topic = format!("{prefix}/{}", message.topic);
                // A quarantined message must not replace what the real topic retains, nor stay retained itself.
                message.retain = false;
                message.user_properties.push(UserProperty {
                    key: STATUS_PROPERTY.to_owned(),
                    value: format!("invalid:{}", failure.name()),
                });
                TransformResult::Modified(message)
            }
            OnFail::Log if stripped => TransformResult::Modified(message),
            OnFail::Log => TransformResult::Unchanged,
        }
    }
}

export_plugin!(MsgAuth);

#[cfg(test)]
mod tests;
