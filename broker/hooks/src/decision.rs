//! Typed decisions returned by hooks and by the chain.

use std::collections::BTreeMap;

use bytes::Bytes;
use tollgate_protocol::{QoS, ReasonCode};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthDecision {
    /// Accept; the attributes are attached to the client for later hooks.
    Allow { attributes: BTreeMap<String, String> },
    /// Refuse with a CONNACK reason code (mapped to a 3.1.1 return code for old clients).
    Deny { reason: ReasonCode, message: Option<String> },
    /// Enhanced authentication: send AUTH 0x18 with this data and wait for the client's answer.
    Continue { data: Option<Bytes> },
    /// Not this hook's decision; ask the next one.
    Abstain,
}

impl AuthDecision {
    pub fn allow() -> Self {
        AuthDecision::Allow { attributes: BTreeMap::new() }
    }

    pub fn deny(reason: ReasonCode) -> Self {
        AuthDecision::Deny { reason, message: None }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclDecision {
    Allow,
    /// Allow, but a subscription is granted at most this QoS (and a publish is accepted at most at it).
    AllowMaxQos(QoS),
    Deny(ReasonCode),
    Abstain,
}

/// What the chain concluded for an authorization request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclOutcome {
    Allow { max_qos: QoS },
    Deny(ReasonCode),
}

impl AclOutcome {
    pub fn is_allowed(self) -> bool {
        matches!(self, AclOutcome::Allow { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransformDecision {
    /// The message is unchanged.
    Keep,
    /// The hook changed the message in place.
    Modified,
    /// Stop here: the message is acknowledged but not delivered.
    Drop { reason: String },
    /// Stop here and refuse the message: a v5 publisher gets `reason` in its PUBACK/PUBREC (with `message` as the
    /// reason string); with `disconnect` the client is also disconnected, which is the only refusal 3.1.1 has.
    Reject { reason: ReasonCode, message: String, disconnect: bool },
}

/// What the chain concluded for a transform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransformOutcome {
    Deliver,
    Drop { hook: String, reason: String },
    Reject { hook: String, reason: ReasonCode, message: String, disconnect: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteDecision {
    Forward,
    Rewrite { topic: String },
    Drop,
    Abstain,
}
