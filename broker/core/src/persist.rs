//! The broker's state as bytes, so a restart can pick up where the last run stopped: retained messages, and every
//! persistent session (session expiry above zero) with its subscriptions, queued messages, messages in flight both
//! ways. No I/O here: the server writes the bytes to a file and hands them back at start.
//!
//! Format (version 2): a 16-byte header (`tollgate-state\n` and the version), the body, then a CRC-32 of the body.
//! The body is big-endian and length-prefixed throughout: the retained messages (publisher, stored message), then
//! the sessions (client id, expiry, offline since, subscriptions, queue, in flight, QoS 2 ids received), then the
//! wills waiting out their delay (client id, when due, stored message; not in version 1). A message
//! is in its stored form ([`Message::encode_stored`]), the one the bridge's journal uses. Reading checks every
//! length against what is left, so a damaged file is refused with where it went wrong, never half applied.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;
use tollgate_protocol::{PacketId, QoS, SubscriptionOptions};

use crate::Broker;
use crate::message::{ClientId, Delivery, Message, unix_ms};
use crate::router::Subscriber;
use crate::session::{Inflight, PacketIdHasher, SessionSubscription};

const MAGIC: &[u8; 15] = b"tollgate-state\n";
/// 2 added the wills waiting out their delay; 1 is still read (as having none).
const VERSION: u8 = 2;
const HEADER: usize = MAGIC.len() + 1;

/// Why a state file cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a Tollgate state file")]
    NotAState,
    #[error("state format {0} is newer than this Tollgate reads ({VERSION})")]
    NewerFormat(u8),
    #[error("damaged: its checksum does not match")]
    Checksum,
    #[error("damaged at byte {offset}: {what}")]
    Malformed { offset: usize, what: String },
}

/// What a snapshot holds, or what a restore put back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub retained: usize,
    pub sessions: usize,
    /// Queued and in-flight messages over all sessions.
    pub messages: usize,
    /// Wills waiting out their Will Delay Interval.
    pub wills: usize,
}

/// A will that was waiting out its delay: it goes when the delay ends, or at once if its session is gone.
struct RestoredWill {
    client_id: String,
    /// Unix milliseconds.
    due: u64,
    will: Message,
}

struct RestoredSession {
    client_id: String,
    expiry: u32,
    /// Unix seconds; the expiry runs from here, across the restart.
    offline_since: u32,
    subscriptions: Vec<(String, SessionSubscription)>,
    queue: Vec<Delivery>,
    inflight: Vec<(PacketId, Inflight)>,
    incoming_qos2: Vec<PacketId>,
}

impl Broker {
    /// The state a restart needs, as bytes for [`Broker::restore`]. Sessions are read one at a time under their
    /// own lock (copied out, encoded after), so a snapshot taken while serving holds no session for long.
    pub fn snapshot(&self) -> (Vec<u8>, SnapshotCounts) {
        let now = Instant::now();
        let now_unix = crate::session::unix_now_s();
        let mut counts = SnapshotCounts::default();
        let mut body = BytesMut::new();
        let retained: Vec<_> = self.retained().all(now);
        put_u32(&mut body, retained.len());
        for (message, publisher) in &retained {
            put_optional_str(&mut body, publisher.as_ref().map(ClientId::as_str));
            put_message(&mut body, message, &[], now);
        }
        counts.retained = retained.len();

        let mut sessions = Vec::new();
        for session in self.sessions().all() {
            if session.ended.has_ended() {
                continue;
            }
            let state = session.lock();
            if state.expiry_interval == 0 {
                continue;
            }
            let mut subscriptions: Vec<(String, SessionSubscription)> = state
                .subscriptions
                .iter()
                .map(|(filter, subscription)| (filter.clone(), subscription.clone()))
                .collect();
            subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
            let queue: Vec<Delivery> = state.queue.iter().filter(|d| !d.message.is_expired(now)).cloned().collect();
            let mut incoming_qos2: Vec<PacketId> = state.incoming_qos2.iter().copied().collect();
            incoming_qos2.sort_unstable();
            let record = (
                session.client_id.clone(),
                state.expiry_interval,
                state.offline_since(now_unix),
                subscriptions,
                queue,
                state.inflight_in_order(),
                incoming_qos2,
            );
            drop(state);
            sessions.push(record);
        }
        put_u32(&mut body, sessions.len());
        for (client_id, expiry, offline_since, subscriptions, queue, inflight, incoming_qos2) in &sessions {
            put_str(&mut body, client_id.as_str());
            body.extend_from_slice(&expiry.to_be_bytes());
            body.extend_from_slice(&offline_since.to_be_bytes());
            put_u32(&mut body, subscriptions.len());
            for (filter, subscription) in subscriptions {
                put_str(&mut body, filter);
                body.extend_from_slice(&[options_byte(subscription.options)]);
                body.extend_from_slice(&subscription.identifier.unwrap_or(0).to_be_bytes());
            }
            put_u32(&mut body, queue.len());
            for delivery in queue {
                put_delivery(&mut body, delivery, now);
            }
            put_u32(&mut body, inflight.len());
            for (packet_id, entry) in inflight {
                body.extend_from_slice(&packet_id.to_be_bytes());
                match entry {
                    Inflight::Release => body.extend_from_slice(&[0]),
                    Inflight::Publish(delivery) => {
                        body.extend_from_slice(&[1]);
                        put_delivery(&mut body, delivery, now);
                    }
                }
            }
            put_u32(&mut body, incoming_qos2.len());
            for packet_id in incoming_qos2 {
                body.extend_from_slice(&packet_id.to_be_bytes());
            }
            counts.messages += queue.len() + inflight.len();
        }
        counts.sessions = sessions.len();

        // Wills still waiting, for sessions still offline (a reconnect since cancelled the will).
        let now_ms = unix_ms();
        let wills: Vec<(ClientId, u64, Arc<Message>)> = self
            .pending_wills()
            .values()
            .filter(|pending| {
                pending.session.generation() == pending.generation
                    && !pending.session.is_connected()
                    && !pending.session.ended.has_ended()
            })
            .map(|pending| {
                let left = pending.due.saturating_duration_since(now).as_millis() as u64;
                (pending.session.client_id.clone(), now_ms + left, pending.will.clone())
            })
            .collect();
        put_u32(&mut body, wills.len());
        for (client_id, due, will) in &wills {
            put_str(&mut body, client_id.as_str());
            body.extend_from_slice(&due.to_be_bytes());
            put_message(&mut body, will, &[], now);
        }
        counts.wills = wills.len();

        let mut out = Vec::with_capacity(HEADER + body.len() + 4);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        (out, counts)
    }

    /// Puts back what [`Broker::snapshot`] saved, before any client connects. The whole file is read and checked
    /// first: a damaged one changes nothing. Restored sessions are offline, and expire when they would have had
    /// the broker kept running (the time it was down counts as time offline): one whose expiry passed meanwhile
    /// is not restored. A session already in the store (there should be none this early) is replaced.
    pub fn restore(&self, bytes: &[u8]) -> Result<SnapshotCounts, SnapshotError> {
        let (retained, mut sessions, wills) = decode(bytes, Instant::now())?;
        let now_unix = crate::session::unix_now_s();
        let remaining = |session: &RestoredSession| match session.expiry {
            u32::MAX => Some(u32::MAX),
            expiry => expiry.checked_sub(now_unix.saturating_sub(session.offline_since)).filter(|&left| left > 0),
        };
        sessions.retain(|session| remaining(session).is_some());
        let mut counts =
            SnapshotCounts { retained: retained.len(), sessions: sessions.len(), messages: 0, wills: wills.len() };
        for (message, publisher) in retained {
            self.retained().store(Arc::new(message), publisher.as_ref());
        }
        for restored in sessions {
            let left = remaining(&restored).unwrap_or(0);
            counts.messages += restored.queue.len() + restored.inflight.len();
            let client_id = ClientId(restored.client_id.into());
            let session = self.new_session(client_id.clone(), restored.expiry);
            {
                let mut state = session.lock();
                state.queue.extend(restored.queue);
                for (packet_id, entry) in restored.inflight {
                    state.restore_inflight(packet_id, entry);
                }
                state.incoming_qos2.extend(restored.incoming_qos2);
                state.restore_offline_since(restored.offline_since);
            }
            for (filter, subscription) in restored.subscriptions {
                // Checked while decoding.
                let Ok(parsed) = tollgate_protocol::topic::parse_subscription_filter(&filter) else { continue };
                let subscriber = Subscriber {
                    session: session.clone(),
                    options: subscription.options,
                    identifier: subscription.identifier,
                };
                self.router().subscribe(parsed.filter, parsed.share_group, subscriber);
                session.lock().subscriptions.insert(filter, subscription);
            }
            let opened = self.sessions().open(&client_id, true, &mut || session.clone());
            if let Some(discarded) = opened.discarded {
                self.end_session(&discarded);
            }
            self.schedule_expiry(session.clone(), session.generation(), left);
        }
        // After the sessions: a will whose session came back waits out the rest of its delay; one whose session
        // is gone (expired while the broker was down) goes now, as it would have when the session ended.
        let now_ms = unix_ms();
        for restored in wills {
            let will = Arc::new(restored.will);
            let client_id = ClientId(restored.client_id.into());
            match self.sessions().get(&client_id) {
                Some(session) => {
                    let left = Duration::from_millis(restored.due.saturating_sub(now_ms));
                    self.schedule_will(session.clone(), session.generation(), will, left);
                }
                None => {
                    self.publish_from(will, Some(&client_id));
                }
            }
        }
        Ok(counts)
    }
}

fn put_u32(out: &mut BytesMut, value: usize) {
    out.extend_from_slice(&u32::try_from(value).unwrap_or(u32::MAX).to_be_bytes());
}

fn put_str(out: &mut BytesMut, value: &str) {
    put_u32(out, value.len());
    out.extend_from_slice(value.as_bytes());
}

fn put_optional_str(out: &mut BytesMut, value: Option<&str>) {
    match value {
        Some(value) => {
            out.extend_from_slice(&[1]);
            put_str(out, value);
        }
        None => out.extend_from_slice(&[0]),
    }
}

/// A length-prefixed stored message. One that cannot be encoded (it was decoded by the same codec, so this does
/// not happen) is written as an empty record, which reading refuses.
fn put_message(out: &mut BytesMut, message: &Message, subscription_ids: &[u32], now: Instant) {
    let mut stored = BytesMut::new();
    if message.encode_stored(now, subscription_ids, &mut stored).is_err() {
        stored.clear();
    }
    put_u32(out, stored.len());
    out.extend_from_slice(&stored);
}

fn put_delivery(out: &mut BytesMut, delivery: &Delivery, now: Instant) {
    out.extend_from_slice(&[delivery.qos as u8 | (u8::from(delivery.retain) << 2)]);
    put_message(out, &delivery.message, &delivery.subscription_ids, now);
}

/// The SUBSCRIBE options byte of MQTT 5 (QoS, No Local, Retain As Published, Retain Handling).
fn options_byte(options: SubscriptionOptions) -> u8 {
    options.qos as u8
        | (u8::from(options.no_local) << 2)
        | (u8::from(options.retain_as_published) << 3)
        | ((options.retain_handling & 0b11) << 4)
}

type Decoded = (Vec<(Message, Option<ClientId>)>, Vec<RestoredSession>, Vec<RestoredWill>);

fn decode(bytes: &[u8], now: Instant) -> Result<Decoded, SnapshotError> {
    if bytes.len() < HEADER + 4 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotAState);
    }
    let version = bytes[MAGIC.len()];
    if version == 0 || version > VERSION {
        return Err(SnapshotError::NewerFormat(version));
    }
    let (body, checksum) = bytes[HEADER..].split_at(bytes.len() - HEADER - 4);
    if crc32fast::hash(body).to_be_bytes() != checksum {
        return Err(SnapshotError::Checksum);
    }
    let mut reader = Reader { bytes: body, position: 0 };
    let mut retained = Vec::new();
    for _ in 0..reader.count()? {
        let publisher = reader.optional_str()?.map(|id| ClientId(id.into()));
        let stored = reader.message(now)?;
        if !stored.expired {
            retained.push((stored.message, publisher));
        }
    }
    let mut sessions = Vec::new();
    for _ in 0..reader.count()? {
        let client_id = reader.str()?;
        let expiry = reader.u32()?;
        let offline_since = reader.u32()?;
        let mut subscriptions = Vec::new();
        for _ in 0..reader.count()? {
            let filter = reader.str()?;
            if let Err(error) = tollgate_protocol::topic::parse_subscription_filter(&filter) {
                return Err(reader.malformed(format!("subscription filter {filter:?}: {error}")));
            }
            let options = reader.options()?;
            let identifier = Some(reader.u32()?).filter(|&identifier| identifier != 0);
            subscriptions.push((filter, SessionSubscription { options, identifier }));
        }
        let mut queue = Vec::new();
        for _ in 0..reader.count()? {
            if let Some(delivery) = reader.delivery(now)? {
                queue.push(delivery);
            }
        }
        let mut inflight = Vec::new();
        let mut seen = HashSet::<PacketId, PacketIdHasher>::default();
        for _ in 0..reader.count()? {
            let packet_id = reader.packet_id()?;
            if !seen.insert(packet_id) {
                return Err(reader.malformed(format!("packet id {packet_id} in flight twice")));
            }
            let entry = match reader.u8()? {
                0 => Inflight::Release,
                1 => match reader.delivery(now)? {
                    Some(delivery) => Inflight::Publish(delivery),
                    // Expired while the broker was down: not sent again [MQTT-3.3.2-5].
                    None => continue,
                },
                other => return Err(reader.malformed(format!("in-flight kind {other}"))),
            };
            inflight.push((packet_id, entry));
        }
        let mut incoming_qos2 = Vec::new();
        for _ in 0..reader.count()? {
            incoming_qos2.push(reader.packet_id()?);
        }
        sessions.push(RestoredSession {
            client_id,
            expiry,
            offline_since,
            subscriptions,
            queue,
            inflight,
            incoming_qos2,
        });
    }
    let mut wills = Vec::new();
    if version >= 2 {
        for _ in 0..reader.count()? {
            let client_id = reader.str()?;
            let due = reader.u64()?;
            let will = reader.message(now)?.message;
            wills.push(RestoredWill { client_id, due, will });
        }
    }
    if reader.position != body.len() {
        return Err(reader.malformed("bytes after the last section".into()));
    }
    Ok((retained, sessions, wills))
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl Reader<'_> {
    fn malformed(&self, what: String) -> SnapshotError {
        SnapshotError::Malformed { offset: HEADER + self.position, what }
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&[u8], SnapshotError> {
        match self.bytes.get(self.position..).and_then(|rest| rest.get(..len)) {
            Some(taken) => {
                self.position += len;
                Ok(taken)
            }
            None => Err(self.malformed(format!("{what} runs past the end"))),
        }
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1, "a byte")?[0])
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let bytes = self.take(8, "a number")?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let bytes = self.take(4, "a number")?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A count of items that follow; each takes at least one byte, so a count beyond what is left is damage (and
    /// never drives an allocation).
    fn count(&mut self) -> Result<usize, SnapshotError> {
        let start = self.position;
        let count = self.u32()? as usize;
        if count > self.bytes.len() - self.position {
            self.position = start;
            return Err(self.malformed(format!("a count of {count} with fewer bytes left")));
        }
        Ok(count)
    }

    fn packet_id(&mut self) -> Result<PacketId, SnapshotError> {
        let bytes = self.take(2, "a packet id")?;
        match u16::from_be_bytes([bytes[0], bytes[1]]) {
            0 => Err(self.malformed("packet id 0".into())),
            packet_id => Ok(packet_id),
        }
    }

    fn str(&mut self) -> Result<String, SnapshotError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len, "a string")?.to_vec();
        String::from_utf8(bytes).map_err(|_| self.malformed("a string that is not UTF-8".into()))
    }

    fn optional_str(&mut self) -> Result<Option<String>, SnapshotError> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.str().map(Some),
            other => Err(self.malformed(format!("optional marker {other}"))),
        }
    }

    fn qos(&self, bits: u8) -> Result<QoS, SnapshotError> {
        QoS::from_u8(bits & 0b11).ok_or_else(|| self.malformed(format!("QoS {}", bits & 0b11)))
    }

    fn options(&mut self) -> Result<SubscriptionOptions, SnapshotError> {
        let byte = self.u8()?;
        if byte & 0b1100_0000 != 0 || (byte >> 4) & 0b11 == 3 {
            return Err(self.malformed(format!("subscription options {byte:#04x}")));
        }
        Ok(SubscriptionOptions {
            qos: self.qos(byte)?,
            no_local: byte & 0b100 != 0,
            retain_as_published: byte & 0b1000 != 0,
            retain_handling: (byte >> 4) & 0b11,
        })
    }

    fn message(&mut self, now: Instant) -> Result<crate::message::StoredMessage, SnapshotError> {
        let len = self.u32()? as usize;
        let body = self.take(len, "a message")?;
        match Message::decode_stored(body, now) {
            Some(stored) => Ok(stored),
            None => Err(self.malformed("a message that does not decode".into())),
        }
    }

    /// A queued or in-flight delivery; `None` if it expired while stored.
    fn delivery(&mut self, now: Instant) -> Result<Option<Delivery>, SnapshotError> {
        let flags = self.u8()?;
        if flags & !0b111 != 0 {
            return Err(self.malformed(format!("delivery flags {flags:#04x}")));
        }
        let qos = self.qos(flags)?;
        let stored = self.message(now)?;
        if stored.expired {
            return Ok(None);
        }
        Ok(Some(Delivery::new(Arc::new(stored.message), qos, flags & 0b100 != 0, stored.subscription_ids)))
    }
}

#[cfg(test)]
mod tests {
    use tollgate_hooks::HookChain;

    use std::time::Duration;

    use super::*;
    use crate::BrokerConfig;

    fn message(topic: &str, payload: &'static [u8], qos: QoS, retain: bool) -> Arc<Message> {
        let mut properties = tollgate_protocol::Properties::default();
        properties.user_properties.push(tollgate_protocol::UserProperty { key: "k".into(), value: "v".into() });
        properties.content_type = Some("text/plain".into());
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos,
            retain,
            properties: Some(Box::new(properties)),
            expires_at: None,
            origin: None,
        })
    }

    fn options(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, no_local: true, retain_as_published: false, retain_handling: 1 }
    }

    /// A broker with two retained messages and an offline persistent session holding two subscriptions (one
    /// shared, one with an identifier), a queued message, a QoS 1 and a QoS 2 exchange in flight and a QoS 2 id
    /// received; plus a session with expiry 0 that must not be saved.
    fn broker_with_state() -> Broker {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        broker.publish_from(message("state/a", b"on", QoS::AtLeastOnce, true), Some(&ClientId("sensor".into())));
        broker.publish(message("state/b", b"off", QoS::AtMostOnce, true));
        let session = broker.new_session(ClientId("car-1".into()), 3600);
        broker.sessions().open(&session.client_id, true, &mut || session.clone());
        for (filter, identifier) in [("cmd/car-1/#", Some(7)), ("$share/g/fleet/+", None)] {
            let parsed = tollgate_protocol::topic::parse_subscription_filter(filter).expect("a valid filter");
            let subscription = SessionSubscription { options: options(QoS::ExactlyOnce), identifier };
            let subscriber = Subscriber { session: session.clone(), options: subscription.options, identifier };
            broker.router().subscribe(parsed.filter, parsed.share_group, subscriber);
            session.lock().subscriptions.insert(filter.into(), subscription);
        }
        for index in 0..3 {
            broker.publish(message(&format!("cmd/car-1/{index}"), b"go", QoS::ExactlyOnce, false));
        }
        {
            let mut state = session.lock();
            let sent = state.take_sendable(2, 2, Instant::now());
            assert_eq!(sent.len(), 2);
            let second = sent[1].1.expect("QoS 2 has a packet id");
            assert!(state.received(second), "the QoS 2 copy is waiting for PUBCOMP");
            state.incoming_qos2.insert(42);
        }
        let transient = broker.new_session(ClientId("passer-by".into()), 0);
        broker.sessions().open(&transient.client_id, true, &mut || transient.clone());
        broker
    }

    #[tokio::test]
    async fn a_restored_broker_has_the_retained_messages_and_sessions_it_saved() {
        let (bytes, counts) = broker_with_state().snapshot();
        assert_eq!(counts, SnapshotCounts { retained: 2, sessions: 1, messages: 3, wills: 0 });

        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        assert_eq!(broker.restore(&bytes), Ok(counts));
        let retained = broker.retained().all(Instant::now());
        let on = retained.iter().find(|(message, _)| &*message.topic == "state/a").expect("state/a kept");
        assert_eq!(
            (&on.0.payload[..], on.0.qos, on.1.as_ref().map(ClientId::as_str)),
            (&b"on"[..], QoS::AtLeastOnce, Some("sensor"))
        );
        assert_eq!(on.0.properties().user_properties[0].value, "v");
        assert_eq!(on.0.properties().content_type.as_deref(), Some("text/plain"));

        assert!(broker.sessions().get(&ClientId("passer-by".into())).is_none(), "expiry 0 is not saved");
        let session = broker.sessions().get(&ClientId("car-1".into())).expect("car-1 restored");
        let state = session.lock();
        assert_eq!(state.expiry_interval, 3600);
        assert_eq!(state.subscriptions.len(), 2);
        assert_eq!(state.subscriptions["cmd/car-1/#"].identifier, Some(7));
        assert_eq!(state.subscriptions["cmd/car-1/#"].options, options(QoS::ExactlyOnce));
        let queued: Vec<&str> = state.queue.iter().map(|delivery| &*delivery.message.topic).collect();
        assert_eq!(queued, ["cmd/car-1/2"]);
        assert_eq!(state.queue[0].subscription_ids, [7]);
        let inflight = state.inflight_in_order();
        assert!(matches!(&inflight[0], (_, Inflight::Publish(delivery)) if &*delivery.message.topic == "cmd/car-1/0"));
        assert!(matches!(inflight[1].1, Inflight::Release));
        assert!(state.incoming_qos2.contains(&42));
        drop(state);
        // The subscriptions are routed again, the shared one in its group.
        assert_eq!(broker.publish(message("cmd/car-1/3", b"go", QoS::AtLeastOnce, false)), 1);
        assert_eq!(broker.publish(message("fleet/x", b"go", QoS::AtLeastOnce, false)), 1);
        // A new exchange does not reuse an id still in flight.
        let taken = session.lock().take_sendable(10, 10, Instant::now());
        let ids: Vec<_> = taken.iter().filter_map(|(_, packet_id)| *packet_id).collect();
        assert!(ids.iter().all(|id| !inflight.iter().any(|(old, _)| old == id)), "{ids:?} against {inflight:?}");
        // And it saves the same again.
        assert_eq!(broker.snapshot().1.sessions, 1);
    }

    /// The time a session spent offline before the snapshot, and while the broker was down, counts against its
    /// expiry: one past it is not restored, one with time left expires when that runs out.
    #[tokio::test(start_paused = true)]
    async fn a_restored_session_expires_when_it_would_have_without_the_restart() {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        let now = crate::session::unix_now_s();
        for (client_id, expiry) in [("expired", 60), ("lasting", 200)] {
            let session = broker.new_session(ClientId(client_id.into()), expiry);
            session.lock().restore_offline_since(now - 100);
            broker.sessions().open(&session.client_id, true, &mut || session.clone());
        }
        let (bytes, counts) = broker.snapshot();
        assert_eq!(counts.sessions, 2);

        let restored = Broker::new(BrokerConfig::default(), HookChain::default());
        assert_eq!(restored.restore(&bytes).map(|counts| counts.sessions), Ok(1));
        assert!(restored.sessions().get(&ClientId("expired".into())).is_none(), "60 s expiry, 100 s offline");
        let lasting = ClientId("lasting".into());
        tokio::time::sleep(Duration::from_secs(95)).await;
        assert!(restored.sessions().get(&lasting).is_some(), "about 100 s were left");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(restored.sessions().get(&lasting).is_none(), "expired on time");
    }

    /// A will waiting out its delay survives the restart: it goes when the delay ends, or at once when its
    /// session did not survive (expired while the broker was down).
    #[tokio::test(start_paused = true)]
    async fn a_delayed_will_goes_when_its_delay_ends_across_a_restart() {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        let now = crate::session::unix_now_s();
        for (client_id, expiry, offline_for, delay) in [("car", 3600, 0, 100), ("gone", 60, 100, 1000)] {
            let session = broker.new_session(ClientId(client_id.into()), expiry);
            session.lock().restore_offline_since(now - offline_for);
            broker.sessions().open(&session.client_id, true, &mut || session.clone());
            let will = message(&format!("cars/{client_id}/status"), b"offline", QoS::AtLeastOnce, true);
            broker.schedule_will(session.clone(), session.generation(), will, Duration::from_secs(delay));
        }
        let (bytes, counts) = broker.snapshot();
        assert_eq!((counts.sessions, counts.wills), (2, 2));

        let restored = Broker::new(BrokerConfig::default(), HookChain::default());
        let watcher = restored.local_client("watcher");
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: true,
            retain_handling: 0,
        };
        watcher.subscribe("cars/#", options).expect("a valid filter");
        assert_eq!(restored.restore(&bytes).map(|counts| (counts.sessions, counts.wills)), Ok((1, 2)));
        let topics = |batch: Vec<(Delivery, Option<PacketId>)>| -> Vec<String> {
            batch.into_iter().map(|(delivery, _)| delivery.message.topic.to_string()).collect()
        };
        assert_eq!(topics(watcher.try_batch(10, 10)), ["cars/gone/status"], "its session expired: at once");
        tokio::time::sleep(Duration::from_secs(95)).await;
        assert!(watcher.try_batch(10, 10).is_empty(), "about 100 s of delay were left");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(topics(watcher.try_batch(10, 10)), ["cars/car/status"]);
    }

    #[tokio::test]
    async fn a_damaged_state_is_refused_whole_and_names_where() {
        let (bytes, _) = broker_with_state().snapshot();
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        assert_eq!(broker.restore(b"mosquitto db"), Err(SnapshotError::NotAState));
        let mut newer = bytes.clone();
        newer[MAGIC.len()] = 9;
        assert_eq!(broker.restore(&newer), Err(SnapshotError::NewerFormat(9)));
        let mut flipped = bytes.clone();
        flipped[HEADER + 10] ^= 0x20;
        assert_eq!(broker.restore(&flipped), Err(SnapshotError::Checksum));
        assert_eq!(broker.restore(&bytes[..bytes.len() - 1]), Err(SnapshotError::Checksum));
        // A body whose checksum fits but whose counts do not: refused with the offset, nothing applied.
        let mut body = Vec::from(&bytes[HEADER..bytes.len() - 4]);
        body[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut lying = Vec::from(&bytes[..HEADER]);
        lying.extend_from_slice(&body);
        lying.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        assert!(matches!(broker.restore(&lying), Err(SnapshotError::Malformed { offset: 16, .. })));
        assert_eq!(broker.retained().len(), 0);
        assert_eq!(broker.sessions().len(), 0);
    }

    #[test]
    fn decoding_never_panics_on_any_truncation_or_byte_flip() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
        let (bytes, _) = runtime.block_on(async { broker_with_state().snapshot() });
        let body_end = bytes.len() - 4;
        let now = runtime.block_on(async { Instant::now() });
        for cut in 0..bytes.len() {
            let _ = decode(&bytes[..cut], now);
        }
        // Flips inside the body with the checksum fixed up, so the structure checks are what answer.
        for position in HEADER..body_end {
            for flip in [0x01, 0x80, 0xFF] {
                let mut damaged = bytes.clone();
                damaged[position] ^= flip;
                let crc = crc32fast::hash(&damaged[HEADER..body_end]).to_be_bytes();
                damaged[body_end..].copy_from_slice(&crc);
                let _ = decode(&damaged, now);
            }
        }
    }
}
