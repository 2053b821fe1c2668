//! `tollgate certs`: a development CA, server certificates and client certificates, made with rcgen. Private keys
//! are written readable by the owner only; nothing here is meant for production PKI.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";

/// Files one command wrote.
#[derive(Debug)]
pub struct Written {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    // A little slack backwards, for clocks of small devices that run behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
}

fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists (use --force to replace it)", path.display());
    }
    if !private {
        return std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()));
    }
    crate::write_private(path, contents).with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode when truncated; make sure a replaced key is private too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(())
}

fn san(name: &str) -> anyhow::Result<SanType> {
    Ok(match name.parse::<IpAddr>() {
        Ok(address) => SanType::IpAddress(address),
        Err(_) => SanType::DnsName(name.try_into().with_context(|| format!("{name:?} is not a DNS name"))?),
    })
}

/// Creates `ca.pem`/`ca.key` and `server.pem`/`server.key` in `dir` for the given host names and addresses.
pub fn init(dir: &Path, hosts: &[String], days: u32, force: bool) -> anyhow::Result<(Written, Written)> {
    if hosts.is_empty() {
        bail!("at least one --host is needed");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "Tollgate development CA");
    ca.distinguished_name.push(DnType::OrganizationName, "Tollgate");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca, days.max(1) * 4);
    let ca_certificate = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::default();
    server.distinguished_name = DistinguishedName::new();
    server.distinguished_name.push(DnType::CommonName, hosts[0].as_str());
    server.subject_alt_names = hosts.iter().map(|host| san(host)).collect::<anyhow::Result<_>>()?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    server.use_authority_key_identifier_extension = true;
    validity(&mut server, days);
    let server_certificate = server.signed_by(&server_key, &issuer)?;

    let ca_files = Written { certificate: dir.join(CA_CERT), key: dir.join(CA_KEY) };
    let server_files = Written { certificate: dir.join(SERVER_CERT), key: dir.join(SERVER_KEY) };
    for path in [&ca_files.certificate, &ca_files.key, &server_files.certificate, &server_files.key] {
        if path.exists() && !force {
            bail!("{} exists (use --force to replace it)", path.display());
        }
    }
    write_file(&ca_files.key, &issuer.key().serialize_pem(), true, force)?;
    write_file(&ca_files.certificate, &ca_certificate.pem(), false, force)?;
    write_file(&server_files.key, &server_key.serialize_pem(), true, force)?;
    write_file(&server_files.certificate, &server_certificate.pem(), false, force)?;
    Ok((ca_files, server_files))
}

/// What a client certificate says about its holder.
#[derive(Debug, Default)]
pub struct ClientSubject {
    pub common_name: String,
    pub san_uris: Vec<String>,
    pub subject_serial: Option<String>,
}

/// Issues a client certificate signed by the CA in `dir`, written as `<name>.pem` and `<name>.key`.
pub fn client(dir: &Path, subject: &ClientSubject, name: &str, days: u32, force: bool) -> anyhow::Result<Written> {
    if subject.common_name.is_empty() {
        bail!("--cn must not be empty");
    }
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        bail!("{name:?} is not a usable file name");
    }
    let ca_pem = std::fs::read_to_string(dir.join(CA_CERT))
        .with_context(|| format!("reading {} (run `tollgate certs init` first)", dir.join(CA_CERT).display()))?;
    let ca_key_pem =
        std::fs::read_to_string(dir.join(CA_KEY)).with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).with_context(|| format!("{}", dir.join(CA_KEY).display()))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).with_context(|| format!("{}", dir.join(CA_CERT).display()))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, subject.common_name.as_str());
    if let Some(serial) = &subject.subject_serial {
        // serialNumber (2.5.4.5) in the subject, for `identity_from = "subject_serial"`.
        params.distinguished_name.push(DnType::CustomDnType(vec![2, 5, 4, 5]), serial.as_str());
    }
    for uri in &subject.san_uris {
        params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().with_context(|| format!("{uri:?}"))?));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let certificate = params.signed_by(&key, &issuer)?;
    let written = Written { certificate: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
    if written.certificate.exists() && !force {
        bail!("{} exists (use --force to replace it)", written.certificate.display());
    }
    write_file(&written.key, &key.serialize_pem(), true, force)?;
    write_file(&written.certificate, &certificate.pem(), false, force)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_client_produce_a_chain_rustls_accepts() {
        let dir = std::env::temp_dir().join(format!("tollgate-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (ca, server) = init(&dir, &["localhost".into(), "127.0.0.1".into()], 30, false).expect("init");
        assert!(init(&dir, &["localhost".into()], 30, false).is_err(), "existing files are not replaced silently");
        let subject = ClientSubject {
            common_name: "1HGCM82633A004352".into(),
            san_uris: vec!["urn:vin:1HGCM82633A004352".into()],
            subject_serial: None,
        };
        let car = client(&dir, &subject, "car", 30, false).expect("client");
        #[cfg(unix)]
        for key in [&ca.key, &server.key, &car.key] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key).expect("key written").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let settings = tollgate_transport::TlsSettings {
            cert: server.certificate.clone(),
            key: server.key.clone(),
            client_ca: Some(ca.certificate.clone()),
            require_client_cert: true,
            crl: Vec::new(),
        };
        tollgate_transport::tls::server_config(&settings).expect("rustls accepts the generated files");
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_file(&car.certificate).expect("client certificate");
        let identity = tollgate_transport::peer_identity(der.as_ref()).expect("parsed");
        assert_eq!(identity.common_name.as_deref(), Some("1HGCM82633A004352"));
        assert_eq!(identity.san_uri, vec!["urn:vin:1HGCM82633A004352".to_owned()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
