//! Everything driven by the clock, on PAUSED tokio time: the broker core runs in-process and clients talk to it
//! over `tokio::io::duplex`, so when every task is idle the runtime jumps straight to the next timer. The tests are
//! exact (the keepalive fires at 15 s, not "some time after 14 s") and take milliseconds of real time.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::io::DuplexStream;
use tokio::time::Instant;
use tollgate_core::{Broker, BrokerConfig};
use tollgate_hooks::HookChain;
use tollgate_integration_tests::raw::{self, RawClient, Received, connect_packet, publish_packet};
use tollgate_protocol::{ConnAck, LastWill, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode};

type Client = RawClient<DuplexStream>;

fn broker(change: impl FnOnce(&mut BrokerConfig)) -> Broker {
    let mut config = BrokerConfig { sys_interval: Duration::ZERO, ..BrokerConfig::default() };
    change(&mut config);
    Broker::new(config, HookChain::default())
}

/// Connects over a duplex stream with the given CONNECT settings.
async fn connect(broker: &Broker, connect: tollgate_protocol::Connect) -> (Client, ConnAck) {
    let mut client = raw::duplex(broker, connect.protocol, &connect.client_id.clone());
    let connack = client.connect(connect).await;
    assert_eq!(connack.reason_code, ReasonCode::SUCCESS, "CONNACK");
    (client, connack)
}

fn v5_connect(client_id: &str, keep_alive: u16, clean_start: bool, expiry: Option<u32>) -> tollgate_protocol::Connect {
    let mut connect = connect_packet(ProtocolVersion::V5, client_id);
    connect.keep_alive = keep_alive;
    connect.clean_start = clean_start;
    connect.properties.session_expiry_interval = expiry;
    connect
}

fn will(topic: &str, payload: &'static [u8], delay: Option<u32>) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: bytes::Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties { will_delay_interval: delay, ..Properties::default() },
    }
}

/// Asserts nothing at all (no packet, no close) arrives for `window`.
async fn expect_nothing(client: &mut Client, window: Duration) {
    if let Some(received) = client.recv_within(window).await {
        panic!("{}: expected silence for {window:?}, got {received:?}", client.name);
    }
}

/// A watcher subscribed to `filter` at QoS 1.
async fn watcher(broker: &Broker, filter: &str) -> Client {
    let (mut watcher, _) = connect(broker, v5_connect("watcher", 0, true, None)).await;
    assert_eq!(watcher.subscribe(1, filter, QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    watcher
}

#[tokio::test(start_paused = true)]
async fn keepalive_v311_closes_at_one_and_a_half_times_not_before() {
    let broker = broker(|_| {});
    let mut connect_311 = connect_packet(ProtocolVersion::V311, "quiet");
    connect_311.keep_alive = 10;
    let (mut client, _) = connect(&broker, connect_311).await;
    let start = Instant::now();

    expect_nothing(&mut client, Duration::from_secs(14)).await;
    match client.recv_within(Duration::from_secs(2)).await {
        Some(Received::Closed) => {}
        other => panic!("expected a silent close (3.1.1 has no server DISCONNECT), got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(15), "closed exactly at 1.5 × keepalive");
}

#[tokio::test(start_paused = true)]
async fn keepalive_v5_sends_disconnect_0x8d_at_15_seconds() {
    let broker = broker(|_| {});
    let (mut client, connack) = connect(&broker, v5_connect("quiet", 10, true, None)).await;
    assert_eq!(connack.properties.server_keep_alive, None, "10 s is within the default cap");
    let start = Instant::now();

    expect_nothing(&mut client, Duration::from_millis(14_900)).await;
    match client.recv_within(Duration::from_secs(1)).await {
        Some(Received::Packet(Packet::Disconnect(disconnect))) => {
            assert_eq!(disconnect.reason_code, ReasonCode::KEEP_ALIVE_TIMEOUT)
        }
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(15));
    client.expect_closed().await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_is_reset_by_any_packet() {
    let broker = broker(|_| {});
    let (mut client, _) = connect(&broker, v5_connect("pinger", 10, true, None)).await;
    let start = Instant::now();

    tokio::time::sleep(Duration::from_secs(10)).await;
    client.send(&Packet::PingReq).await;
    assert!(matches!(client.expect_packet().await, Packet::PingResp));
    // The deadline is now 10 + 15 = 25 s.
    expect_nothing(&mut client, Duration::from_millis(14_900)).await;
    match client.recv_within(Duration::from_secs(1)).await {
        Some(Received::Packet(Packet::Disconnect(disconnect))) => {
            assert_eq!(disconnect.reason_code, ReasonCode::KEEP_ALIVE_TIMEOUT)
        }
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(25));
}

#[tokio::test(start_paused = true)]
async fn keepalive_zero_never_times_out() {
    let broker = broker(|config| config.max_keepalive = 0);
    let (mut client, connack) = connect(&broker, v5_connect("forever", 0, true, None)).await;
    assert_eq!(connack.properties.server_keep_alive, None);
    expect_nothing(&mut client, Duration::from_secs(3600)).await;
}

#[tokio::test(start_paused = true)]
async fn server_keep_alive_caps_the_client_request() {
    let broker = broker(|config| config.max_keepalive = 60);
    let (mut client, connack) = connect(&broker, v5_connect("greedy", 120, true, None)).await;
    assert_eq!(connack.properties.server_keep_alive, Some(60), "CONNACK Server Keep Alive");
    let start = Instant::now();
    // The cap is enforced: 1.5 × 60 = 90 s, not 1.5 × 120.
    expect_nothing(&mut client, Duration::from_millis(89_900)).await;
    match client.recv_within(Duration::from_secs(1)).await {
        Some(Received::Packet(Packet::Disconnect(disconnect))) => {
            assert_eq!(disconnect.reason_code, ReasonCode::KEEP_ALIVE_TIMEOUT)
        }
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(90));

    // A client asking for no keepalive at all is capped too.
    let (_, connack) = connect(&broker, v5_connect("zero", 0, true, None)).await;
    assert_eq!(connack.properties.server_keep_alive, Some(60));
    // One within the cap is left alone.
    let (_, connack) = connect(&broker, v5_connect("modest", 30, true, None)).await;
    assert_eq!(connack.properties.server_keep_alive, None);
}

#[tokio::test(start_paused = true)]
async fn session_survives_29_seconds_and_is_gone_after_31() {
    let broker = broker(|_| {});
    let (mut client, connack) = connect(&broker, v5_connect("sess", 0, true, Some(30))).await;
    assert!(!connack.session_present);
    assert_eq!(client.subscribe(1, "sess/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    client.disconnect().await;

    tokio::time::sleep(Duration::from_secs(29)).await;
    let (mut client, connack) = connect(&broker, v5_connect("sess", 0, false, Some(30))).await;
    assert!(connack.session_present, "29 s offline is within the 30 s expiry");
    // The subscription came back with it.
    let (mut publisher, _) = connect(&broker, v5_connect("pub", 0, true, None)).await;
    let reason = publisher.publish_qos1(publish_packet("sess/x", QoS::AtLeastOnce, Some(1), b"still subscribed")).await;
    assert_eq!(reason, ReasonCode::SUCCESS);
    assert_eq!(&client.expect_publish().await.payload[..], b"still subscribed");
    client.disconnect().await;

    // The expiry restarts at this disconnect.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(broker.sessions().get(&tollgate_core::ClientId("sess".into())).is_none(), "the session expired");
    let reason = publisher.publish_qos1(publish_packet("sess/x", QoS::AtLeastOnce, Some(2), b"nobody")).await;
    assert_eq!(reason, ReasonCode::NO_MATCHING_SUBSCRIBERS, "its subscription left the router");
    let (client, connack) = connect(&broker, v5_connect("sess", 0, false, Some(30))).await;
    assert!(!connack.session_present, "31 s offline is past the 30 s expiry");
    client.disconnect().await;
}

#[tokio::test(start_paused = true)]
async fn session_expiry_can_be_changed_at_disconnect() {
    let broker = broker(|_| {});
    let (client, _) = connect(&broker, v5_connect("shorten", 0, true, Some(300))).await;
    let mut client = client;
    let disconnect = tollgate_protocol::Disconnect {
        reason_code: ReasonCode::NORMAL_DISCONNECTION,
        properties: Properties { session_expiry_interval: Some(5), ..Properties::default() },
    };
    client.send(&Packet::Disconnect(disconnect)).await;
    let _ = client.read_until_closed().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, connack) = connect(&broker, v5_connect("shorten", 0, false, Some(300))).await;
    assert!(!connack.session_present, "the 5 s set at DISCONNECT replaced the 300 s from CONNECT");
}

#[tokio::test(start_paused = true)]
async fn delayed_will_is_published_after_the_delay_not_before() {
    let broker = broker(|_| {});
    let mut watcher = watcher(&broker, "wills/#").await;
    let mut connect_will = v5_connect("mortal", 0, true, Some(60));
    connect_will.will = Some(will("wills/mortal", b"five seconds later", Some(5)));
    let (client, _) = connect(&broker, connect_will).await;

    drop(client); // the socket goes away without DISCONNECT
    let start = Instant::now();
    expect_nothing(&mut watcher, Duration::from_millis(4_900)).await;
    let Some(Received::Packet(Packet::Publish(will))) = watcher.recv_within(Duration::from_secs(1)).await else {
        panic!("the will did not arrive after its delay");
    };
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(&*will.topic, "wills/mortal");
    assert_eq!(&will.payload[..], b"five seconds later");
}

#[tokio::test(start_paused = true)]
async fn delayed_will_is_cancelled_by_reconnecting_within_the_delay() {
    let broker = broker(|_| {});
    let mut watcher = watcher(&broker, "wills/#").await;
    let mut connect_will = v5_connect("phoenix", 0, true, Some(60));
    connect_will.will = Some(will("wills/phoenix", b"must not appear", Some(5)));
    let (client, _) = connect(&broker, connect_will).await;
    drop(client);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let (client, connack) = connect(&broker, v5_connect("phoenix", 0, false, Some(60))).await;
    assert!(connack.session_present);
    expect_nothing(&mut watcher, Duration::from_secs(30)).await;
    client.disconnect().await;
    expect_nothing(&mut watcher, Duration::from_secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn will_delay_is_cut_short_by_session_expiry() {
    let broker = broker(|_| {});
    let mut watcher = watcher(&broker, "wills/#").await;
    let mut connect_will = v5_connect("brief", 0, true, Some(10));
    connect_will.will = Some(will("wills/brief", b"at session end", Some(30)));
    let (client, _) = connect(&broker, connect_will).await;
    drop(client);
    let start = Instant::now();
    expect_nothing(&mut watcher, Duration::from_millis(9_900)).await;
    let Some(Received::Packet(Packet::Publish(will))) = watcher.recv_within(Duration::from_secs(1)).await else {
        panic!("the will did not arrive when the session ended");
    };
    assert_eq!(start.elapsed(), Duration::from_secs(10), "published when the session ends [MQTT-3.1.3-9]");
    assert_eq!(&will.payload[..], b"at session end");
}

#[tokio::test(start_paused = true)]
async fn queued_message_expires_while_the_session_is_offline() {
    let broker = broker(|_| {});
    let (mut sleeper, _) = connect(&broker, v5_connect("sleeper", 0, true, Some(300))).await;
    assert_eq!(sleeper.subscribe(1, "m/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    sleeper.disconnect().await;

    let (mut publisher, _) = connect(&broker, v5_connect("pub", 0, true, None)).await;
    let with_expiry = |topic: &str, id: u16, seconds: u32| -> Publish {
        let mut publish = publish_packet(topic, QoS::AtLeastOnce, Some(id), topic.as_bytes());
        publish.properties.message_expiry_interval = Some(seconds);
        publish
    };
    assert_eq!(publisher.publish_qos1(with_expiry("m/short", 1, 5)).await, ReasonCode::SUCCESS);
    assert_eq!(publisher.publish_qos1(with_expiry("m/long", 2, 20)).await, ReasonCode::SUCCESS);

    tokio::time::sleep(Duration::from_secs(6)).await;
    let (mut sleeper, connack) = connect(&broker, v5_connect("sleeper", 0, false, Some(300))).await;
    assert!(connack.session_present);
    let first = sleeper.expect_publish().await;
    assert_eq!(&*first.topic, "m/long", "m/short expired after 5 s and was never sent");
    assert_eq!(first.properties.message_expiry_interval, Some(14), "20 s minus the 6 s spent queued");
    expect_nothing(&mut sleeper, Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn retained_message_expires() {
    let broker = broker(|_| {});
    let (mut publisher, _) = connect(&broker, v5_connect("pub", 0, true, None)).await;
    let mut publish = publish_packet("r/t", QoS::AtLeastOnce, Some(1), b"short-lived");
    publish.retain = true;
    publish.properties.message_expiry_interval = Some(5);
    publisher.publish_qos1(publish).await;

    tokio::time::sleep(Duration::from_secs(4)).await;
    let (mut early, _) = connect(&broker, v5_connect("early", 0, true, None)).await;
    early.subscribe(1, "r/#", QoS::AtLeastOnce).await;
    let replay = early.expect_publish().await;
    assert_eq!(replay.properties.message_expiry_interval, Some(1));

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut late, _) = connect(&broker, v5_connect("late", 0, true, None)).await;
    late.subscribe(1, "r/#", QoS::AtLeastOnce).await;
    expect_nothing(&mut late, Duration::from_secs(1)).await;
}

/// A clean-start reconnect within the will delay ends the old session. The spec can be read two ways: the will is
/// sent when the session ends ("until the Will Delay Interval has passed or the Session ends, whichever happens
/// first", 3.1.3.2.2), or it is dropped ("unless ... a new Network Connection for the ClientID is opened before the
/// Will Delay Interval has passed", [MQTT-3.1.2-8]). Either is accepted here; publishing it later, when the delay
/// of a session that no longer exists runs out, is not.
#[tokio::test(start_paused = true)]
async fn delayed_will_is_not_published_late_after_a_clean_start_reconnect() {
    let broker = broker(|_| {});
    let mut watcher = watcher(&broker, "wills/#").await;
    let mut connect_will = v5_connect("fresh-start", 0, true, Some(60));
    connect_will.will = Some(will("wills/fresh-start", b"old session's will", Some(5)));
    let (client, _) = connect(&broker, connect_will).await;
    drop(client);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (client, connack) = connect(&broker, v5_connect("fresh-start", 0, true, Some(60))).await;
    assert!(!connack.session_present);
    // At the session's end (now, without the clock moving) the will may appear; after that, never.
    let at_session_end = watcher.recv_within(Duration::from_millis(1)).await;
    assert!(matches!(&at_session_end, None | Some(Received::Packet(Packet::Publish(_)))), "{at_session_end:?}");
    let start = Instant::now();
    if let Some(late) = watcher.recv_within(Duration::from_secs(30)).await {
        panic!("the old session's will arrived {:?} after the clean-start reconnect: {late:?}", start.elapsed());
    }
    client.disconnect().await;
}

#[tokio::test(start_paused = true)]
async fn disconnect_with_will_message_publishes_the_will() {
    let broker = broker(|_| {});
    let mut watcher = watcher(&broker, "wills/#").await;
    let mut connect_will = v5_connect("leaving", 0, true, None);
    connect_will.will = Some(will("wills/leaving", b"on purpose", None));
    let (mut client, _) = connect(&broker, connect_will).await;
    client
        .send(&Packet::Disconnect(tollgate_protocol::Disconnect {
            reason_code: ReasonCode::DISCONNECT_WITH_WILL,
            properties: Properties::default(),
        }))
        .await;
    let _ = client.read_until_closed().await;
    let will = watcher.expect_publish().await;
    assert_eq!(&will.payload[..], b"on purpose");
}

fn v311_persistent(client_id: &str) -> tollgate_protocol::Connect {
    let mut connect = connect_packet(ProtocolVersion::V311, client_id);
    connect.clean_start = false;
    connect
}

#[tokio::test(start_paused = true)]
async fn v311_persistent_session_expiry_comes_from_the_configuration() {
    let broker = broker(|config| config.persistent_session_expiry = Some(Duration::from_secs(100)));
    let (client, _) = connect(&broker, v311_persistent("old-school")).await;
    client.disconnect().await;
    tokio::time::sleep(Duration::from_secs(99)).await;
    let (client, connack) = connect(&broker, v311_persistent("old-school")).await;
    assert!(connack.session_present, "99 s is within session.persistent_expiry = 100");
    client.disconnect().await;
    tokio::time::sleep(Duration::from_secs(101)).await;
    let (client, connack) = connect(&broker, v311_persistent("old-school")).await;
    assert!(!connack.session_present, "gone after 101 s");
    client.disconnect().await;
}

#[tokio::test(start_paused = true)]
async fn v311_persistent_session_is_kept_without_a_configured_expiry() {
    let broker = broker(|config| config.persistent_session_expiry = None);
    let (client, _) = connect(&broker, v311_persistent("forever")).await;
    client.disconnect().await;
    tokio::time::sleep(Duration::from_secs(30 * 24 * 3600)).await;
    let (client, connack) = connect(&broker, v311_persistent("forever")).await;
    assert!(connack.session_present, "kept for 30 days");
    client.disconnect().await;
}

/// Refuses `Action::Session` for clients named in `revoked`: what a revocation list does at a recheck.
struct Revocations {
    revoked: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl tollgate_hooks::Authorizer for Revocations {
    fn name(&self) -> &str {
        "revocations"
    }

    async fn authorize(
        &self,
        client: &tollgate_hooks::ClientInfo,
        action: &tollgate_hooks::Action<'_>,
    ) -> Result<tollgate_hooks::AclDecision, tollgate_hooks::HookError> {
        let revoked = self.revoked.lock().unwrap().iter().any(|id| **id == *client.client_id);
        Ok(match action {
            tollgate_hooks::Action::Session if revoked => tollgate_hooks::AclDecision::Deny(ReasonCode::BANNED),
            _ => tollgate_hooks::AclDecision::Abstain,
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_recheck_revokes_live_and_offline_sessions_and_their_wills_never_fire() {
    let revocations = std::sync::Arc::new(Revocations { revoked: std::sync::Mutex::new(Vec::new()) });
    let mut hooks = HookChain::default();
    hooks.authorizers.push(tollgate_hooks::HookSlot::new(
        revocations.clone(),
        None,
        tollgate_hooks::FailurePolicy::FailClosed,
    ));
    let broker = Broker::new(BrokerConfig { sys_interval: Duration::ZERO, ..BrokerConfig::default() }, hooks);
    let mut watcher = watcher(&broker, "wills/#").await;
    // One revoked client is offline with a delayed will pending, one is online with a will.
    let mut offline = v5_connect("stolen-offline", 0, true, Some(600));
    offline.will = Some(will("wills/stolen-offline", b"must not appear", Some(60)));
    let (client, _) = connect(&broker, offline).await;
    drop(client);
    let mut online = v5_connect("stolen-online", 0, true, Some(600));
    online.will = Some(will("wills/stolen-online", b"must not appear", None));
    let (mut online, _) = connect(&broker, online).await;
    assert_eq!(online.subscribe(1, "cmd/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    let (mut bystander, _) = connect(&broker, v5_connect("bystander", 0, true, None)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    *revocations.revoked.lock().unwrap() = vec!["stolen-offline".into(), "stolen-online".into()];
    let report = broker.recheck_sessions().await;
    assert_eq!((report.revoked, report.sessions), (2, 4), "{report:?}");
    let Some(Received::Packet(Packet::Disconnect(goodbye))) = online.recv_within(Duration::from_secs(1)).await else {
        panic!("the revoked live client was not disconnected");
    };
    assert_eq!(goodbye.reason_code, ReasonCode::BANNED);
    let offline_id = tollgate_core::ClientId("stolen-offline".into());
    assert!(broker.sessions().get(&offline_id).is_none(), "the offline session is gone");
    assert_eq!(broker.router().subscription_count(), 1, "only the watcher's subscription is left");
    // Neither will fires: not at the offline client's will delay, not for the disconnected one.
    expect_nothing(&mut watcher, Duration::from_secs(120)).await;
    expect_nothing(&mut bystander, Duration::from_millis(10)).await;
}
