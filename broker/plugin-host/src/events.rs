//! `tollgate plugin test`: replays recorded hook events (JSON Lines) against one plugin, without a broker, and
//! describes each decision as one JSON line. See `sdk/README.md` for the event format.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_hooks::{
    AclDecision, Action, AuthDecision, Authenticator, Authorizer, BridgeRouter, ClientInfo, ConnectRequest,
    DisconnectCause, HookError, Message, PeerIdentity, ProtocolVersion, QoS, RouteDecision, RouteDirection,
    SessionObserver, TransformDecision, Transformer,
};
use tollgate_protocol::UserProperty;

use crate::PluginHook;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cert {
    #[serde(default)]
    subject: String,
    common_name: Option<String>,
    subject_serial_number: Option<String>,
    #[serde(default)]
    organizational_units: Vec<String>,
    #[serde(default)]
    san_uri: Vec<String>,
    #[serde(default)]
    san_dns: Vec<String>,
    #[serde(default)]
    serial: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFields {
    #[serde(default = "default_client_id")]
    client_id: String,
    username: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default = "default_listener")]
    listener: String,
    cert: Option<Cert>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

fn default_client_id() -> String {
    "test-client".into()
}

fn default_listener() -> String {
    "tcp".into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
enum Protocol {
    #[serde(rename = "3.1")]
    V31,
    #[serde(rename = "3.1.1")]
    V311,
    #[default]
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageFields {
    topic: String,
    /// UTF-8 payload; `payload_hex` for binary.
    payload: Option<String>,
    payload_hex: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "hook", rename_all = "snake_case")]
enum Event {
    Authenticate {
        #[serde(flatten)]
        client: ClientFields,
        password: Option<String>,
        auth_method: Option<String>,
        auth_data_hex: Option<String>,
    },
    AuthorizePublish {
        #[serde(flatten)]
        client: ClientFields,
        topic: String,
        #[serde(default)]
        qos: u8,
        #[serde(default)]
        retain: bool,
        #[serde(default)]
        will: bool,
    },
    AuthorizeSubscribe {
        #[serde(flatten)]
        client: ClientFields,
        filter: String,
        #[serde(default)]
        qos: u8,
        share_group: Option<String>,
    },
    AuthorizeSession {
        #[serde(flatten)]
        client: ClientFields,
    },
    Transform {
        #[serde(flatten)]
        client: ClientFields,
        #[serde(flatten)]
        message: MessageFields,
    },
    /// A subscriber's copy: the client fields describe the subscriber.
    Deliver {
        #[serde(flatten)]
        client: ClientFields,
        #[serde(flatten)]
        message: MessageFields,
    },
    Route {
        #[serde(default = "default_direction")]
        direction: String,
        bridge: String,
        #[serde(flatten)]
        message: MessageFields,
    },
    /// The session hook's `on-connected`.
    Connected {
        #[serde(flatten)]
        client: ClientFields,
    },
    /// The session hook's `on-disconnected`; `cause` as plugins see it (`client-disconnect`, …).
    Disconnected {
        #[serde(flatten)]
        client: ClientFields,
        #[serde(default = "default_cause")]
        cause: String,
    },
}

fn default_cause() -> String {
    DisconnectCause::ClientDisconnect.as_str().into()
}

fn default_direction() -> String {
    "egress".into()
}

fn qos(value: u8) -> Result<QoS, String> {
    QoS::from_u8(value).ok_or_else(|| format!("qos {value} is not 0, 1 or 2"))
}

fn client_info(fields: ClientFields) -> ClientInfo {
    ClientInfo {
        client_id: fields.client_id.into(),
        username: fields.username.map(Into::into),
        protocol: match fields.protocol {
            Protocol::V31 => ProtocolVersion::V31,
            Protocol::V311 => ProtocolVersion::V311,
            Protocol::V5 => ProtocolVersion::V5,
        },
        remote_addr: None,
        listener: fields.listener.into(),
        peer: fields.cert.map(|cert| {
            Arc::new(PeerIdentity {
                subject: cert.subject,
                common_name: cert.common_name,
                subject_serial_number: cert.subject_serial_number,
                organizational_units: cert.organizational_units,
                san_dns: cert.san_dns,
                san_uri: cert.san_uri,
                serial: cert.serial,
                ..Default::default()
            })
        }),
        attributes: Arc::new(fields.attributes),
    }
}

fn message(fields: MessageFields) -> Result<Message, String> {
    let payload = match (fields.payload, fields.payload_hex) {
        (Some(_), Some(_)) => return Err("give payload or payload_hex, not both".into()),
        (Some(text), None) => Bytes::from(text.into_bytes()),
        (None, Some(digits)) => Bytes::from(hex::decode(digits).map_err(|error| format!("payload_hex: {error}"))?),
        (None, None) => Bytes::new(),
    };
    Ok(Message {
        topic: fields.topic.into(),
        payload,
        qos: qos(fields.qos)?,
        retain: fields.retain,
        user_properties: fields.user_properties.into_iter().map(|(key, value)| UserProperty { key, value }).collect(),
        content_type: fields.content_type,
        ..Default::default()
    })
}

fn describe_message(message: &Message) -> Value {
    let payload = match std::str::from_utf8(&message.payload) {
        Ok(text) => json!({ "payload": text }),
        Err(_) => json!({ "payload_hex": hex::encode(&message.payload) }),
    };
    let mut value = json!({
        "topic": &*message.topic,
        "qos": message.qos as u8,
        "retain": message.retain,
        "user_properties": message.user_properties.iter().map(|property| [&property.key, &property.value]).collect::<Vec<_>>(),
    });
    if let (Value::Object(map), Value::Object(extra)) = (&mut value, payload) {
        map.extend(extra);
    }
    value
}

fn failed(error: HookError) -> Value {
    json!({ "decision": "failed", "error": error.to_string() })
}

/// Runs one event and describes the decision.
async fn run(hook: &PluginHook, event: Event) -> Result<Value, String> {
    Ok(match event {
        Event::Authenticate { client, password, auth_method, auth_data_hex } => {
            let client = client_info(client);
            let request = ConnectRequest {
                client_id: client.client_id.clone(),
                username: client.username.clone(),
                username_from_certificate: false,
                password: password.map(|password| Bytes::from(password.into_bytes())),
                protocol: client.protocol,
                remote_addr: None,
                listener: client.listener.clone(),
                peer: client.peer.clone(),
                authentication_method: auth_method,
                authentication_data: match auth_data_hex {
                    Some(digits) => {
                        Some(Bytes::from(hex::decode(digits).map_err(|error| format!("auth_data_hex: {error}"))?))
                    }
                    None => None,
                },
            };
            match hook.authenticate(&request).await {
                Ok(AuthDecision::Allow { attributes }) => json!({ "decision": "allow", "attributes": attributes }),
                Ok(AuthDecision::Deny { reason, message }) => {
                    json!({ "decision": "deny", "reason_code": reason.0, "message": message })
                }
                Ok(AuthDecision::Continue { data }) => {
                    json!({ "decision": "challenge", "data_hex": data.map(hex::encode) })
                }
                Ok(AuthDecision::Abstain) => json!({ "decision": "ignore" }),
                Err(error) => failed(error),
            }
        }
        Event::AuthorizePublish { client, topic, qos: level, retain, will } => {
            let level = qos(level)?;
            let action = if will {
                Action::Will { topic: &topic, qos: level, retain }
            } else {
                Action::Publish { topic: &topic, qos: level, retain }
            };
            describe_acl(hook.authorize(&client_info(client), &action).await)
        }
        Event::AuthorizeSubscribe { client, filter, qos: level, share_group } => {
            let action = Action::Subscribe { filter: &filter, qos: qos(level)?, share_group: share_group.as_deref() };
            describe_acl(hook.authorize(&client_info(client), &action).await)
        }
        Event::AuthorizeSession { client } => {
            describe_acl(hook.authorize(&client_info(client), &Action::Session).await)
        }
        Event::Transform { client, message: fields } => {
            let mut message = message(fields)?;
            let result = hook.transform_inbound(&client_info(client), &mut message).await;
            describe_transform(result, &message)
        }
        Event::Deliver { client, message: fields } => {
            let mut message = message(fields)?;
            let result = hook.transform_outbound(&client_info(client), &mut message).await;
            describe_transform(result, &message)
        }
        Event::Route { direction, bridge, message: fields } => {
            let direction = match direction.as_str() {
                "egress" => RouteDirection::Egress,
                "ingress" => RouteDirection::Ingress,
                other => return Err(format!("direction {other:?} is not \"egress\" or \"ingress\"")),
            };
            match hook.route(direction, &bridge, &message(fields)?).await {
                Ok(RouteDecision::Forward) => json!({ "decision": "forward" }),
                Ok(RouteDecision::Rewrite { topic }) => json!({ "decision": "rewrite", "topic": topic }),
                Ok(RouteDecision::Drop) => json!({ "decision": "drop" }),
                Ok(RouteDecision::Abstain) => json!({ "decision": "ignore" }),
                Err(error) => failed(error),
            }
        }
        // A session hook is told, not asked: "told" when it took the news without failing.
        Event::Connected { client } => match hook.connected(&client_info(client)).await {
            Ok(()) => json!({ "decision": "told" }),
            Err(error) => failed(error),
        },
        Event::Disconnected { client, cause } => {
            let Some(cause) = DisconnectCause::ALL.into_iter().find(|known| known.as_str() == cause) else {
                let known: Vec<&str> = DisconnectCause::ALL.iter().map(|cause| cause.as_str()).collect();
                return Err(format!("cause {cause:?} is not one of {}", known.join(", ")));
            };
            match hook.disconnected(&client_info(client), cause).await {
                Ok(()) => json!({ "decision": "told" }),
                Err(error) => failed(error),
            }
        }
    })
}

fn describe_transform(result: Result<TransformDecision, HookError>, message: &Message) -> Value {
    match result {
        Ok(TransformDecision::Keep) => json!({ "decision": "unchanged" }),
        Ok(TransformDecision::Modified) => json!({ "decision": "modified", "message": describe_message(message) }),
        Ok(TransformDecision::Drop { reason }) => json!({ "decision": "drop", "reason": reason }),
        Ok(TransformDecision::Reject { reason, message, disconnect }) => json!({
            "decision": "reject", "reason_code": reason.0, "reason": message, "disconnect": disconnect
        }),
        Err(error) => failed(error),
    }
}

fn describe_acl(result: Result<AclDecision, HookError>) -> Value {
    match result {
        Ok(AclDecision::Allow) => json!({ "decision": "allow" }),
        Ok(AclDecision::AllowMaxQos(qos)) => json!({ "decision": "allow", "max_qos": qos as u8 }),
        Ok(AclDecision::Deny(reason)) => json!({ "decision": "deny", "reason_code": reason.0 }),
        Ok(AclDecision::Abstain) => json!({ "decision": "ignore" }),
        Err(error) => failed(error),
    }
}

/// Counts of a replay, for the exit status.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub events: usize,
    /// Lines that were not valid events.
    pub invalid: usize,
    /// Calls where the plugin failed (trap, limit, bad answer).
    pub failed: usize,
}

/// Replays every non-empty, non-`#` line of `input`, writing one JSON line per event to `out`.
pub async fn replay(hook: &PluginHook, input: &str, out: &mut dyn std::io::Write) -> std::io::Result<ReplaySummary> {
    let mut summary = ReplaySummary::default();
    for (index, line) in input.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let number = index + 1;
        // Parsed once as JSON: the hook's name is echoed in the output, the rest becomes the event.
        let parsed = serde_json::from_str::<Value>(line).and_then(|value| {
            let hook_name = value.get("hook").and_then(Value::as_str).map(str::to_owned);
            serde_json::from_value::<Event>(value).map(|event| (hook_name, event))
        });
        let result = match parsed {
            Ok((hook_name, event)) => run(hook, event).await.map(|mut decision| {
                if let Value::Object(map) = &mut decision {
                    map.insert("line".into(), number.into());
                    map.insert("hook".into(), hook_name.into());
                }
                decision
            }),
            Err(error) => Err(error.to_string()),
        };
        let output = match result {
            Ok(decision) => {
                summary.events += 1;
                if decision.get("decision").and_then(Value::as_str) == Some("failed") {
                    summary.failed += 1;
                }
                decision
            }
            Err(error) => {
                summary.invalid += 1;
                json!({ "line": number, "error": format!("invalid event: {error}") })
            }
        };
        writeln!(out, "{output}")?;
    }
    Ok(summary)
}
