//! What a verified client certificate says about its holder, and which part of it becomes the MQTT identity.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use tollgate_hooks::PeerIdentity;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// How a listener turns a client certificate into the MQTT identity (`identity_from`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum IdentitySource {
    /// The subject's common name.
    CommonName,
    /// The first URI subject alternative name starting with the prefix, without the prefix
    /// (`san_uri:urn:vin:` turns `urn:vin:1HGCM82633A004352` into `1HGCM82633A004352`).
    SanUri { prefix: String },
    /// The subject's serialNumber attribute (not the certificate serial).
    SubjectSerial,
    /// The certificate is verified but names nobody.
    #[default]
    None,
}

impl FromStr for IdentitySource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cn" => Ok(Self::CommonName),
            "subject_serial" => Ok(Self::SubjectSerial),
            "none" => Ok(Self::None),
            _ => match text.strip_prefix("san_uri:") {
                Some(prefix) if !prefix.is_empty() => Ok(Self::SanUri { prefix: prefix.to_owned() }),
                _ => Err(format!(
                    "{text:?} is not one of \"cn\", \"san_uri:<prefix>\" (with a non-empty prefix), \"subject_serial\", \"none\""
                )),
            },
        }
    }
}

impl fmt::Display for IdentitySource {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CommonName => formatter.write_str("cn"),
            Self::SanUri { prefix } => write!(formatter, "san_uri:{prefix}"),
            Self::SubjectSerial => formatter.write_str("subject_serial"),
            Self::None => formatter.write_str("none"),
        }
    }
}

impl IdentitySource {
    /// The identity this source picks from a peer, if the certificate carries one.
    pub fn select(&self, peer: &PeerIdentity) -> Option<String> {
        let identity = match self {
            Self::CommonName => peer.common_name.clone(),
            Self::SanUri { prefix } => {
                peer.san_uri.iter().find_map(|uri| uri.strip_prefix(prefix.as_str())).map(str::to_owned)
            }
            Self::SubjectSerial => peer.subject_serial_number.clone(),
            Self::None => None,
        }?;
        // An empty identity would become an empty user name, which matches no `%u` rule anyone meant.
        (!identity.is_empty()).then_some(identity)
    }
}

/// Reads the identity fields of a DER certificate. The certificate has already been verified by rustls; a
/// certificate x509-parser cannot read yields `None`.
pub fn peer_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let subject = certificate.subject();
    let attribute_strings = |values: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
        values.into_iter().filter_map(|value| value.as_str().ok().map(str::to_owned)).collect::<Vec<_>>()
    };
    let mut identity = PeerIdentity {
        subject: subject.to_string(),
        common_name: attribute_strings(subject.iter_common_name().collect()).into_iter().next(),
        subject_serial_number: attribute_strings(
            subject.iter_by_oid(&x509_parser::oid_registry::OID_X509_SERIALNUMBER).collect(),
        )
        .into_iter()
        .next(),
        organizational_units: attribute_strings(subject.iter_organizational_unit().collect()),
        serial: certificate.raw_serial_as_string().replace(':', "").to_ascii_lowercase(),
        issuer: certificate.issuer().to_string(),
        fingerprint_sha256: Sha256::digest(der).iter().map(|byte| format!("{byte:02x}")).collect(),
        ..PeerIdentity::default()
    };
    if let Ok(Some(names)) = certificate.subject_alternative_name() {
        for name in &names.value.general_names {
            match name {
                GeneralName::DNSName(dns) => identity.san_dns.push((*dns).to_owned()),
                GeneralName::URI(uri) => identity.san_uri.push((*uri).to_owned()),
                GeneralName::RFC822Name(email) => identity.san_email.push((*email).to_owned()),
                _ => {}
            }
        }
    }
    Some(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerIdentity {
        PeerIdentity {
            common_name: Some("1HGCM82633A004352".into()),
            subject_serial_number: Some("SN-77".into()),
            san_uri: vec!["https://example.com".into(), "urn:vin:1HGCM82633A004352".into()],
            ..PeerIdentity::default()
        }
    }

    #[test]
    fn sources_parse_and_print_back() {
        for text in ["cn", "san_uri:urn:vin:", "subject_serial", "none"] {
            let source: IdentitySource = text.parse().expect("valid source");
            assert_eq!(source.to_string(), text);
        }
        for bad in ["", "CN", "san_uri:", "san_uri", "serial"] {
            assert!(bad.parse::<IdentitySource>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn each_source_selects_its_field() {
        let peer = peer();
        assert_eq!(IdentitySource::CommonName.select(&peer).as_deref(), Some("1HGCM82633A004352"));
        assert_eq!(
            IdentitySource::SanUri { prefix: "urn:vin:".into() }.select(&peer).as_deref(),
            Some("1HGCM82633A004352")
        );
        assert_eq!(IdentitySource::SanUri { prefix: "urn:other:".into() }.select(&peer), None);
        assert_eq!(IdentitySource::SubjectSerial.select(&peer).as_deref(), Some("SN-77"));
        assert_eq!(IdentitySource::None.select(&peer), None);
        let nameless = PeerIdentity { common_name: Some(String::new()), ..PeerIdentity::default() };
        assert_eq!(IdentitySource::CommonName.select(&nameless), None);
    }

    #[test]
    fn identity_read_from_a_real_certificate() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["car.local".into()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, "1HGCM82633A004352");
        params.subject_alt_names.push(rcgen::SanType::URI("urn:vin:1HGCM82633A004352".try_into().expect("uri")));
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name("fleet@example.com".try_into().expect("email")));
        let certificate = params.self_signed(&key).expect("certificate");
        let identity = peer_identity(certificate.der()).expect("parsed");
        assert_eq!(identity.common_name.as_deref(), Some("1HGCM82633A004352"));
        assert_eq!(identity.san_dns, vec!["car.local".to_owned()]);
        assert_eq!(identity.san_uri, vec!["urn:vin:1HGCM82633A004352".to_owned()]);
        assert_eq!(identity.san_email, vec!["fleet@example.com".to_owned()]);
        assert!(identity.subject.contains("CN=1HGCM82633A004352"), "{}", identity.subject);
        assert_eq!(identity.fingerprint_sha256.len(), 64);
        assert!(!identity.serial.is_empty());
        assert_eq!(peer_identity(b"not a certificate"), None);
    }
}
