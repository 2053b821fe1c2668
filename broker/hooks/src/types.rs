//! Plain data handed to hooks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tollgate_protocol::{ProtocolVersion, QoS, UserProperty};

/// Identity taken from a verified TLS client certificate. Filled by the TLS transport.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub subject: String,
    pub common_name: Option<String>,
    pub subject_serial_number: Option<String>,
    pub organizational_units: Vec<String>,
    pub san_dns: Vec<String>,
    pub san_uri: Vec<String>,
    pub san_email: Vec<String>,
    pub serial: String,
    pub issuer: String,
    /// SHA-256 of the DER certificate, lower-case hex.
    pub fingerprint_sha256: String,
}

/// What an authenticator sees of a CONNECT.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    pub client_id: Arc<str>,
    pub username: Option<Arc<str>>,
    /// The user name is the identity of a verified client certificate (`use_identity_as_username`), not what the
    /// client sent.
    pub username_from_certificate: bool,
    pub password: Option<Bytes>,
    pub protocol: ProtocolVersion,
    pub remote_addr: Option<SocketAddr>,
    pub listener: Arc<str>,
    pub peer: Option<Arc<PeerIdentity>>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
}

/// One client AUTH packet in an enhanced-authentication exchange.
#[derive(Clone, Debug)]
pub struct AuthStep {
    pub method: String,
    pub data: Option<Bytes>,
}

/// An authenticated client, as every later hook call sees it.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub client_id: Arc<str>,
    pub username: Option<Arc<str>>,
    pub protocol: ProtocolVersion,
    pub remote_addr: Option<SocketAddr>,
    pub listener: Arc<str>,
    pub peer: Option<Arc<PeerIdentity>>,
    /// Attributes an authenticator attached on success (roles, tenant, token claims).
    pub attributes: Arc<BTreeMap<String, String>>,
}

/// What a client asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action<'a> {
    Publish {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
    Subscribe {
        filter: &'a str,
        qos: QoS,
        share_group: Option<&'a str>,
    },
    /// The will message from CONNECT, checked before the connection is accepted.
    Will {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
    /// A live message about to be delivered to a subscriber (Mosquitto's per-message read check).
    Receive {
        topic: &'a str,
    },
    /// A retained message about to be replayed to a new subscription.
    ReceiveRetained {
        topic: &'a str,
    },
    /// May this client keep its connection and session? Asked of every live and persisted session when policy
    /// changes (a reload, a periodic recheck), so a revoked identity loses access it already had.
    Session,
}

impl Action<'_> {
    /// A delivery to this client ([`Action::Receive`], [`Action::ReceiveRetained`]) rather than something it asks
    /// to do. Asked once per delivered message, so the chain skips hooks that never decide it.
    pub fn is_read(&self) -> bool {
        matches!(self, Action::Receive { .. } | Action::ReceiveRetained { .. })
    }

    pub fn topic(&self) -> &str {
        match self {
            Action::Publish { topic, .. }
            | Action::Will { topic, .. }
            | Action::ReceiveRetained { topic }
            | Action::Receive { topic } => topic,
            Action::Subscribe { filter, .. } => filter,
            Action::Session => "",
        }
    }
}

/// A message as transform and route hooks see and modify it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub user_properties: Vec<UserProperty>,
    pub content_type: Option<String>,
    pub payload_format_indicator: Option<u8>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub message_expiry_interval: Option<u32>,
}

/// Why a connection ended, as session observers are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectCause {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost,
    KeepAliveTimeout,
    /// A new connection with the same client id took the session over.
    TakenOver,
    /// The client broke the protocol.
    ProtocolError,
    /// A hook refused something and asked for the client to go.
    Policy,
    /// A recheck after a policy change no longer allows the client.
    Revoked,
    ServerShutdown,
}

impl DisconnectCause {
    pub const ALL: [DisconnectCause; 8] = [
        Self::ClientDisconnect,
        Self::ConnectionLost,
        Self::KeepAliveTimeout,
        Self::TakenOver,
        Self::ProtocolError,
        Self::Policy,
        Self::Revoked,
        Self::ServerShutdown,
    ];

    /// The name plugins see (the WIT enum's case, Lua's string).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client-disconnect",
            Self::ConnectionLost => "connection-lost",
            Self::KeepAliveTimeout => "keep-alive-timeout",
            Self::TakenOver => "taken-over",
            Self::ProtocolError => "protocol-error",
            Self::Policy => "policy",
            Self::Revoked => "revoked",
            Self::ServerShutdown => "server-shutdown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteDirection {
    /// From this broker towards the remote one.
    Egress,
    /// From the remote broker into this one.
    Ingress,
}
