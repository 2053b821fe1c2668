//! API-key authentication: a client connects with its user name and its API key as the password. The plugin's
//! configuration holds the SHA-256 of each key, never the key itself:
//!
//! ```toml
//! [plugins.config.keys]
//! sensor-1 = "<sha256 hex of the key>"   # echo -n 'the-key' | sha256sum
//! ```
//!
//! Unknown users and wrong keys are refused with "bad user name or password"; clients without a user name are
//! left to the rest of the chain (`[auth] allow_anonymous = false` turns them away), and every key is checked in constant time.

use std::collections::BTreeMap;

use tollgate_sdk::prelude::*;

pub struct ApiKeyAuth {
    /// User name → SHA-256 of the API key.
    keys: BTreeMap<String, Vec<u8>>,
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 {
        return None;
    }
    (0..text.len()).step_by(2).map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok()).collect()
}

/// Compares without an early exit, so the time taken says nothing about how much of a key was right.
fn same_digest(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len() && left.iter().zip(right).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

impl Plugin for ApiKeyAuth {
    const NAME: &'static str = "api-key-auth";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const HOOKS: &'static [Hook] = &[Hook::Authenticate];

    fn init(config: Config) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for (user, digest) in config.table("keys") {
            let digest =
                decode_hex(digest).ok_or_else(|| format!("keys.{user}: expected 64 hex digits (a SHA-256)"))?;
            keys.insert(user.to_owned(), digest);
        }
        if keys.is_empty() {
            return Err("no keys configured: add [plugins.config.keys] <user> = \"<sha256 hex>\"".to_owned());
        }
        host::info(&format!("{} API keys loaded", keys.len()));
        Ok(ApiKeyAuth { keys })
    }

    fn on_connect(&self, info: &ConnectInfo) -> ConnectDecision {
        let Some(user) = &info.username else { return ConnectDecision::Ignore };
        let presented = crypto::sha256(info.password.as_deref().unwrap_or_default());
        match self.keys.get(user) {
            Some(expected) if same_digest(expected, &presented) => {
                host::counter_add("accepted", 1);
                ConnectDecision::Allow(vec![("api-key-user".to_owned(), user.clone())])
            }
            _ => {
                host::counter_add("refused", 1);
                ConnectDecision::Deny(DenyReason::BadCredentials)
            }
        }
    }
}

export_plugin!(ApiKeyAuth);

#[cfg(test)]
impl std::fmt::Debug for ApiKeyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyAuth").field("users", &self.keys.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_SHA256: &str = "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92"; // "123456"

    fn connect(user: Option<&str>, password: &[u8]) -> ConnectInfo {
        ConnectInfo {
            client_id: "c1".into(),
            username: user.map(str::to_owned),
            username_from_certificate: false,
            password: Some(password.to_vec()),
            protocol: ProtocolVersion::V5,
            remote_addr: None,
            listener: "tcp".into(),
            peer: None,
            auth_method: None,
            auth_data: None,
        }
    }

    #[test]
    fn accepts_the_right_key_only() {
        let plugin = ApiKeyAuth::init([("keys.sensor-1", KEY_SHA256)].into_iter().collect()).expect("init");
        assert!(matches!(plugin.on_connect(&connect(Some("sensor-1"), b"123456")), ConnectDecision::Allow(_)));
        assert!(matches!(
            plugin.on_connect(&connect(Some("sensor-1"), b"123457")),
            ConnectDecision::Deny(DenyReason::BadCredentials)
        ));
        assert!(matches!(
            plugin.on_connect(&connect(Some("stranger"), b"123456")),
            ConnectDecision::Deny(DenyReason::BadCredentials)
        ));
        assert!(matches!(plugin.on_connect(&connect(None, b"")), ConnectDecision::Ignore));
    }

    #[test]
    fn refuses_bad_configuration() {
        assert!(ApiKeyAuth::init(Config::default()).is_err());
        assert!(ApiKeyAuth::init([("keys.a", "abc")].into_iter().collect()).expect_err("refused").contains("keys.a"));
    }
}
