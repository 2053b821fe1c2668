//! Transports and identity (issue #3): TCP, TLS, mutual TLS, WebSockets and WebSockets over TLS with real
//! clients, certificate identity as the user name, refusals, and the abuse limits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Command;
use tollgate::config::{Config, ListenerConfig};
use tollgate_integration_tests::external::{self, clean_env, describe, run, tollgate_bin};
use tollgate_integration_tests::tls::tls_options;
use tollgate_integration_tests::{QUIET, TestBroker, raw, v5, within};
use tollgate_protocol::{ProtocolVersion, ReasonCode};

const VIN: &str = "1HGCM82633A004352";
const OTHER_VIN: &str = "WVWZZZ1JZXW000001";

/// A development CA, server certificate and two car certificates, made by the code behind `tollgate certs`.
fn make_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    tollgate::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()], 30, false).expect("certs init");
    for vin in [VIN, OTHER_VIN] {
        let subject = tollgate::certs::ClientSubject {
            common_name: vin.into(),
            san_uris: vec![format!("urn:vin:{vin}")],
            subject_serial: None,
        };
        tollgate::certs::client(&certs, &subject, vin, 30, false).expect("client certificate");
    }
    certs
}

fn tls_listener(protocol: &str, certs: &Path) -> ListenerConfig {
    let mut listener = ListenerConfig::tcp("127.0.0.1:0");
    listener.protocol = protocol.into();
    listener.cert = Some(certs.join("server.pem"));
    listener.key = Some(certs.join("server.key"));
    listener.client_ca = Some(certs.join("ca.pem"));
    listener
}

fn plain_listener(protocol: &str) -> ListenerConfig {
    let mut listener = ListenerConfig::tcp("127.0.0.1:0");
    listener.protocol = protocol.into();
    listener
}

const PAHO_WS_PUBLISH: &str = r#"
import sys, threading, paho.mqtt.client as mqtt
port, tls, ca, topic = int(sys.argv[1]), sys.argv[2] == "wss", sys.argv[3], sys.argv[4]
done = threading.Event()
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-" + sys.argv[2], transport="websockets", protocol=mqtt.MQTTv5)
client.ws_set_options(path="/mqtt")
if tls:
    client.tls_set(ca_certs=ca)
client.connect("localhost", port)
client.loop_start()
info = client.publish(topic, b"from paho over " + sys.argv[2].encode() + b" " + b"x" * 70000, qos=1)
info.wait_for_publish(10)
client.disconnect()
client.loop_stop()
print("published", info.rc)
"#;

#[tokio::test]
async fn the_same_message_flows_over_tcp_tls_ws_and_wss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.listeners = vec![
                plain_listener("tcp"),
                tls_listener("tls", &certs),
                plain_listener("ws"),
                tls_listener("wss", &certs),
            ];
        })
        .start()
        .await;
    let [_, tls_addr, ws_addr, wss_addr] = broker.server.addresses[..] else { panic!("four listeners") };

    let mut watcher = v5::options(&broker, "watcher");
    watcher.set_max_packet_size(Some(1 << 20));
    let (mut subscriber, _) = v5::connect(watcher).await;
    subscriber.subscribe_ok("flow/#", QoS::AtLeastOnce).await;

    // rumqttc over TLS, without and with a client certificate (optional on this listener).
    for (client, topic) in [(None, "flow/tls"), (Some(VIN), "flow/mtls")] {
        let (mut publisher, _) = v5::connect(tls_options(tls_addr, topic, &certs, client)).await;
        publisher.publish(topic, QoS::AtLeastOnce, false, topic.as_bytes()).await;
        let received = subscriber.next_publish().await;
        assert_eq!(v5::topic(&received), topic);
        assert_eq!(&received.payload[..], topic.as_bytes());
        publisher.disconnect().await;
    }

    if let Some(mosquitto_pub) = external::require_tool("mosquitto_pub", "apt-get install mosquitto-clients") {
        let output = run(
            clean_env(&mut Command::new(mosquitto_pub)).args([
                "-h",
                "localhost",
                "-p",
                &tls_addr.port().to_string(),
                "--cafile",
                &certs.join("ca.pem").to_string_lossy(),
                "--cert",
                &certs.join(format!("{VIN}.pem")).to_string_lossy(),
                "--key",
                &certs.join(format!("{VIN}.key")).to_string_lossy(),
                "-q",
                "1",
                "-t",
                "flow/mosquitto",
                "-m",
                "from mosquitto_pub over TLS",
            ]),
            Duration::from_secs(20),
        )
        .await;
        assert!(output.status.success(), "mosquitto_pub over TLS: {}", describe(&output));
        let received = subscriber.next_publish().await;
        assert_eq!(v5::topic(&received), "flow/mosquitto");
    }

    if let Some(python) = external::require_paho() {
        for (protocol, addr) in [("ws", ws_addr), ("wss", wss_addr)] {
            let topic = format!("flow/{protocol}");
            let output = run(
                clean_env(&mut Command::new(&python)).args([
                    "-c",
                    PAHO_WS_PUBLISH,
                    &addr.port().to_string(),
                    protocol,
                    &certs.join("ca.pem").to_string_lossy(),
                    &topic,
                ]),
                Duration::from_secs(30),
            )
            .await;
            assert!(output.status.success(), "paho over {protocol}: {}", describe(&output));
            let received = subscriber.next_publish().await;
            assert_eq!(v5::topic(&received), topic);
            // 70 kB: larger than one read and, for the client, several WebSocket frames' worth of TCP segments.
            assert!(received.payload.len() > 70_000);
            assert!(received.payload.starts_with(format!("from paho over {protocol}").as_bytes()));
        }
    }
    subscriber.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn a_car_certificate_reaches_only_its_own_vin_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    let broker = TestBroker::builder()
        .allow_anonymous(false)
        .acl("pattern readwrite vehicle/%u/#\n")
        .configure(|config: &mut Config| {
            let mut listener = tls_listener("tls", &certs);
            listener.require_client_cert = true;
            listener.use_identity_as_username = true;
            listener.identity_from = "cn".into();
            config.listeners = vec![listener];
        })
        .start()
        .await;
    let addr = broker.server.addresses[0];

    // The user name the car claims is ignored: the certificate decides.
    let mut own = tls_options(addr, "car-a", &certs, Some(VIN));
    own.set_credentials(OTHER_VIN, "");
    let (mut car, _) = v5::connect(own).await;
    let (mut other_car, _) = v5::connect(tls_options(addr, "car-b", &certs, Some(OTHER_VIN))).await;
    other_car.subscribe_ok(&format!("vehicle/{OTHER_VIN}/#"), QoS::AtLeastOnce).await;

    car.subscribe_ok(&format!("vehicle/{VIN}/#"), QoS::AtLeastOnce).await;
    car.publish(&format!("vehicle/{VIN}/status"), QoS::AtLeastOnce, false, b"online").await;
    assert_eq!(v5::topic(&car.next_publish().await), format!("vehicle/{VIN}/status"));

    assert!(
        !matches!(
            car.subscribe(&format!("vehicle/{OTHER_VIN}/#"), QoS::AtLeastOnce).await,
            SubscribeReasonCode::Success(_)
        ),
        "subscribing to another car's topics is refused"
    );
    assert!(!matches!(car.subscribe("vehicle/#", QoS::AtLeastOnce).await, SubscribeReasonCode::Success(_)));
    car.publish_with(&format!("vehicle/{OTHER_VIN}/command"), QoS::AtMostOnce, false, b"unlock", Default::default())
        .await;
    other_car.expect_no_publish(Duration::from_millis(300)).await;

    // A client without a certificate does not get past TLS.
    let refused = v5::try_connect(tls_options(addr, "no-cert", &certs, None)).await;
    assert!(refused.is_err(), "a client without a certificate was accepted");
    car.disconnect().await;
    other_car.disconnect().await;
    assert!(broker.stop().await);
}

/// The development CA of `tollgate certs init` in `certs`, as an rcgen issuer.
fn dev_ca(certs: &Path) -> rcgen::Issuer<'static, rcgen::KeyPair> {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).expect("ca key")).expect("key");
    rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(certs.join("ca.pem")).expect("ca"), key).expect("ca")
}

/// A certificate for `cn` issued by `issuer` (or self-signed by a throwaway CA), valid in the given window.
fn rogue_certificate(dir: &Path, name: &str, issuer: Option<&Path>, expired: bool) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, VIN);
    let now = time::OffsetDateTime::now_utc();
    if expired {
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
    }
    let issuer = match issuer {
        Some(certs) => dev_ca(certs),
        None => {
            let ca_key = rcgen::KeyPair::generate().expect("key");
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.distinguished_name.push(rcgen::DnType::CommonName, "Some other CA");
            rcgen::Issuer::new(ca, ca_key)
        }
    };
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    std::fs::write(dir.join(format!("{name}.pem")), certificate.pem()).expect("write");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write");
}

/// A TLS 1.0 ClientHello (record and handshake version 3.1, no supported_versions extension), as an old client
/// sends it.
fn tls10_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x01];
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // TLS_RSA_WITH_AES_128/256_CBC_SHA
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn foreign_expired_and_tls10_clients_are_refused_and_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    rogue_certificate(&certs, "foreign", None, false);
    rogue_certificate(&certs, "expired", Some(&certs), true);
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    let config = format!(
        "[[listeners]]\nbind = \"127.0.0.1:{port}\"\nprotocol = \"tls\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nrequire_client_cert = true\n\n[sys]\ninterval = 0\n",
        certs.join("server.pem"),
        certs.join("server.key"),
        certs.join("ca.pem"),
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config).expect("config");
    let mut broker = external::spawn(clean_env(&mut Command::new(tollgate_bin())).args([
        "run",
        "--config",
        &config_path.to_string_lossy(),
    ]));
    broker
        .stderr_until(Duration::from_secs(20), |line| line.contains("tollgate running").then_some(()))
        .await
        .unwrap_or_else(|seen| panic!("broker did not start: {seen:?}"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    // The good certificate works: the refusals below are about the certificates, not the setup.
    let (good, _) = v5::connect(tls_options(addr, "good", &certs, Some(VIN))).await;
    good.disconnect().await;
    for name in ["foreign", "expired"] {
        let attempt = v5::try_connect(tls_options(addr, name, &certs, Some(name))).await;
        assert!(attempt.is_err(), "{name} certificate accepted");
    }
    let mut old_client = TcpStream::connect(addr).await.expect("connect");
    old_client.write_all(&tls10_client_hello()).await.expect("hello");
    let mut answer = Vec::new();
    let _ = within("TLS 1.0 refusal", old_client.read_to_end(&mut answer)).await;
    assert_eq!(answer.first(), Some(&0x15), "an alert record answers a TLS 1.0 hello: {answer:?}");

    let mut reasons = Vec::new();
    while reasons.len() < 3 {
        let line = broker
            .stderr_until(Duration::from_secs(10), |line| {
                line.contains("TLS handshake refused").then(|| line.to_owned())
            })
            .await
            .unwrap_or_else(|seen| {
                panic!("only {} refusal(s) logged: {reasons:?}; other lines: {seen:?}", reasons.len())
            });
        reasons.push(line);
    }
    let all = reasons.join("\n");
    assert!(all.contains("UnknownIssuer"), "foreign CA reason missing:\n{all}");
    assert!(all.to_lowercase().contains("expired"), "expiry reason missing:\n{all}");
    assert!(all.to_lowercase().contains("version") || all.contains("incompatible"), "TLS 1.0 reason missing:\n{all}");
    broker.signal("TERM");
    assert!(broker.wait(Duration::from_secs(10)).await.success());
}

async fn connect_from(source: &str, addr: SocketAddr) -> raw::RawClient<TcpStream> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source")).expect("bind");
    let stream = socket.connect(addr).await.expect("connect");
    raw::RawClient::new(stream, ProtocolVersion::V5, source)
}

#[tokio::test]
async fn connection_caps_and_per_address_rate_limit_spare_other_clients() {
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.limits.max_connections = 3;
            config.limits.max_connection_rate = 5;
        })
        .start()
        .await;
    let addr = broker.addr;

    // A flood from one address: five connections within the second pass the rate limit (burst), three of them
    // fit under max_connections. The refused are told why: 0x97 Quota exceeded for the cap, 0x9F Connection rate
    // exceeded for the rate.
    let mut flood = Vec::new();
    let mut refused = Vec::new();
    for index in 0..8 {
        let mut client = connect_from("127.0.0.2", addr).await;
        client
            .send(&tollgate_protocol::Packet::Connect(
                raw::connect_packet(ProtocolVersion::V5, &format!("f{index}")).into(),
            ))
            .await;
        match client.recv_within(Duration::from_secs(2)).await {
            Some(raw::Received::Packet(tollgate_protocol::Packet::ConnAck(ack)))
                if ack.reason_code == ReasonCode::SUCCESS =>
            {
                flood.push(client)
            }
            Some(raw::Received::Packet(tollgate_protocol::Packet::ConnAck(ack))) => {
                refused.push(ack.reason_code);
                let after = client.recv_within(Duration::from_secs(2)).await;
                assert!(matches!(after, Some(raw::Received::Closed)), "closed after the CONNACK: {after:?}");
            }
            other => panic!("attempt {index}: {other:?}"),
        }
    }
    // At most three are open at once (max_connections), and the rate limit refused the rest.
    assert_eq!(flood.len(), 3, "max_connections = 3");
    assert_eq!(refused.len(), 5, "{refused:?}");
    let quota = refused.iter().filter(|&&code| code == ReasonCode::QUOTA_EXCEEDED).count();
    let rate = refused.iter().filter(|&&code| code == ReasonCode::CONNECTION_RATE_EXCEEDED).count();
    // The fourth and fifth had rate tokens; the last had none unless a token was refilled (one per 200 ms).
    assert!(quota >= 2 && rate >= 1 && quota + rate == 5, "{refused:?}");
    // An MQTT 3.1.1 client has no such codes: it gets 0x03 Server unavailable.
    let stream = connect_from("127.0.0.2", addr).await.into_inner();
    let mut old = raw::RawClient::new(stream, ProtocolVersion::V311, "old");
    old.send(&tollgate_protocol::Packet::Connect(raw::connect_packet(ProtocolVersion::V311, "old").into())).await;
    match old.recv_within(Duration::from_secs(2)).await {
        Some(raw::Received::Packet(tollgate_protocol::Packet::ConnAck(ack))) => {
            assert_eq!(ack.reason_code.to_v3_connack(), 0x03, "{ack:?}")
        }
        other => panic!("3.1.1 refusal: {other:?}"),
    }
    // Room again once one leaves, and another address is not rate limited.
    flood.pop().expect("one").disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut neighbour = connect_from("127.0.0.3", addr).await;
    assert_eq!(neighbour.connect_ok(ProtocolVersion::V5, "neighbour").await.reason_code, ReasonCode::SUCCESS);
    neighbour.disconnect().await;
    drop(flood);
    assert!(broker.stop().await);
}

#[tokio::test]
async fn a_publish_flood_disconnects_the_flooder_and_not_its_neighbours() {
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.limits.max_publish_rate = 50;
            config.limits.max_publish_bytes_rate = 4_000;
        })
        .start()
        .await;
    let mut subscriber = v5::connect_to(&broker, "steady-sub").await;
    subscriber.subscribe_ok("steady/#", QoS::AtLeastOnce).await;
    let mut steady = v5::connect_to(&broker, "steady-pub").await;

    // Message rate: the 51st PUBLISH within a second ends the connection with 0x96.
    let mut flooder = raw::tcp(broker.addr, ProtocolVersion::V5).await;
    flooder.connect_ok(ProtocolVersion::V5, "flooder").await;
    for _ in 0..60 {
        flooder
            .send(&tollgate_protocol::Packet::Publish(raw::publish_packet(
                "flood/x",
                tollgate_protocol::QoS::AtMostOnce,
                None,
                b"!",
            )))
            .await;
    }
    flooder.expect_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH).await;

    // Byte quota: v5 QoS 1 beyond 4000 payload bytes in the second is refused with 0x97, the connection stays.
    let mut heavy = raw::tcp(broker.addr, ProtocolVersion::V5).await;
    heavy.connect_ok(ProtocolVersion::V5, "heavy").await;
    let big = vec![b'x'; 3_000];
    assert_eq!(
        heavy.publish_qos1(raw::publish_packet("heavy/a", tollgate_protocol::QoS::AtLeastOnce, Some(1), &big)).await,
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
    assert_eq!(
        heavy.publish_qos1(raw::publish_packet("heavy/b", tollgate_protocol::QoS::AtLeastOnce, Some(2), &big)).await,
        ReasonCode::QUOTA_EXCEEDED
    );

    // A 3.1.1 client cannot be told, so it is disconnected.
    let mut old = raw::tcp(broker.addr, ProtocolVersion::V311).await;
    old.connect_ok(ProtocolVersion::V311, "old-flooder").await;
    for _ in 0..60 {
        old.send(&tollgate_protocol::Packet::Publish(raw::publish_packet(
            "flood/y",
            tollgate_protocol::QoS::AtMostOnce,
            None,
            b"!",
        )))
        .await;
    }
    old.expect_closed().await;

    for index in 0..5u8 {
        steady.publish("steady/t", QoS::AtLeastOnce, false, &[index]).await;
        assert_eq!(&subscriber.next_publish().await.payload[..], &[index]);
    }
    steady.disconnect().await;
    subscriber.disconnect().await;
    drop((flooder, heavy, old));
    assert!(broker.stop().await);
}

#[tokio::test]
async fn a_tls_socket_that_never_says_hello_is_closed_at_the_connect_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.limits.connect_timeout = 1;
            config.listeners = vec![plain_listener("tcp"), tls_listener("tls", &certs)];
        })
        .start()
        .await;
    let tls_addr = broker.server.addresses[1];
    let mut silent = TcpStream::connect(tls_addr).await.expect("connect");
    let started = std::time::Instant::now();
    let mut buffer = [0u8; 16];
    let read = within("slowloris close", silent.read(&mut buffer)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "expected the socket closed, read {read:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
    // Meanwhile a well-behaved client is served.
    let client = v5::connect_to(&broker, "patient").await;
    client.disconnect().await;
    assert!(broker.stop().await);
}

/// Writes `crl.pem`, signed by the development CA, revoking the certificates of `revoked` (file stems in `certs`).
fn write_crl(certs: &Path, revoked: &[&str], number: u64) -> PathBuf {
    let issuer = dev_ca(certs);
    let now = time::OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|name| {
            let der = CertificateDer::from_pem_file(certs.join(format!("{name}.pem"))).expect("certificate");
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).expect("parse");
            rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(parsed.tbs_certificate.raw_serial()),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(1),
        next_update: now + time::Duration::days(7),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)
    .expect("crl");
    let path = certs.join("crl.pem");
    std::fs::write(&path, crl.pem().expect("pem")).expect("write");
    path
}

/// A revoked client certificate does not get past TLS; a reload with a longer revocation list refuses the newly
/// revoked car's next handshake while its established connection keeps working (reloads never cut connections).
#[tokio::test]
async fn revoked_certificates_are_refused_and_a_reload_spares_live_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    let crl = write_crl(&certs, &[OTHER_VIN], 1);
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            let mut listener = tls_listener("tls", &certs);
            listener.require_client_cert = true;
            listener.crl = vec![crl.clone()];
            config.listeners = vec![listener];
        })
        .start()
        .await;
    let addr = broker.server.addresses[0];
    let (mut car, _) = v5::connect(tls_options(addr, "car-a", &certs, Some(VIN))).await;
    let refused = v5::try_connect(tls_options(addr, "car-b", &certs, Some(OTHER_VIN))).await;
    assert!(refused.is_err(), "a revoked certificate was accepted");

    write_crl(&certs, &[OTHER_VIN, VIN], 2);
    broker.server.reload(&broker.config).await.expect("reload");
    let again = v5::try_connect(tls_options(addr, "car-a-again", &certs, Some(VIN))).await;
    assert!(again.is_err(), "a certificate revoked by the reloaded list was accepted");
    // The connection made before the reload is untouched.
    car.subscribe_ok(&format!("vehicle/{VIN}/#"), QoS::AtLeastOnce).await;
    car.publish(&format!("vehicle/{VIN}/status"), QoS::AtLeastOnce, false, b"still here").await;
    assert_eq!(&car.next_publish().await.payload[..], b"still here");
    car.disconnect().await;
    assert!(broker.stop().await);
}

/// An Ed25519 server key (PKCS#8 PEM, as rcgen and OpenSSL write it) serves TLS like an ECDSA one.
#[tokio::test]
async fn an_ed25519_server_key_serves_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = make_certs(dir.path());
    let issuer = dev_ca(&certs);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let certificate = params.signed_by(&key, &issuer).expect("signed");
    std::fs::write(certs.join("ed25519.pem"), certificate.pem()).expect("write");
    std::fs::write(certs.join("ed25519.key"), key.serialize_pem()).expect("write");
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            let mut listener = tls_listener("tls", &certs);
            listener.cert = Some(certs.join("ed25519.pem"));
            listener.key = Some(certs.join("ed25519.key"));
            config.listeners = vec![listener];
        })
        .start()
        .await;
    let (mut client, _) = v5::connect(tls_options(broker.server.addresses[0], "ed", &certs, None)).await;
    client.subscribe_ok("ed/#", QoS::AtLeastOnce).await;
    client.publish("ed/t", QoS::AtLeastOnce, false, b"signed with ed25519").await;
    assert_eq!(&client.next_publish().await.payload[..], b"signed with ed25519");
    client.disconnect().await;
    assert!(broker.stop().await);
}

/// A listener's `mount_point` puts each client under its own prefix (`%c`: its client id as one literal level):
/// what it publishes and subscribes to is mounted, what it receives comes back without the prefix, its will is
/// mounted too, and a client id that cannot be one level is refused. Clients of an unmounted listener see the
/// full topics.
#[tokio::test]
async fn a_mount_point_keeps_each_client_under_its_own_prefix() {
    use rumqttc::v5::mqttbytes::v5::LastWill;
    let broker = TestBroker::builder()
        .configure(|config: &mut Config| {
            let mut mounted = ListenerConfig::tcp("127.0.0.1:0");
            mounted.mount_point = Some("site/%c/".into());
            config.listeners = vec![mounted, ListenerConfig::tcp("127.0.0.1:0")];
        })
        .start()
        .await;
    let (mounted, plain) = (broker.server.addresses[0], broker.server.addresses[1]);
    let options = |address: SocketAddr, id: &str| {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", address.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    let (mut backend, _) = v5::connect(options(plain, "backend")).await;
    let (mut observer, _) = v5::connect(options(plain, "observer")).await;
    observer.subscribe_ok("site/+/telemetry/#", QoS::AtLeastOnce).await;
    observer.subscribe_ok("site/+/status", QoS::AtLeastOnce).await;
    let mut with_will = options(mounted, "car1");
    with_will.set_last_will(LastWill::new("status", "gone", QoS::AtLeastOnce, false, None));
    let (mut car1, _) = v5::connect(with_will).await;
    car1.subscribe_ok("cmd/#", QoS::AtLeastOnce).await;
    let (mut car2, _) = v5::connect(options(mounted, "car2")).await;
    car2.subscribe_ok("cmd/#", QoS::AtLeastOnce).await;
    // A shared subscription is mounted inside its group.
    car2.subscribe_ok("$share/workers/jobs/+", QoS::AtLeastOnce).await;

    car1.publish("telemetry/speed", QoS::AtLeastOnce, false, b"88").await;
    let seen = observer.next_publish().await;
    assert_eq!(v5::topic(&seen), "site/car1/telemetry/speed");
    backend.publish("site/car1/cmd/unlock", QoS::AtLeastOnce, false, b"go").await;
    let command = car1.next_publish().await;
    assert_eq!(v5::topic(&command), "cmd/unlock", "the prefix is removed on the way out");
    car2.expect_no_publish(QUIET).await;
    backend.publish("site/car2/jobs/7", QoS::AtLeastOnce, false, b"job").await;
    assert_eq!(v5::topic(&car2.next_publish().await), "jobs/7");

    // An MQTT 3.1.1 client on the same listener, with a retained message replayed under its mount.
    backend.publish("site/old/cmd/config", QoS::AtLeastOnce, true, b"cfg").await;
    let (mut old, _) = tollgate_integration_tests::v4::connect({
        let mut options = rumqttc::MqttOptions::new("old", "127.0.0.1", mounted.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    })
    .await;
    old.subscribe_ok("cmd/#", rumqttc::QoS::AtLeastOnce).await;
    let replayed = old.next_publish().await;
    assert_eq!((replayed.topic.as_str(), replayed.retain), ("cmd/config", true));
    old.client.unsubscribe("cmd/#").await.expect("unsubscribe");
    tokio::time::sleep(QUIET).await;
    backend.publish("site/old/cmd/again", QoS::AtLeastOnce, false, b"x").await;
    old.expect_no_publish(QUIET).await;

    // The will goes out under the mount.
    car1.kill().await;
    let will = observer.next_publish().await;
    assert_eq!((v5::topic(&will).as_str(), &will.payload[..]), ("site/car1/status", &b"gone"[..]));
    // A client id that is not one literal level cannot be mounted.
    assert_eq!(
        v5::refused_code(options(mounted, "a/b")).await,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode::ClientIdentifierNotValid
    );
    assert!(broker.stop().await);
}
