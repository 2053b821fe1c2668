//! `tollgate sig`: sign and verify msg-auth messages outside the broker, with the key in hand (a backend checking
//! what it received, a script sending a signed command). The format is `tollgate-sig`'s.

use tollgate_sig::{Covered, Signature, keys};

/// The message fields a signature covers, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct MessageArgs {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub content_type: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub response_topic: Option<String>,
}

impl MessageArgs {
    fn covered<'a>(&'a self, payload: &'a [u8]) -> Covered<'a> {
        Covered {
            topic: &self.topic,
            retain: self.retain,
            content_type: self.content_type.as_deref(),
            correlation_data: self.correlation_data.as_deref(),
            response_topic: self.response_topic.as_deref(),
            payload,
        }
    }
}

/// The key: a secret (`hex:`, `env:`, `file:`) and, for per-identity keys, the HKDF info template.
pub struct KeyArgs {
    pub secret: Vec<u8>,
    pub derive: Option<String>,
}

impl KeyArgs {
    fn key_for(&self, alg: tollgate_sig::Algorithm, sub: &str) -> Vec<u8> {
        let info = self.derive.as_deref().map(|template| tollgate_sig::derive_info(template, sub));
        keys::mac_key(alg, &self.secret, info.as_deref())
    }
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Valid(Signature),
    /// The tag does not match: tampered, or another key.
    Invalid(Signature),
    /// No signature, or one that cannot be read.
    Malformed(String),
}

/// Verifies `header` (the `x-sig` property), or without one the envelope at the start of the payload.
pub fn verify(message: &MessageArgs, header: Option<&str>, key: &KeyArgs) -> Verdict {
    let (signature, payload) = match tollgate_sig::carried(header, &message.payload) {
        Ok(Some(found)) => found,
        Ok(None) => return Verdict::Malformed("no --header and the payload is not an envelope".to_owned()),
        Err(error) => return Verdict::Malformed(error.to_string()),
    };
    if keys::verify(&key.key_for(signature.alg, &signature.sub), &signature, &message.covered(payload)) {
        Verdict::Valid(signature)
    } else {
        Verdict::Invalid(signature)
    }
}

/// Signs and returns the header.
pub fn sign(message: &MessageArgs, mut signature: Signature, key: &KeyArgs) -> Result<Signature, String> {
    for (field, value) in
        [("kid", &signature.kid), ("sub", &signature.sub), ("iss", &signature.iss), ("nonce", &signature.nonce)]
    {
        if !tollgate_sig::valid_name(value) || (field == "kid" && value.is_empty()) {
            return Err(format!("--{field} {value:?}: letters, digits, '.', '_', ':' or '-'"));
        }
    }
    signature.present = tollgate_sig::Present {
        sub: !signature.sub.is_empty(),
        iss: !signature.iss.is_empty(),
        ts: true,
        ctr: signature.ctr != 0,
        nonce: !signature.nonce.is_empty(),
        exp: signature.exp != 0,
    };
    let mac_key = key.key_for(signature.alg, &signature.sub);
    keys::sign(&mac_key, &mut signature, &message.covered(&message.payload), 32)
        .map_err(|error| format!("--secret: {error}"))?;
    Ok(signature)
}

/// The verdict as one JSON line.
pub fn describe(verdict: &Verdict) -> serde_json::Value {
    let fields = |signature: &Signature| {
        serde_json::json!({
            "alg": signature.alg.name(), "kid": signature.kid, "sub": signature.sub, "iss": signature.iss,
            "ts": signature.ts, "ctr": signature.ctr, "nonce": signature.nonce, "exp": signature.exp,
        })
    };
    match verdict {
        Verdict::Valid(signature) => serde_json::json!({ "valid": true, "signature": fields(signature) }),
        Verdict::Invalid(signature) => {
            serde_json::json!({ "valid": false, "error": "bad_mac", "signature": fields(signature) })
        }
        Verdict::Malformed(error) => serde_json::json!({ "valid": false, "error": "malformed", "detail": error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_sign_writes_verify_accepts_and_tampering_breaks() {
        let key = KeyArgs { secret: b"master".to_vec(), derive: Some("vin-mac-v1:${sub}".into()) };
        let message =
            MessageArgs { topic: "v1/vehicles/X/cmd/a/req".into(), payload: b"go".to_vec(), ..Default::default() };
        let signature =
            Signature { kid: "cloud-1".into(), sub: "1J9RP1A36A1644345".into(), ts: 5, ctr: 1, ..Default::default() };
        let signed = sign(&message, signature, &key).expect("sign");
        let header = signed.header();
        assert!(matches!(verify(&message, Some(&header), &key), Verdict::Valid(_)));
        let tampered = MessageArgs { payload: b"GO".to_vec(), ..message.clone() };
        assert!(matches!(verify(&tampered, Some(&header), &key), Verdict::Invalid(_)));
        let wrapped = MessageArgs { payload: tollgate_sig::envelope(&signed, b"go"), ..message.clone() };
        assert!(matches!(verify(&wrapped, None, &key), Verdict::Valid(_)));
        assert!(matches!(verify(&message, None, &key), Verdict::Malformed(_)));
        let bad = Signature { kid: "a/b".into(), ..Default::default() };
        assert!(sign(&message, bad, &key).is_err());
    }

    #[test]
    fn cmac_with_a_nonce_signs_and_verifies() {
        let message =
            MessageArgs { topic: "v1/vehicles/X/cmd/a/req".into(), payload: b"go".to_vec(), ..Default::default() };
        let key = KeyArgs { secret: b"0123456789abcdef".to_vec(), derive: None };
        let draft = Signature {
            alg: tollgate_sig::Algorithm::CmacAes128,
            kid: "tcu-1".into(),
            nonce: "r4nd0m".into(),
            ..Default::default()
        };
        let signed = sign(&message, draft.clone(), &key).expect("sign");
        assert_eq!(signed.mac.len(), 16);
        assert!(signed.header().contains(";nonce=r4nd0m;"));
        assert!(matches!(verify(&message, Some(&signed.header()), &key), Verdict::Valid(_)));
        let short = KeyArgs { secret: b"too short".to_vec(), derive: None };
        assert!(sign(&message, draft, &short).expect_err("not an AES key").contains("16-byte"));
    }
}
