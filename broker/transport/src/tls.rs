//! rustls server configuration from PEM files, and its reload.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::TransportError;

/// What a `tls` or `wss` listener is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server certificate, followed by any intermediates (PEM).
    pub cert: PathBuf,
    /// Its private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.
    pub key: PathBuf,
    /// CA bundle client certificates are verified against; without it no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// Refuse clients that present no certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// Certificate revocation lists (PEM) checked for client certificates.
    pub crl: Vec<PathBuf>,
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TransportError {
    TransportError::File { path: path.to_owned(), reason: reason.to_string() }
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(path, error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, error))?;
    if certificates.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certificates)
}

/// Builds the rustls configuration: TLS 1.2 and 1.3 only (rustls has nothing older), the ring provider.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TransportError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates(&settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|error| file_error(&settings.key, error))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TransportError::Tls)?;
    let builder = match &settings.client_ca {
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in read_certificates(ca_path)? {
                roots.add(certificate).map_err(|error| file_error(ca_path, error))?;
            }
            let mut crls = Vec::new();
            for crl_path in &settings.crl {
                for crl in CertificateRevocationListDer::pem_file_iter(crl_path)
                    .map_err(|error| file_error(crl_path, error))?
                {
                    crls.push(crl.map_err(|error| file_error(crl_path, error))?);
                }
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).with_crls(crls);
            if !settings.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|error| file_error(ca_path, error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => {
            if settings.require_client_cert {
                return Err(TransportError::Config("require_client_cert needs client_ca".into()));
            }
            builder.with_no_client_auth()
        }
    };
    let config = builder.with_single_cert(chain, key).map_err(|error| {
        file_error(&settings.key, format!("does not match the certificate in {}: {error}", settings.cert.display()))
    })?;
    Ok(Arc::new(config))
}

/// A TLS acceptor whose certificates can be re-read while connections stay up: established sessions keep the
/// configuration they were made with, new handshakes get the new one.
pub struct ReloadableTls {
    settings: TlsSettings,
    current: RwLock<TlsAcceptor>,
}

impl ReloadableTls {
    pub fn new(settings: TlsSettings) -> Result<Self, TransportError> {
        let acceptor = TlsAcceptor::from(server_config(&settings)?);
        Ok(Self { settings, current: RwLock::new(acceptor) })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Re-reads the files; on any error the running configuration stays.
    pub fn reload(&self) -> Result<(), TransportError> {
        let acceptor = TlsAcceptor::from(server_config(&self.settings)?);
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = acceptor;
        Ok(())
    }
}
