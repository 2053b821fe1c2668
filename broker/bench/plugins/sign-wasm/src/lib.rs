//! The benchmark's WebAssembly transform: every inbound message gets a `sig` user property holding the hex
//! HMAC-SHA256 of its payload, computed by the host with the secret `k1`. It is the work a signing gateway does on
//! every message, through the full component boundary (payload in, modified message out, one host call).

use tollgate_sdk::prelude::*;

pub struct SignAll;

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Plugin for SignAll {
    const NAME: &'static str = "bench-sign";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const HOOKS: &'static [Hook] = &[Hook::Transform];

    fn init(_config: Config) -> Result<Self, String> {
        Ok(SignAll)
    }

    fn on_publish(&self, _client: &Client, mut message: Message) -> TransformResult {
        match crypto::hmac_sha256("k1", &message.payload) {
            Ok(tag) => {
                let mut value = String::with_capacity(tag.len() * 2);
                for byte in tag {
                    value.push(char::from(HEX[usize::from(byte >> 4)]));
                    value.push(char::from(HEX[usize::from(byte & 15)]));
                }
                message.user_properties.push(UserProperty { key: "sig".into(), value });
                TransformResult::Modified(message)
            }
            Err(error) => TransformResult::Drop(error),
        }
    }
}

export_plugin!(SignAll);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_with_the_host_key() {
        tollgate_sdk::testing::set_secret("k1", b"key");
        let message = Message::new("t", b"The quick brown fox jumps over the lazy dog".to_vec());
        let client = Client::new("c", None);
        let TransformResult::Modified(signed) = SignAll.on_publish(&client, message) else { panic!("not signed") };
        assert_eq!(signed.user_properties[0].value, "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
    }
}
