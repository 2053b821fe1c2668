//! Behaviour by topic prefix (the same table as `tests/plugins/testkit.lua`):
//!
//! | prefix | authorize_publish | on_publish |
//! |---|---|---|
//! | `deny/` | deny (not authorized) | |
//! | `quota/` | deny (quota exceeded) | |
//! | `loop/` | loops forever | loops forever |
//! | `oom/` | allocates without bound | allocates without bound |
//! | `trap/` | panics | panics |
//! | `slow/<ms>` | busy-waits that long, then allows | busy-waits, then unchanged |
//! | `upper/` | | payload upper-cased |
//! | `drop/` | | dropped |
//! | `sign/` | | user property `sig` = hex HMAC-SHA256 (key id `k1`) of the payload |
//! | `rewrite/<rest>` | | topic becomes `rewritten/<rest>` |
//! | `refuse/` | | rejected (not authorized, reason string "testkit refuses") |
//! | `cut/` | | rejected and the client disconnected |
//! | `batch/` | | user property `batch` = how many messages the call carried (`transform-batch`; 1 otherwise) |
//! | `short/` | | in a `transform-batch` call: no results at all, for any message (a broken answer) |
//! | `undecided/` | in an `authz-batch` call: no decisions at all, for any request (a broken answer) | |
//!
//! Every `authz-batch` call counts itself and its requests in the counters `acl_batch_calls` and
//! `acl_batch_requests`.
//!
//! Subscriptions to `capped/#`-style filters are granted QoS 0 at most; `deny/` filters are refused. CONNECT with
//! user name `blocked` is refused; `loop` as user name loops. Routes: `local/` dropped, `outbound-only/` dropped
//! coming in (ingress), `bridge/<rest>` rewritten to `remote/<rest>`. In strict mode a recheck ends sessions of
//! clients whose id starts with `seen-revoked`. Connections of clients whose id starts with `seen-` are counted
//! (`connected`, `disconnected/<cause>`, the gauge `online`); `seen-trap` makes both session calls trap after counting.

use tollgate_sdk::prelude::*;

pub struct Testkit {
    /// `mode = "strict"` denies every publish not explicitly allowed: used to test reload.
    strict: bool,
}

fn misbehave(topic: &str) {
    if topic.starts_with("loop/") {
        let mut counter: u64 = 0;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
    if topic.starts_with("oom/") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    if topic.starts_with("trap/") {
        panic!("testkit asked to trap on {topic}");
    }
    if let Some(millis) = topic.strip_prefix("slow/").and_then(|rest| rest.split('/').next()?.parse::<u64>().ok()) {
        let until = host::now_ms() + millis;
        while host::now_ms() < until {
            std::hint::spin_loop();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl Plugin for Testkit {
    const NAME: &'static str = "testkit";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const HOOKS: &'static [Hook] =
        &[Hook::Authenticate, Hook::Authorize, Hook::Transform, Hook::Deliver, Hook::Route, Hook::Session];

    fn init(config: Config) -> Result<Self, String> {
        if config.get("fail_init") == Some("true") {
            return Err("asked to fail".to_owned());
        }
        Ok(Testkit { strict: config.get("mode") == Some("strict") })
    }

    fn on_connect(&self, info: &ConnectInfo) -> ConnectDecision {
        match info.username.as_deref() {
            Some("blocked") => ConnectDecision::Deny(DenyReason::NotAuthorized),
            Some("loop") => {
                misbehave("loop/");
                ConnectDecision::Ignore
            }
            _ => ConnectDecision::Ignore,
        }
    }

    fn authorize_publish(
        &self,
        _client: &Client,
        topic: &str,
        _qos: Qos,
        _retain: bool,
        _kind: PublishKind,
    ) -> AclDecision {
        misbehave(topic);
        if topic.starts_with("deny/") {
            AclDecision::Deny(DenyReason::NotAuthorized)
        } else if topic.starts_with("quota/") {
            AclDecision::Deny(DenyReason::QuotaExceeded)
        } else if self.strict && !topic.starts_with("allowed/") {
            AclDecision::Deny(DenyReason::NotAuthorized)
        } else {
            AclDecision::Ignore
        }
    }

    /// As the SDK's own loop, counted; a batch holding an `undecided/` request answers no decisions at all.
    fn authorize_publish_batch(&self, client: &Client, requests: Vec<PublishRequest>) -> Vec<AclDecision> {
        host::counter_add("acl_batch_calls", 1);
        host::counter_add("acl_batch_requests", requests.len() as u64);
        if requests.iter().any(|request| request.topic.starts_with("undecided/")) {
            return Vec::new();
        }
        requests
            .iter()
            .map(|request| {
                self.authorize_publish(client, &request.topic, request.qos, request.retain, PublishKind::Publish)
            })
            .collect()
    }

    /// In strict mode, a recheck ends the sessions of clients whose id starts with `seen-revoked`.
    fn authorize_session(&self, client: &Client) -> AclDecision {
        if self.strict && client.client_id.starts_with("seen-revoked") {
            AclDecision::Deny(DenyReason::NotAuthorized)
        } else {
            AclDecision::Ignore
        }
    }

    fn authorize_subscribe(
        &self,
        _client: &Client,
        filter: &str,
        _qos: Qos,
        _share_group: Option<&str>,
    ) -> AclDecision {
        if filter.starts_with("capped/") {
            AclDecision::AllowMaxQos(Qos::AtMostOnce)
        } else if filter.starts_with("deny/") {
            AclDecision::Deny(DenyReason::NotAuthorized)
        } else {
            AclDecision::Ignore
        }
    }

    fn on_publish(&self, _client: &Client, mut message: Message) -> TransformResult {
        let topic = message.topic.clone();
        misbehave(&topic);
        // gauge/<name>/<value> sets that gauge.
        if let Some((name, value)) = topic.strip_prefix("gauge/").and_then(|rest| rest.split_once('/'))
            && let Ok(value) = value.parse::<i64>()
        {
            host::gauge_set(name, value);
            return TransformResult::Unchanged;
        }
        // once/<rest> passes the first time in a minute and is dropped after (a de-duplicating claim).
        if topic.starts_with("once/") {
            return if host::kv_claim(&topic, 60_000) {
                TransformResult::Unchanged
            } else {
                TransformResult::Drop("seen already".to_owned())
            };
        }
        if topic.starts_with("upper/") {
            message.payload = message.payload.to_ascii_uppercase();
            TransformResult::Modified(message)
        } else if topic.starts_with("drop/") {
            TransformResult::Drop("testkit drops drop/ topics".to_owned())
        } else if topic.starts_with("sign/") {
            match crypto::hmac_sha256("k1", &message.payload) {
                Ok(tag) => {
                    message.user_properties.push(UserProperty { key: "sig".into(), value: hex(&tag) });
                    TransformResult::Modified(message)
                }
                Err(error) => TransformResult::Drop(error),
            }
        } else if let Some(rest) = topic.strip_prefix("rewrite/") {
            message.topic = format!("rewritten/{rest}");
            TransformResult::Modified(message)
        } else if topic.starts_with("refuse/") || topic.starts_with("cut/") {
            TransformResult::Reject(Rejection {
                reason: DenyReason::NotAuthorized,
                message: "testkit refuses".to_owned(),
                disconnect: topic.starts_with("cut/"),
            })
        } else if topic.starts_with("batch/") {
            message.user_properties.push(UserProperty { key: "batch".into(), value: "1".into() });
            TransformResult::Modified(message)
        } else {
            TransformResult::Unchanged
        }
    }

    /// As the SDK's own loop, plus: `batch/` messages learn the batch's size, and a batch holding a `short/`
    /// message answers no results at all (a broken plugin).
    fn on_publish_batch(&self, client: &Client, messages: Vec<Message>) -> Vec<TransformResult> {
        if messages.iter().any(|message| message.topic.starts_with("short/")) {
            return Vec::new();
        }
        let size = messages.len().to_string();
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            let mut result = self.on_publish(client, message);
            if let TransformResult::Modified(modified) = &mut result {
                for property in modified.user_properties.iter_mut().filter(|property| property.key == "batch") {
                    property.value.clone_from(&size);
                }
            }
            let disconnects = matches!(&result, TransformResult::Reject(rejection) if rejection.disconnect);
            results.push(result);
            if disconnects {
                break;
            }
        }
        results
    }

    /// Each subscriber's copy: on `per/` topics a subscriber whose id starts with "blind" gets nothing, the others
    /// a copy addressed to them; `per/trap/…`, `per/loop/…` misbehave like the other hooks.
    fn on_deliver(&self, subscriber: &Client, mut message: Message) -> TransformResult {
        let Some(rest) = message.topic.strip_prefix("per/") else {
            return TransformResult::Unchanged;
        };
        misbehave(rest);
        if subscriber.client_id.starts_with("blind") {
            return TransformResult::Drop("not for this subscriber".to_owned());
        }
        message.user_properties.push(UserProperty { key: "to".into(), value: subscriber.client_id.clone() });
        TransformResult::Modified(message)
    }

    fn route(&self, direction: RouteDirection, _bridge: &str, message: &Message) -> RouteDecision {
        if message.topic.starts_with("local/")
            || (matches!(direction, RouteDirection::Ingress) && message.topic.starts_with("outbound-only/"))
        {
            RouteDecision::Drop
        } else if let Some(rest) = message.topic.strip_prefix("bridge/") {
            RouteDecision::Rewrite(format!("remote/{rest}"))
        } else {
            RouteDecision::Ignore
        }
    }

    fn on_connected(&self, client: &Client) {
        if client.client_id.starts_with("seen-") {
            host::counter_add("connected", 1);
            host::gauge_add("online", 1);
            if client.client_id == "seen-trap" {
                panic!("testkit asked to trap on connect");
            }
        }
    }

    fn on_disconnected(&self, client: &Client, cause: DisconnectCause) {
        if client.client_id.starts_with("seen-") {
            host::counter_add(&format!("disconnected/{}", cause.as_str()), 1);
            host::gauge_add("online", -1);
            if client.client_id == "seen-trap" {
                panic!("testkit asked to trap on disconnect");
            }
        }
    }
}

export_plugin!(Testkit);

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::new("c", None)
    }

    #[test]
    fn native_logic_matches_the_table() {
        let plugin = Testkit::init(Config::default()).expect("init");
        let decide = |topic| plugin.authorize_publish(&client(), topic, Qos::AtMostOnce, false, PublishKind::Publish);
        assert!(matches!(decide("deny/x"), AclDecision::Deny(DenyReason::NotAuthorized)));
        assert!(matches!(decide("ok/x"), AclDecision::Ignore));
        tollgate_sdk::testing::set_secret("k1", b"secret");
        let message = Message::new("sign/a", b"hello".to_vec());
        match plugin.on_publish(&client(), message) {
            TransformResult::Modified(signed) => assert_eq!(signed.user_properties[0].value.len(), 64),
            _ => panic!("sign/ must be signed"),
        }
    }
}
