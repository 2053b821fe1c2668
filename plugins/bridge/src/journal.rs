//! The bridge's store-and-forward journal: messages bound for the remote, appended to segment files on disk
//! and removed once the remote has acknowledged them, so neither an uplink outage nor a restart of this broker
//! loses them.
//!
//! Layout of `dir`: segment files named by the offset of their first byte (`00000000000000000000.seg`), each a
//! run of records `[body length: u32 BE][CRC-32 of the body: u32 BE][body]`, the body being the message's
//! absolute expiry (Unix milliseconds, 0 for none, u64 BE) followed by the message as an MQTT 5 PUBLISH packet;
//! and `commit`, the offset (decimal text) below which everything was acknowledged. Offsets count bytes across
//! segments and only grow, so a record's offset names it for good.
//!
//! At open, every segment is read through: the first record that is short or fails its CRC (a write torn by a
//! power cut) is where the journal ends; the rest of that segment and any later ones are removed, and logged.
//! Reading for sending starts at the commit offset, so what was sent and not yet acknowledged before a restart is
//! sent again. The commit offset is written on the sync tick (at least every second) and at shutdown, not per
//! acknowledgement: after a crash, what the remote acknowledged since the last tick is sent again too (at least
//! once, never lost).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tollgate_core::Message;
use tracing::warn;

const HEADER: usize = 8;
/// A record body larger than this is not something this journal wrote: the rest is treated as torn.
const MAX_BODY: usize = 268_435_460 + 8;

/// When appended records reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every batch the spooler appends, before it takes the next: nothing in the journal is lost to a
    /// power cut.
    Always,
    /// Every so often (the bridge calls [`Journal::sync`] on a timer): a power cut loses at most that much.
    Interval(Duration),
    /// Left to the operating system; a crash of the broker alone still loses nothing.
    Never,
}

/// When a local publisher's QoS 1 or 2 message that the bridge forwards is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckPolicy {
    /// Once the message is in the journal (and on the disk with [`FsyncPolicy::Always`]): a PUBACK means the
    /// bridge has it, whatever happens to the process next. The publisher is answered no faster than the journal
    /// takes messages.
    #[default]
    AfterDurable,
    /// As soon as the message is routed, as for any subscriber: a crash before the spooler's next write loses
    /// what was acknowledged and not yet in the journal.
    Immediate,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalSettings {
    pub dir: PathBuf,
    /// Bytes on disk at most; beyond, the oldest segment goes (its messages counted as dropped).
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    pub ack: AckPolicy,
}

#[derive(Debug)]
struct Segment {
    start: u64,
    len: u64,
    records: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A record handed out for sending and not yet settled.
#[derive(Debug)]
struct Handed {
    next: u64,
    settled: bool,
}

/// What opening found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    pub messages: u64,
    pub bytes: u64,
    /// Bytes cut off at a torn or corrupt record.
    pub truncated_bytes: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct JournalCounts {
    /// Messages waiting (appended, not yet acknowledged by the remote).
    pub messages: u64,
    pub bytes: u64,
    /// Dropped because the journal was full (oldest first).
    pub dropped_overflow: u64,
    /// Discarded unsent because their Message Expiry had passed.
    pub expired: u64,
}

pub struct Journal {
    /// Kept in the directory's `id` file; see [`Journal::instance`].
    instance: String,
    settings: JournalSettings,
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// The next offset to write.
    end: u64,
    /// Everything below was acknowledged (or dropped).
    committed: u64,
    /// Where reading for sending goes on.
    cursor: u64,
    reader: Option<(u64, File)>,
    handed: BTreeMap<u64, Handed>,
    /// Messages between `committed` and `end`.
    pending: u64,
    counts: JournalCounts,
    unsynced: bool,
    commit_written: u64,
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.seg"))
}

/// The record for `message`: its stored form (expiry made absolute, the message as an MQTT 5 PUBLISH).
fn encode_record(message: &Message, now: tokio::time::Instant) -> io::Result<Vec<u8>> {
    let mut body = BytesMut::new();
    message.encode_stored(now, &[], &mut body).map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    let mut record = Vec::with_capacity(HEADER + body.len());
    record.extend_from_slice(&(body.len() as u32).to_be_bytes());
    record.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    record.extend_from_slice(&body);
    Ok(record)
}

/// The message in a record body, with its expiry as an `Instant` again; `None` if unreadable.
fn decode_body(body: &[u8], now: tokio::time::Instant) -> Option<(Message, bool)> {
    Message::decode_stored(body, now).map(|stored| (stored.message, stored.expired))
}

/// Reads the record at the reader's position: `Ok(None)` at a clean end, `Err` for a short or corrupt record.
fn read_record(file: &mut impl Read) -> Result<Option<Vec<u8>>, ()> {
    let mut header = [0u8; HEADER];
    let mut filled = 0;
    while filled < HEADER {
        match file.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(()),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(()),
        }
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_BODY {
        return Err(());
    }
    let mut body = vec![0u8; len];
    file.read_exact(&mut body).map_err(drop)?;
    if crc32fast::hash(&body) != crc {
        return Err(());
    }
    Ok(Some(body))
}

impl Journal {
    /// Opens (or creates) the journal in `settings.dir`, recovering what a crash left.
    pub fn open(settings: JournalSettings) -> io::Result<(Self, Recovery)> {
        fs::create_dir_all(&settings.dir)?;
        let mut starts: Vec<u64> = fs::read_dir(&settings.dir)?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name();
                name.to_str()?.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        starts.sort_unstable();
        let committed_on_disk = fs::read_to_string(settings.dir.join("commit"))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let mut torn = false;
        for start in starts {
            let path = segment_path(&settings.dir, start);
            let expected_start = segments.back().map_or(start, Segment::end);
            if torn || start != expected_start {
                // After a torn record, or across a gap: nothing here can be trusted to follow on.
                recovery.truncated_bytes += fs::metadata(&path).map_or(0, |meta| meta.len());
                fs::remove_file(&path)?;
                torn = true;
                continue;
            }
            let mut file = io::BufReader::new(File::open(&path)?);
            let (mut len, mut records) = (0u64, 0u64);
            loop {
                match read_record(&mut file) {
                    Ok(Some(body)) => {
                        let at = start + len;
                        len += (HEADER + body.len()) as u64;
                        records += 1;
                        if at >= committed_on_disk {
                            recovery.messages += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(()) => {
                        torn = true;
                        break;
                    }
                }
            }
            let on_disk = fs::metadata(&path)?.len();
            if on_disk > len {
                recovery.truncated_bytes += on_disk - len;
                OpenOptions::new().write(true).open(&path)?.set_len(len)?;
            }
            segments.push_back(Segment { start, len, records });
        }
        let first = segments.front().map_or(committed_on_disk, |segment| segment.start);
        let end = segments.back().map_or(committed_on_disk, Segment::end);
        // A commit beyond what survived (the segments were cut) falls back to the end; before the first segment,
        // to its start.
        let committed = committed_on_disk.clamp(first, end);
        recovery.bytes = end - committed;
        if recovery.truncated_bytes > 0 {
            warn!(dir = %settings.dir.display(), bytes = recovery.truncated_bytes, "bridge journal: a torn or corrupt tail was cut off");
        }
        // Names this journal's offsets in message ids. A new one whenever offsets could start over (an empty
        // journal without a commit), so an id is never given to two messages.
        let id_path = settings.dir.join("id");
        let fresh = segments.is_empty() && committed_on_disk == 0;
        let instance = match fs::read_to_string(&id_path) {
            Ok(text) if !fresh && !text.trim().is_empty() => text.trim().to_owned(),
            _ => {
                let instance = crate::instance_id();
                fs::write(&id_path, &instance)?;
                instance
            }
        };
        let mut journal = Self {
            instance,
            settings,
            segments,
            writer: None,
            end,
            committed,
            cursor: committed,
            reader: None,
            handed: BTreeMap::new(),
            pending: recovery.messages,
            counts: JournalCounts::default(),
            unsynced: false,
            commit_written: committed_on_disk,
        };
        journal.remove_settled_segments()?;
        Ok((journal, recovery))
    }

    /// With a record's offset, names the record for good: `<instance>-<offset>` is a message id no other record
    /// of this or any other journal has.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn counts(&self) -> JournalCounts {
        JournalCounts { messages: self.pending, bytes: self.end - self.committed, ..self.counts }
    }

    fn writer(&mut self, record_len: u64) -> io::Result<&mut File> {
        let rotate = match self.segments.back() {
            None => true,
            Some(last) => last.len > 0 && last.len + record_len > self.settings.segment_bytes,
        };
        if rotate {
            self.sync_data()?;
            let path = segment_path(&self.settings.dir, self.end);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            self.segments.push_back(Segment { start: self.end, len: 0, records: 0 });
            self.writer = Some(file);
            if self.settings.fsync == FsyncPolicy::Always {
                File::open(&self.settings.dir)?.sync_all()?;
            }
        }
        if self.writer.is_none() {
            let start = self.segments.back().map_or(self.end, |segment| segment.start);
            self.writer = Some(OpenOptions::new().append(true).open(segment_path(&self.settings.dir, start))?);
        }
        self.writer.as_mut().ok_or_else(|| io::Error::other("no segment to write"))
    }

    /// Appends a message. Returns how many older messages were dropped to stay within `max_bytes`.
    pub fn append(&mut self, message: &Message) -> io::Result<u64> {
        let record = encode_record(message, tokio::time::Instant::now())?;
        let record_len = record.len() as u64;
        self.writer(record_len)?.write_all(&record)?;
        if let Some(last) = self.segments.back_mut() {
            last.len += record_len;
            last.records += 1;
        }
        self.end += record_len;
        self.pending += 1;
        self.unsynced = true;
        self.enforce_budget()
    }

    /// With [`FsyncPolicy::Always`], puts what was appended since the last call on the disk: the spooler calls it
    /// after each batch, before it completes the batch locally (one fsync per batch, not per message).
    pub fn flush_appends(&mut self) -> io::Result<()> {
        if self.settings.fsync == FsyncPolicy::Always && self.unsynced {
            self.sync_data()?;
        }
        Ok(())
    }

    /// Drops whole oldest segments while over budget (never the one being written).
    fn enforce_budget(&mut self) -> io::Result<u64> {
        let mut dropped = 0;
        while self.segments.len() > 1
            && self.end - self.segments.front().map_or(self.end, |s| s.start) > self.settings.max_bytes
        {
            let Some(oldest) = self.segments.pop_front() else { break };
            let lost = if self.committed >= oldest.end() {
                0
            } else {
                // Approximate for a segment partly acknowledged: all but the settled part's share.
                let unsettled = oldest.end() - self.committed.max(oldest.start);
                (oldest.records * unsettled).div_ceil(oldest.len.max(1))
            };
            dropped += lost;
            self.pending = self.pending.saturating_sub(lost);
            fs::remove_file(segment_path(&self.settings.dir, oldest.start))?;
            let next = oldest.end();
            if self.committed < next {
                self.committed = next;
            }
            if self.cursor < next {
                self.cursor = next;
                self.reader = None;
            }
            self.handed.retain(|&offset, _| offset >= next);
        }
        self.counts.dropped_overflow += dropped;
        Ok(dropped)
    }

    /// Up to `limit` messages from the cursor on, each with its offset; expired ones are settled on the way.
    pub fn next(&mut self, limit: usize) -> io::Result<Vec<(u64, Message)>> {
        let mut out = Vec::new();
        let now = tokio::time::Instant::now();
        while out.len() < limit && self.cursor < self.end {
            let Some(segment) =
                self.segments.iter().find(|segment| segment.start <= self.cursor && self.cursor < segment.end())
            else {
                break;
            };
            let (segment_start, position) = (segment.start, self.cursor - segment.start);
            let reader = match &mut self.reader {
                Some((start, file)) if *start == segment_start => file,
                _ => {
                    let mut file = File::open(segment_path(&self.settings.dir, segment_start))?;
                    file.seek(SeekFrom::Start(position))?;
                    &mut self.reader.insert((segment_start, file)).1
                }
            };
            let offset = self.cursor;
            let Ok(Some(body)) = read_record(reader) else {
                // Written by this process and read back short: the disk failed us. Skip the segment's rest.
                warn!(dir = %self.settings.dir.display(), offset, "bridge journal: unreadable record; the rest of its segment is skipped");
                let skip_to =
                    segment_start + self.segments.iter().find(|s| s.start == segment_start).map_or(0, |s| s.len);
                self.settle_range(offset, skip_to);
                self.cursor = skip_to;
                self.reader = None;
                continue;
            };
            let next = offset + (HEADER + body.len()) as u64;
            self.cursor = next;
            match decode_body(&body, now) {
                Some((_, true)) => {
                    self.counts.expired += 1;
                    self.handed.insert(offset, Handed { next, settled: true });
                    self.pending = self.pending.saturating_sub(1);
                }
                Some((message, false)) => {
                    self.handed.insert(offset, Handed { next, settled: false });
                    out.push((offset, message));
                }
                None => {
                    self.handed.insert(offset, Handed { next, settled: true });
                    self.pending = self.pending.saturating_sub(1);
                }
            }
        }
        self.advance()?;
        Ok(out)
    }

    fn settle_range(&mut self, from: u64, to: u64) {
        self.handed.insert(from, Handed { next: to, settled: true });
    }

    /// The remote acknowledged (or refused) the message at `offset`: it need not be kept.
    pub fn settle(&mut self, offset: u64) -> io::Result<()> {
        if let Some(handed) = self.handed.get_mut(&offset)
            && !handed.settled
        {
            handed.settled = true;
            self.pending = self.pending.saturating_sub(1);
        }
        self.advance()
    }

    /// Moves the commit over settled records at its front and removes segments wholly below it.
    fn advance(&mut self) -> io::Result<()> {
        let before = self.committed;
        while let Some(entry) = self.handed.first_entry() {
            if *entry.key() != self.committed || !entry.get().settled {
                break;
            }
            self.committed = entry.remove().next;
        }
        if self.committed != before {
            self.remove_settled_segments()?;
        }
        Ok(())
    }

    fn remove_settled_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|segment| segment.end() <= self.committed) {
            if let Some(segment) = self.segments.pop_front() {
                if self.reader.as_ref().is_some_and(|(start, _)| *start == segment.start) {
                    self.reader = None;
                }
                fs::remove_file(segment_path(&self.settings.dir, segment.start))?;
            }
        }
        Ok(())
    }

    /// After the link dropped: what was handed out and not settled is read again, from the commit on.
    /// Returns where reading had got to: records below it were handed out before, and go again as resends.
    pub fn rewind(&mut self) -> u64 {
        // Settled entries above the commit are read (and sent) again too: at most the in-flight window twice.
        let reached = self.cursor;
        self.handed.clear();
        self.cursor = self.committed;
        self.reader = None;
        self.pending = self.recount();
        reached
    }

    /// Messages between the commit and the end, counted by reading headers (after a rewind only).
    fn recount(&self) -> u64 {
        let mut count = 0;
        for segment in &self.segments {
            if segment.end() <= self.committed {
                continue;
            }
            if segment.start >= self.committed {
                count += segment.records;
                continue;
            }
            let Ok(mut file) = File::open(segment_path(&self.settings.dir, segment.start)) else { continue };
            if file.seek(SeekFrom::Start(self.committed - segment.start)).is_err() {
                continue;
            }
            let mut file = io::BufReader::new(file);
            while let Ok(Some(_)) = read_record(&mut file) {
                count += 1;
            }
        }
        count
    }

    fn sync_data(&mut self) -> io::Result<()> {
        if let Some(writer) = &self.writer {
            writer.sync_data()?;
        }
        self.unsynced = false;
        Ok(())
    }

    fn write_commit(&mut self) -> io::Result<()> {
        if self.commit_written == self.committed {
            return Ok(());
        }
        let temporary = self.settings.dir.join("commit.tmp");
        {
            let mut file = File::create(&temporary)?;
            file.write_all(self.committed.to_string().as_bytes())?;
            if self.settings.fsync != FsyncPolicy::Never {
                file.sync_all()?;
            }
        }
        fs::rename(&temporary, self.settings.dir.join("commit"))?;
        self.commit_written = self.committed;
        Ok(())
    }

    /// Flushes appended records to the disk and records the commit (the interval policy's tick, and shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced && self.settings.fsync != FsyncPolicy::Never {
            self.sync_data()?;
        }
        self.write_commit()
    }
}

/// A journal shared by the bridge's spooler (appending) and its link (reading and settling).
pub type SharedJournal = Arc<std::sync::Mutex<Journal>>;

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_protocol::QoS;

    fn settings(dir: &Path) -> JournalSettings {
        JournalSettings {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            fsync: FsyncPolicy::Never,
            ack: AckPolicy::AfterDurable,
        }
    }

    fn message(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.to_owned().into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            origin: None,
        }
    }

    /// A journal with t/0, t/1 and t/2 (same size each) written and closed: its directory and only segment.
    fn three_records_closed() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(settings(dir.path())).expect("open");
        for index in 0..3 {
            journal.append(&message(&format!("t/{index}"), "payload")).expect("append");
        }
        let segment = segment_path(dir.path(), 0);
        (dir, segment)
    }

    fn topics(batch: &[(u64, Message)]) -> Vec<String> {
        batch.iter().map(|(_, message)| message.topic.to_string()).collect()
    }

    #[test]
    fn the_instance_id_holds_while_offsets_continue_and_changes_when_they_could_start_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(settings(dir.path())).expect("open");
        let first = journal.instance().to_owned();
        assert_eq!(first.len(), 16);
        journal.append(&message("t/0", "x")).expect("append");
        drop(journal);
        let (journal, _) = Journal::open(settings(dir.path())).expect("reopen");
        assert_eq!(journal.instance(), first, "the same records, the same names");
        drop(journal);
        // Emptied by hand (segments and commit gone): offsets restart at 0, so the instance must change.
        for entry in fs::read_dir(dir.path()).expect("list") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|name| name != "id") {
                fs::remove_file(path).expect("remove");
            }
        }
        let (journal, _) = Journal::open(settings(dir.path())).expect("reopen empty");
        assert_ne!(journal.instance(), first);
    }

    #[test]
    fn what_is_not_settled_survives_a_reopen_and_what_is_settled_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, recovery) = Journal::open(settings(dir.path())).expect("open");
        assert_eq!(recovery, Recovery::default());
        for index in 0..10 {
            journal.append(&message(&format!("t/{index}"), "x")).expect("append");
        }
        let batch = journal.next(4).expect("next");
        assert_eq!(topics(&batch), ["t/0", "t/1", "t/2", "t/3"]);
        // Settled out of order: the commit moves only over the settled front.
        journal.settle(batch[1].0).expect("settle");
        journal.settle(batch[0].0).expect("settle");
        journal.settle(batch[3].0).expect("settle");
        assert_eq!(journal.counts().messages, 7);
        journal.sync().expect("sync");
        drop(journal);
        let (mut journal, recovery) = Journal::open(settings(dir.path())).expect("reopen");
        assert_eq!(recovery.messages, 8, "t/2 (unsettled) and t/3 (settled behind it) come back, with t/4..t/9");
        assert_eq!(topics(&journal.next(100).expect("next"))[..2], ["t/2", "t/3"]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_the_journal_goes_on_after_it() {
        let (dir, segment) = three_records_closed();
        let length = fs::metadata(&segment).expect("segment").len();
        // A power cut in the middle of the third record.
        OpenOptions::new().write(true).open(&segment).expect("open").set_len(length - 5).expect("cut");
        let (mut journal, recovery) = Journal::open(settings(dir.path())).expect("reopen");
        assert_eq!(recovery.messages, 2);
        assert!(recovery.truncated_bytes > 0);
        journal.append(&message("t/after", "x")).expect("append");
        assert_eq!(topics(&journal.next(10).expect("next")), ["t/0", "t/1", "t/after"]);
    }

    #[test]
    fn a_flipped_bit_ends_the_journal_at_that_record() {
        let (dir, segment) = three_records_closed();
        let mut bytes = fs::read(&segment).expect("read");
        let second_record_body = bytes.len() / 3 + HEADER + 4;
        bytes[second_record_body] ^= 0x01;
        fs::write(&segment, bytes).expect("write");
        let (mut journal, recovery) = Journal::open(settings(dir.path())).expect("reopen");
        assert_eq!(recovery.messages, 1);
        assert_eq!(topics(&journal.next(10).expect("next")), ["t/0"]);
    }

    #[test]
    fn segments_rotate_and_go_once_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(settings(dir.path())).expect("open");
        let payload = "p".repeat(1000);
        for index in 0..12 {
            journal.append(&message(&format!("t/{index}"), &payload)).expect("append");
        }
        let segments = || {
            fs::read_dir(dir.path())
                .expect("dir")
                .filter(|entry| entry.as_ref().is_ok_and(|entry| entry.file_name().to_string_lossy().ends_with(".seg")))
                .count()
        };
        assert!(segments() >= 3, "4 KiB segments hold 3 records each");
        let batch = journal.next(100).expect("next");
        assert_eq!(batch.len(), 12);
        for (offset, _) in &batch {
            journal.settle(*offset).expect("settle");
        }
        assert_eq!(segments(), 1, "only the segment being written stays");
        assert_eq!(journal.counts().messages, 0);
    }

    #[test]
    fn a_full_journal_drops_its_oldest_messages_and_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut small = settings(dir.path());
        small.max_bytes = 8192;
        let (mut journal, _) = Journal::open(small).expect("open");
        let payload = "p".repeat(1000);
        let mut dropped = 0;
        for index in 0..30 {
            dropped += journal.append(&message(&format!("t/{index}"), &payload)).expect("append");
        }
        assert!(dropped > 0);
        assert_eq!(journal.counts().dropped_overflow, dropped);
        let kept = journal.next(100).expect("next");
        assert_eq!(kept.len() as u64 + dropped, 30, "every message kept or counted");
        assert_eq!(kept.last().map(|(_, message)| message.topic.to_string()), Some("t/29".into()));
        assert!(journal.counts().bytes <= 8192 + 4096);
    }

    #[test]
    fn a_rewind_reads_again_what_was_not_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(settings(dir.path())).expect("open");
        for index in 0..5 {
            journal.append(&message(&format!("t/{index}"), "x")).expect("append");
        }
        let batch = journal.next(3).expect("next");
        journal.settle(batch[0].0).expect("settle");
        let reached = journal.rewind();
        assert!(reached > batch[2].0, "t/0..t/2 were handed out: resends");
        let next = journal.next(10).expect("next");
        assert!(next[1].0 < reached && next[2].0 >= reached, "t/3 was never handed out");
        journal.rewind();
        assert_eq!(journal.counts().messages, 4);
        assert_eq!(topics(&journal.next(10).expect("next")), ["t/1", "t/2", "t/3", "t/4"]);
    }

    #[test]
    fn an_expired_message_is_not_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut journal, _) = Journal::open(settings(dir.path())).expect("open");
        let mut stale = message("t/stale", "x");
        stale.expires_at = Some(tokio::time::Instant::now());
        journal.append(&stale).expect("append");
        let mut fresh = message("t/fresh", "x");
        fresh.expires_at = Some(tokio::time::Instant::now() + Duration::from_secs(60));
        journal.append(&fresh).expect("append");
        let batch = journal.next(10).expect("next");
        assert_eq!(topics(&batch), ["t/fresh"]);
        let expiry = batch[0].1.remaining_expiry(tokio::time::Instant::now());
        assert!(expiry.is_some_and(|seconds| (59..=60).contains(&seconds)), "{expiry:?}");
        assert_eq!(journal.counts().expired, 1);
    }
}
