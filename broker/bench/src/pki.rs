//! Certificates for the TLS scenarios, generated once per run: a CA, a server certificate for 127.0.0.1 (given to
//! every broker) and one client certificate per simulated car, each carrying a valid VIN the way a vehicle's
//! certificate does (CN and SAN URI `urn:vin:<VIN>`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    roots: Arc<RootCertStore>,
    pub cars: Vec<Car>,
}

pub struct Car {
    pub vin: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
}

/// The `n`th of a series of distinct, valid North-American VINs (check digit enforced there).
pub fn vin(n: usize) -> String {
    // WMI "1TG", descriptor "BN82" + placeholder, check digit at 9, model year A, plant 1, serial 6 digits.
    let draft = format!("1TGBN82X0A1{:06}", n % 1_000_000);
    let check = vin_acl::vin::expected_check_digit(&draft).unwrap_or('0');
    let mut vin: Vec<char> = draft.chars().collect();
    vin[8] = check;
    vin.into_iter().collect()
}

impl Pki {
    /// Writes `ca.pem`, `server.pem` and `server.key` into `dir` and issues `cars` client certificates in memory.
    pub fn generate(dir: &Path, cars: usize) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = DistinguishedName::new();
        ca.distinguished_name.push(DnType::CommonName, "tollgate-bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::default();
        server.distinguished_name = DistinguishedName::new();
        server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        server.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let pki_path = |name: &str| dir.join(name);
        std::fs::write(pki_path("ca.pem"), ca_cert.pem())?;
        std::fs::write(pki_path("server.pem"), server_cert.pem())?;
        std::fs::write(pki_path("server.key"), server_key.serialize_pem())?;

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).context("CA certificate")?;
        let mut list = Vec::with_capacity(cars);
        for n in 0..cars {
            let vin = vin(n);
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, vin.as_str());
            params.subject_alt_names = vec![SanType::URI(format!("urn:vin:{vin}").as_str().try_into()?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer)?;
            list.push(Car { vin, chain: vec![cert.der().clone()], key: PrivatePkcs8KeyDer::from(key.serialize_der()) });
        }
        Ok(Pki {
            ca: pki_path("ca.pem"),
            server_cert: pki_path("server.pem"),
            server_key: pki_path("server.key"),
            roots: Arc::new(roots),
            cars: list,
        })
    }

    /// A client configuration trusting the CA, presenting car `car`'s certificate if given. Session resumption is
    /// off, so every connection pays for a full handshake, as a fleet reconnecting after an outage does.
    pub fn client_config(&self, car: Option<usize>) -> Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone());
        let mut config = match car {
            None => builder.with_no_client_auth(),
            Some(index) => {
                let car = self.cars.get(index).ok_or_else(|| anyhow!("no certificate for car {index}"))?;
                builder.with_client_auth_cert(car.chain.clone(), PrivateKeyDer::Pkcs8(car.key.clone_key()))?
            }
        };
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn car_vins_are_distinct_and_pass_the_plugins_own_check() {
        let policy = vin_acl::vin::VinPolicy { model_year_strict: true, ..Default::default() };
        let vins: std::collections::HashSet<String> = (0..2000).map(vin).collect();
        assert_eq!(vins.len(), 2000);
        for vin in &vins {
            let warnings = policy.validate(vin).unwrap_or_else(|error| panic!("{vin}: {error:?}"));
            assert!(warnings.0.is_empty(), "{vin}: {warnings:?}");
        }
    }

    #[test]
    fn every_car_gets_a_working_client_configuration() {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-pki-test-{}", std::process::id()));
        let pki = Pki::generate(&dir, 3).expect("generate");
        assert!(pki.ca.is_file() && pki.server_cert.is_file() && pki.server_key.is_file());
        for car in [None, Some(0), Some(2)] {
            let config = pki.client_config(car).expect("client config");
            assert_eq!(config.client_auth_cert_resolver.has_certs(), car.is_some());
        }
        assert!(pki.client_config(Some(3)).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
