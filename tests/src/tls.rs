//! TLS clients for the tests: rumqttc over rustls (ring), trusting the development CA that `tollgate certs` made.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A client configuration trusting `certs/ca.pem`, presenting `certs/<client>.pem` if given.
pub fn client_config(certs: &Path, client: Option<&str>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(certs.join("ca.pem")).expect("ca") {
        roots.add(certificate.expect("ca certificate")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(name) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(certs.join(format!("{name}.pem")))
                    .expect("client chain")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client chain"),
                PrivateKeyDer::from_pem_file(certs.join(format!("{name}.key"))).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// MQTT 5 options for a TLS connection to `addr` under the name `localhost`, which the server certificate names.
pub fn tls_options(addr: SocketAddr, client_id: &str, certs: &Path, client: Option<&str>) -> rumqttc::v5::MqttOptions {
    // The server certificate names `localhost`; connect to the loopback address under that name.
    let mut options = rumqttc::v5::MqttOptions::new(client_id, "localhost", addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(client_config(certs, client))));
    options
}
