//! Durable state: the only module that names sled.
//!
//! # How durability is achieved
//! sled's `flush` uses `sync_file_range`, which does not guarantee durability on power loss (sled issue #1452), so
//! sled is not the source of truth. Every change is a [`Commit`]: audit entries plus key/value writes. One committer
//! thread takes every commit waiting in its queue (group commit), then
//!
//! 1. appends their audit entries to the audit log ([`crate::audit::AuditLog`]) and their writes to the state journal
//!    ([`journal`]: segment files filled with zeros ahead of use), the group's first journal record carrying the same
//!    audit entries' bytes,
//! 2. `fdatasync`s the journal (one device flush per group),
//! 3. takes the lock readers of single keys take, answers each waiting caller,
//! 4. and applies the writes to sled, one by one, before it lets readers in again (so a reader sees a group whole or
//!    not at all, and a reader who heard of a commit sees it; the answer does not wait for sled).
//!
//! A failed write or `fdatasync` takes the group back off both logs, so the next group does not follow
//! unacknowledged records; if that fails, the store refuses further changes.
//!
//! INVARIANT: nothing is acknowledged to a sender, delivered or reported before its journal record, which carries its
//! audit entries, is durable (DESIGN.md invariants 4 and 5).
//!
//! # The audit entries, carried in the journal
//! The first journal record of a group with audit entries starts with a write under [`AUDIT_ENTRIES_KEY`] holding
//! the entries' encodings and the first one's sequence number, so the one `fdatasync` of the journal makes them
//! durable too. `entries.log` is made durable by the checkpointer (below) and when the audit log's start-up cache
//! is saved, and the point it is durable to is recorded in `audit/durable`. On open the audit log cuts off a tail
//! past that point that did not survive (a power loss may leave it short, or with holes), and replaying the journal
//! puts back, through [`AuditLog::repair`], every entry a replayed record carries that the log lacks (and checks
//! those it holds are the same bytes). So a crash can leave a recorded decision whose message was never stored (the
//! sender got no answer and retries), but never a stored message without its decision.
//! The checkpointer makes `entries.log` durable *before* it records how far sled has got, so the entries of every
//! record before the replay point are durable in `entries.log` and replay needs only the records after it. Once an
//! `fdatasync` of `entries.log` has failed, nothing records it as durable again until a restart
//! ([`crate::audit::LogSync`]), so the replay point stays before every entry that might have been lost.
//! Carrying the entries cost the journal their bytes a second time; it saved the second device flush on every
//! commit's path (two `fdatasync`s issued together took a median 288 µs against 180 µs for one; PERFORMANCE.md).
//! Records written by an older broker, which made both files durable on every commit, start with
//! [`AUDIT_NEEDED_KEY`] instead (how many entries the group needed): replay stops at the first such record needing
//! more entries than the audit log holds and cuts it, and everything after it, off the journal.
//!
//! On start, the journal is replayed into sled from the offset sled last recorded, so sled holds every change that
//! was ever acknowledged, whatever sled itself lost. Replaying a write twice is harmless: writes are whole values,
//! replayed in journal order.
//!
//! # How far sled has got
//! INVARIANT: the offset recorded under [`JOURNAL_APPLIED_KEY`] is written only after every write before it has
//! been applied to sled, `entries.log` holds every audit entry those records carry durably, sled has written its
//! buffers (`flush`) and its file has been `fsync`ed. So whatever sled
//! recovers after a crash or a power loss, every write before the recorded offset is in it, and replay from that
//! offset restores the rest; no assumption is made about which of sled's later writes survived. A checkpointer
//! thread does this every [`CHECKPOINT_EVERY`] (ten seconds; and `close` once more), which bounds the replay after a
//! crash.
//! Writing the offset with each group instead (in one atomic sled batch) made sled seal and write an IO buffer per
//! group on its IO threads, waking all seven of them each time: a third of the broker's CPU with one message in
//! flight.
//! The journal is never truncated yet (see ARCHITECTURE.md, "known limits").

pub mod format;
pub mod journal;
pub mod log;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::audit::{AuditEntry, AuditError, AuditLog};
use journal::{Journal, JournalReader};
use log::LogError;

const JOURNAL_APPLIED_KEY: &[u8] = b"\x00journal-applied";
/// How often the checkpointer records how far into the journal sled has durably got. This bounds the journal replayed
/// after a crash (ten seconds of commits); more often cost memory: each sled `flush` grew the broker's RSS (100k
/// queued: 95 MiB at 10 s, 115–122 MiB at 1 s, 146 MiB at 0.2 s; PERFORMANCE.md).
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How many commits one group may hold at most.
const MAX_GROUP: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Log(#[from] LogError),
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    #[error("index database: {0}")]
    Sled(#[from] sled::Error),
    #[error("a stored record could not be decoded: {0}")]
    Decode(String),
    #[error("the change could not be made durable: {message}")]
    CommitFailed { message: String, disk_full: bool },
    #[error("the storage thread has stopped")]
    Stopped,
    #[error("`{0}` is in use by another broker process (it holds `broker.lock` there)")]
    InUse(PathBuf),
    #[error(
        "the index failed (it could not apply an acknowledged change, or a read met an I/O failure of sled's); restart \
         the broker, which replays the journal into it"
    )]
    IndexBroken,
    #[error(
        "storage stopped accepting changes after a failure only a restart recovers from (a full disk?); the broker \
         stopped so that its next start recovers from the journal"
    )]
    NeedsRestart,
    #[error(
        "the data directory `{path}` was written by a newer broker (data format {found}; this broker reads formats up to \
         {supported}): run that version of the broker or a newer one; nothing else in the directory was read or changed"
    )]
    NewerFormat { path: PathBuf, found: u32, supported: u32 },
    #[error(
        "`{0}` holds a restore that did not finish (`restore-unfinished` is there): empty the directory and run \
         `broker restore` again"
    )]
    UnfinishedRestore(PathBuf),
    #[error(
        "`{0}` does not say which data format the directory holds (expected one line, `safeguarding-broker data format \
         <number>`); nothing in the directory was changed"
    )]
    UnreadableFormat(PathBuf),
}

impl StoreError {
    /// True when the failure is lack of space: the disk is full (`ENOSPC`), a quota is used up (`EDQUOT`), or a file
    /// reached the process's file-size limit (`EFBIG`; `broker::run` makes that an error rather than the signal that
    /// would kill the broker). The caller may retry later.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Log(LogError::Io { source, .. }) => Some(source),
            StoreError::Audit(AuditError::Log(LogError::Io { source, .. })) => Some(source),
            StoreError::CommitFailed { disk_full, .. } => return *disk_full,
            _ => None,
        };
        io.is_some_and(|error| {
            matches!(
                error.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::FileTooLarge
            )
        })
    }
}

/// A key and its value, as read back.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A value as [`Store::get`] reads it (the head, for a [`Write::PutAttached`] value) and its attachment, if any.
pub type Attached = (Vec<u8>, Option<Vec<u8>>);

/// One key/value change. Keys and values are (de)serialized as byte strings (`serde_bytes`): postcard writes a
/// byte string exactly as it writes a sequence of `u8` (a varint length, then one byte each), so the journal's
/// format is unchanged, but it is copied whole instead of element by element (which was ~1.5% of the broker's CPU
/// at 64 in flight).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Write {
    Put(#[serde(with = "serde_bytes")] Vec<u8>, #[serde(with = "serde_bytes")] Vec<u8>),
    Delete(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A value kept in the journal, where every write's bytes are anyway: the index holds only where to find them
    /// (a 21-byte [`BlobRef`]), and every read resolves it. For the message and delivery records: anything longer
    /// than a reference (the recipients' copies were written so by older brokers, under `c/` keys; they are now
    /// [`Write::PutAttached`] to their queue entries). Keeping copies out of sled took sled's node rewrites and log
    /// writes of every copy off the commit path (sled was ~40% of the broker's CPU when sending) and left sled's
    /// cache to the small records; keeping the records out too cut what sled writes per message, and so what it
    /// replays on its first open after a long run, by more than half (PERFORMANCE.md, sixth session).
    PutBlob(#[serde(with = "serde_bytes")] Vec<u8>, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Key, head, attachment: a short head held in the index, with a value kept in the journal attached to it (as a
    /// [`Write::PutBlob`] value is). Reads and scans see the head (so a scan of many entries reads no journal);
    /// [`Store::get_attachment`] reads the attachment. For a queue entry and its copy: one key in the index instead
    /// of two, a fifth fewer of sled's writes per message (PERFORMANCE.md, sixth session).
    PutAttached(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Vec<u8>,
    ),
}

/// Marks an index value as a [`BlobRef`]. No plain value starts with it: a recipient's copy (a `pb::Delivery`)
/// written as a plain value by an older broker starts with a field tag, never with 0xFF; a postcard record written
/// plain starts with its id's length, and a 0xFF there (a length of at least 127) could not be followed by this
/// magic in a value of a reference's 21 bytes; the other plain values (`q/`, `i/`) are UTF-8 text.
const BLOB_REF_MAGIC: &[u8] = b"\xffjref";

/// Starts an index value written by [`Write::PutAttached`]: this magic, the head, then the attachment's [`BlobRef`]
/// (its last 21 bytes). No plain value starts with it: 0xFE is not UTF-8, and a postcard record written plain by an
/// older broker would need an id of more than 13,000 characters to start with these bytes.
const ATTACHED_MAGIC: &[u8] = b"\xfejatt";

/// The bytes of a [`BlobRef`] as the index holds them.
const BLOB_REF_BYTES: usize = BLOB_REF_MAGIC.len() + 16;

/// What an index value is.
enum Held<'a> {
    Plain(&'a [u8]),
    Blob(BlobRef),
    Attached { head: &'a [u8], attachment: BlobRef },
}

impl<'a> Held<'a> {
    fn of(stored: &'a [u8]) -> Self {
        if let Some(blob) = BlobRef::decode(stored) {
            return Held::Blob(blob);
        }
        if let Some(rest) = stored.strip_prefix(ATTACHED_MAGIC)
            && let Some(split) = rest.len().checked_sub(BLOB_REF_BYTES)
            && let Some(attachment) = BlobRef::decode(&rest[split..])
        {
            return Held::Attached { head: &rest[..split], attachment };
        }
        Held::Plain(stored)
    }
}

/// Where a [`Write::PutBlob`] value or a [`Write::PutAttached`] attachment is in the journal: `len` bytes at journal
/// offset `offset`, with their CRC-32 (so that reading one copy reads only that copy, not the whole commit it came
/// in: a message to 64 recipients would otherwise decode all 64 copies for each delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobRef {
    offset: u64,
    len: u32,
    crc: u32,
}

impl BlobRef {
    /// The reference to `value`, which starts `value_start` bytes into the journal record whose frame starts at
    /// `record_offset` (see [`encode_record`]).
    fn at(record_offset: u64, value_start: usize, value: &[u8]) -> Self {
        BlobRef {
            offset: record_offset + log::HEADER_BYTES + value_start as u64,
            // A record is at most `MAX_RECORD_BYTES` (256 MiB), so its values fit.
            len: u32::try_from(value.len()).unwrap_or(u32::MAX),
            crc: crc32fast::hash(value),
        }
    }

    fn encode(self) -> Vec<u8> {
        let mut bytes = BLOB_REF_MAGIC.to_vec();
        bytes.extend_from_slice(&self.offset.to_be_bytes());
        bytes.extend_from_slice(&self.len.to_be_bytes());
        bytes.extend_from_slice(&self.crc.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(BLOB_REF_MAGIC)?;
        if bytes.len() != BLOB_REF_BYTES {
            return None;
        }
        let offset: [u8; 8] = rest.get(..8)?.try_into().ok()?;
        let len: [u8; 4] = rest.get(8..12)?.try_into().ok()?;
        let crc: [u8; 4] = rest.get(12..16)?.try_into().ok()?;
        Some(Self { offset: u64::from_be_bytes(offset), len: u32::from_be_bytes(len), crc: u32::from_be_bytes(crc) })
    }
}

/// Encodes a journal record exactly as `postcard::to_stdvec(&JournalRecord { writes })` would (a postcard sequence is
/// its length as a varint followed by its elements), and returns, for each write, where its value starts in the
/// encoding (used for [`Write::PutBlob`]).
fn encode_record(writes: &[Write]) -> Result<(Vec<u8>, Vec<usize>), StoreError> {
    let encode_error = |error: postcard::Error| StoreError::Decode(error.to_string());
    let mut encoded = postcard::to_stdvec(&writes.len()).map_err(encode_error)?;
    let mut value_starts = Vec::with_capacity(writes.len());
    for write in writes {
        encoded.extend_from_slice(&postcard::to_stdvec(write).map_err(encode_error)?);
        let value_len = match write {
            Write::Put(_, value) | Write::PutBlob(_, value) | Write::PutAttached(_, _, value) => value.len(),
            Write::Delete(_) => 0,
        };
        value_starts.push(encoded.len() - value_len);
    }
    Ok((encoded, value_starts))
}

/// A unit of change made durable as a whole: audit entries (their sequence numbers are assigned by the committer)
/// and state writes.
#[derive(Debug, Default)]
pub struct Commit {
    pub audit: Vec<AuditEntry>,
    pub writes: Vec<Write>,
}

#[derive(Serialize, Deserialize)]
struct JournalRecord {
    writes: Vec<Write>,
}

struct Job {
    commit: Commit,
    reply: oneshot::Sender<Result<Vec<u64>, (String, bool)>>,
    /// When it was sent to the committer (for `broker_commit_wait_seconds`).
    queued: std::time::Instant,
}

/// Handle to the durable state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Db,
    /// Held for writing from before the committer answers a group's callers until it has applied the group to sled;
    /// for reading by [`Store::get`] and the seeks (a reader sees a group's writes all or none,
    /// and sees a group it has heard of); scans only wait for a group being applied before they start.
    applying: Arc<std::sync::RwLock<()>>,
    /// Stops the checkpointer when dropped.
    checkpoints: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    checkpoint_thread: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    checkpointer: Arc<IndexCheckpointer>,
    /// Set when applying an answered group to sled failed (sled may hold part of it) or a read met an I/O failure of
    /// sled's ([`Store::index_failed`]): every read is refused until a restart replays the journal into the index.
    index_broken: Arc<std::sync::atomic::AtomicBool>,
    /// Set when the committer stopped accepting changes after a failure only a restart recovers from (shared with
    /// [`Applier`]).
    commits_stopped: Arc<std::sync::atomic::AtomicBool>,
    /// The data directory's lock ([`lock_data_dir`]), held as long as the store, if the caller gave it.
    data_dir_lock: std::sync::Mutex<Option<std::fs::File>>,
    /// Read-only handles on the journal's segments, to read [`Write::PutBlob`] values and [`Write::PutAttached`]
    /// attachments (positioned reads, shared by all readers).
    journal_reader: JournalReader,
    /// The audit log's in-memory index, for auditors' queries (the log itself belongs to the committer thread).
    audit_index: crate::audit::index::SharedIndex,
    jobs: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    committer: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    data_dir: PathBuf,
    /// For tests: makes the journal's next write fail after putting its bytes in the file.
    #[cfg(test)]
    fail_next_journal_write: Arc<std::sync::atomic::AtomicBool>,
    /// For tests: reads of keys under these prefixes fail.
    #[cfg(test)]
    failing_reads: std::sync::Mutex<Vec<Vec<u8>>>,
    /// For tests: [`Store::pause_commits`].
    #[cfg(test)]
    commits_paused: Arc<std::sync::Mutex<()>>,
}

/// What opening found, for the start-up log line.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    pub journal_records_replayed: u64,
    pub journal_bytes_truncated: u64,
    pub audit_entries: u64,
}

/// How the store uses memory and disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Memory sled may use as cache.
    pub index_cache_bytes: u64,
    /// The size of each journal segment (see [`journal`]).
    pub journal_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { index_cache_bytes: 8 * 1024 * 1024, journal_segment_bytes: journal::DEFAULT_SEGMENT_BYTES }
    }
}

impl StoreOptions {
    /// For tests: the smallest segments, so that tests move between segments often and fill little disk.
    pub fn for_tests() -> Self {
        Self { index_cache_bytes: 1024 * 1024, journal_segment_bytes: journal::MIN_SEGMENT_BYTES }
    }
}

/// sled, opened but not yet caught up with the journal (see [`Store::open_index`]).
pub struct OpenedIndex {
    db: sled::Db,
    index_dir: PathBuf,
    applied: u64,
    journal_segment_bytes: u64,
}

impl Store {
    /// Opens the data directory: sled under `index/`, the journal under `journal/`, and the audit log, replaying the
    /// journal into sled.
    pub fn open(data_dir: &Path, audit: AuditLog, options: StoreOptions) -> Result<(Self, OpenReport), StoreError> {
        Self::open_with(Self::open_index(data_dir, options)?, data_dir, audit)
    }

    /// The first half of [`Store::open`], which does not need the audit log: opens sled, which replays its own log
    /// (long after a long run: sled 0.34 writes its snapshot only when it opens), so the broker does it while the
    /// audit log is read.
    pub fn open_index(data_dir: &Path, options: StoreOptions) -> Result<OpenedIndex, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        format::check_and_mark(data_dir)?;
        let index_dir = data_dir.join("index");
        let config = sled::Config::new()
            .path(&index_dir)
            .cache_capacity(options.index_cache_bytes)
            // Our checkpointer flushes sled (see "How far sled has got"); sled's own background flush would only compete
            // with the journal's fsyncs.
            .flush_every_ms(None);
        // sled's IO threads can still hold its file lock for a moment after a store in this process was closed (a
        // buffer write finishing after `flush` returned), so a reopen waits briefly for it; a lock held by another
        // process is still an error after that.
        let mut attempts = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(error))
                    if attempts < 50 && error.to_string().contains("could not acquire lock") =>
                {
                    attempts += 1;
                    thread::sleep(std::time::Duration::from_millis(20));
                }
                result => break result?,
            }
        };
        let applied = match db.get(JOURNAL_APPLIED_KEY)? {
            Some(bytes) => decode_u64(&bytes)?,
            None => 0,
        };
        Ok(OpenedIndex { db, index_dir, applied, journal_segment_bytes: options.journal_segment_bytes })
    }

    /// The second half of [`Store::open`]: replays the journal into the index opened by [`Store::open_index`].
    pub fn open_with(
        index: OpenedIndex,
        data_dir: &Path,
        mut audit: AuditLog,
    ) -> Result<(Self, OpenReport), StoreError> {
        let OpenedIndex { db, index_dir, applied, journal_segment_bytes } = index;
        let mut replayed = 0;
        let mut repaired = 0;
        let mut repair_error = None;
        let journal_dir = data_dir.join(journal::DIR);
        let (journal, recovery) = Journal::open(data_dir, applied, journal_segment_bytes, |offset, payload| {
            let corrupt = |reason: String| LogError::Corrupt { path: journal_dir.clone(), offset, reason };
            let record: JournalRecord = postcard::from_bytes(payload)
                .map_err(|error| corrupt(format!("undecodable journal record: {error}")))?;
            let (again, value_starts) = encode_record(&record.writes).map_err(|error| corrupt(error.to_string()))?;
            if again != payload {
                return Err(corrupt("a journal record does not re-encode to its own bytes".to_owned()));
            }
            if audit_needed(&record.writes).is_some_and(|needed| needed > audit.len()) {
                // Written by an older broker: its group's audit entries did not all become durable, so the group was
                // never acknowledged.
                return Ok(log::Keep::No);
            }
            if let Some((first, entries)) = audit_entries(&record.writes).map_err(corrupt)? {
                match audit.repair(first, entries) {
                    Ok(count) => repaired += count,
                    Err(error) => {
                        repair_error = Some(error);
                        return Err(corrupt("the audit log does not agree with the journal".to_owned()));
                    }
                }
            }
            apply_writes(&db, record.writes, offset, &value_starts).map_err(|error| LogError::Corrupt {
                path: data_dir.join("index"),
                offset,
                reason: format!("could not replay into the index: {error}"),
            })?;
            replayed += 1;
            Ok(log::Keep::Yes)
        })
        .map_err(|error| match repair_error.take() {
            Some(audit_error) => StoreError::Audit(audit_error),
            None => StoreError::Log(error),
        })?;
        if repaired > 0 {
            tracing::warn!(
                entries = repaired,
                "audit entries lost from the audit log's unsynced tail were put back from the journal"
            );
        }
        let applied = Arc::new(std::sync::atomic::AtomicU64::new(journal.len()));
        let audit_written = Arc::new(std::sync::atomic::AtomicU64::new(audit.byte_len()));
        let checkpointer = Arc::new(IndexCheckpointer {
            db: db.clone(),
            index_dir: index_dir.clone(),
            applied: applied.clone(),
            audit_written: audit_written.clone(),
            audit: audit.durability()?,
        });
        // What was replayed (and put back into the audit log) need not be replayed again, and the audit log's
        // durable point moves to what it now holds (`AuditLog::open` leaves it alone).
        checkpointer.checkpoint()?;
        let journal_reader = journal.reader();
        #[cfg(test)]
        let fail_next_journal_write = journal.fail_next_write.clone();
        let audit_index = audit.index();
        let report = OpenReport {
            journal_records_replayed: replayed,
            journal_bytes_truncated: recovery.truncated_bytes,
            audit_entries: audit.len(),
        };
        let applying = Arc::new(std::sync::RwLock::new(()));
        let index_broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let commits_stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel::<Job>();
        #[cfg(test)]
        let commits_paused = Arc::new(std::sync::Mutex::new(()));
        let committer = Applier {
            db: db.clone(),
            applying: applying.clone(),
            applied: applied.clone(),
            index_broken: index_broken.clone(),
            stopped: commits_stopped.clone(),
            audit_written,
            #[cfg(test)]
            paused: commits_paused.clone(),
        };
        let handle = thread::Builder::new()
            .name("committer".to_owned())
            .spawn(move || run_committer(receiver, journal, audit, committer))
            .map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let checkpoints = checkpointer.clone();
        let checkpoint_thread = thread::Builder::new()
            .name("checkpointer".to_owned())
            .spawn(move || run_checkpointer(stopped, &checkpoints))
            .map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        let inner = Inner {
            tree: db,
            applying,
            checkpoints: std::sync::Mutex::new(Some(stop_checkpoints)),
            checkpoint_thread: std::sync::Mutex::new(Some(checkpoint_thread)),
            checkpointer,
            index_broken,
            commits_stopped,
            data_dir_lock: std::sync::Mutex::new(None),
            journal_reader,
            audit_index,
            jobs: std::sync::Mutex::new(Some(sender)),
            committer: std::sync::Mutex::new(Some(handle)),
            data_dir: data_dir.to_owned(),
            #[cfg(test)]
            fail_next_journal_write,
            #[cfg(test)]
            failing_reads: std::sync::Mutex::new(Vec::new()),
            #[cfg(test)]
            commits_paused,
        };
        Ok((Self { inner: Arc::new(inner) }, report))
    }

    /// Makes the commit durable (see the module documentation) and returns the sequence numbers given to its audit
    /// entries.
    pub async fn commit(&self, commit: Commit) -> Result<Vec<u64>, StoreError> {
        self.submit(commit).await
    }

    /// As [`Self::commit`], but the commit joins the committer's queue before this returns, and the future returned
    /// only waits for its answer (it borrows nothing, and dropping it does not take the commit back). Commits
    /// submitted one after another are made durable in that order, and answered in that order. The delivery actors
    /// use this to keep several commits under way at once.
    pub fn submit(&self, commit: Commit) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let queued = match self.inner.jobs.lock() {
            Ok(jobs) => match jobs.as_ref() {
                Some(sender) => sender.send(Job { commit, reply, queued: std::time::Instant::now() }).is_ok(),
                None => false,
            },
            Err(_) => false,
        };
        async move {
            if !queued {
                return Err(StoreError::Stopped);
            }
            match answer.await {
                Ok(Ok(sequences)) => Ok(sequences),
                Ok(Err((message, disk_full))) => Err(StoreError::CommitFailed { message, disk_full }),
                Err(_) => Err(StoreError::Stopped),
            }
        }
    }

    /// Whether the store needs a restart: the index could not apply an acknowledged change, or a read met an I/O
    /// failure of sled's (see [`StoreError::IndexBroken`]; every read and change is refused), or the committer stopped
    /// accepting changes after a failed commit could not be taken back. A restart recovers both from what is durable.
    pub fn needs_restart(&self) -> bool {
        self.inner.index_broken.load(std::sync::atomic::Ordering::Acquire)
            || self.inner.commits_stopped.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once [`Store::needs_restart`]; checked four times a second.
    pub async fn restart_needed(&self) {
        while !self.needs_restart() {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }

    /// Keeps the data directory's lock ([`lock_data_dir`]) for as long as the store lives (its committer and
    /// checkpointer threads included), not just for as long as the caller's scope.
    pub fn hold_lock(&self, lock: std::fs::File) {
        if let Ok(mut held) = self.inner.data_dir_lock.lock() {
            *held = Some(lock);
        }
    }

    /// Waits for a group being applied to sled, then holds it off while the guard lives; refuses when sled could not
    /// apply an answered group (it may hold part of it).
    fn whole_groups(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>, StoreError> {
        let guard = self.inner.applying.read().map_err(|_| StoreError::Stopped)?;
        if self.inner.index_broken.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::IndexBroken);
        }
        Ok(guard)
    }

    /// The value under `key`; a [`Write::PutBlob`] value is read back from the journal (only its bytes, checked
    /// against their CRC); of a [`Write::PutAttached`] value, the head.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.held(key)?.map(|stored| self.resolve(&stored)).transpose()
    }

    /// The attachment of the [`Write::PutAttached`] value under `key`, read back from the journal (checked against
    /// its CRC); `None` if there is no such key or its value has no attachment.
    pub fn get_attachment(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_attached(key)?.and_then(|(_, attachment)| attachment))
    }

    /// In one read, the value under `key` as [`Store::get`] sees it (the head of a [`Write::PutAttached`] value)
    /// and its attachment, if it has one; `None` if there is no such key.
    pub fn get_attached(&self, key: &[u8]) -> Result<Option<Attached>, StoreError> {
        let Some(stored) = self.held(key)? else { return Ok(None) };
        match Held::of(&stored) {
            Held::Attached { head, attachment } => Ok(Some((head.to_vec(), Some(self.read_blob(attachment)?)))),
            _ => Ok(Some((self.resolve(&stored)?, None))),
        }
    }

    /// The value under `key` as the index holds it, read while no answered group is half applied.
    fn held(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        #[cfg(test)]
        if self.inner.failing_reads.lock().unwrap().iter().any(|prefix| key.starts_with(prefix)) {
            return Err(StoreError::Decode("injected read failure".to_owned()));
        }
        let _whole_groups = self.whole_groups()?;
        self.inner.tree.get(key).map_err(|error| self.index_failed(error))
    }

    /// An I/O failure of sled met while reading. When sled's own background write fails (a full disk, say), sled
    /// keeps the failure and fails its later writes with it, and so the reads that need one (a page to consolidate or
    /// split) or a page from disk: a send's first step is such a read, so without this the store could refuse every
    /// send from then on while no change ever failed to apply, and the broker would stay up refusing everything. The
    /// store is marked as needing a restart instead ([`Store::needs_restart`]), which `broker::run` acts on; the next
    /// start replays the journal into the index. Failures a restart does not mend, or that pass by themselves, leave
    /// the store as it was and fail only the read: a corruption or a bug sled reports (a crash loop would not repair
    /// the page; an operator rebuilds the index with `broker restore` from a backup), and an interrupted call, no
    /// memory, or too many open files.
    fn index_failed(&self, error: sled::Error) -> StoreError {
        let needs_restart = match &error {
            sled::Error::Io(io) => {
                !matches!(io.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::OutOfMemory)
                    // EMFILE, ENFILE.
                    && !matches!(io.raw_os_error(), Some(23 | 24))
            }
            _ => false,
        };
        if needs_restart && !self.inner.index_broken.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tracing::error!(error = %error, "the index failed; refusing reads and changes until a restart");
        }
        StoreError::Sled(error)
    }

    /// A value as the index holds it, with a [`BlobRef`] replaced by the bytes it points at and an attached value
    /// by its head. A value written plain (small records, and anything written by a broker from before blobs) is
    /// returned as it is.
    fn resolve(&self, stored: &[u8]) -> Result<Vec<u8>, StoreError> {
        match Held::of(stored) {
            Held::Plain(value) | Held::Attached { head: value, .. } => Ok(value.to_vec()),
            Held::Blob(blob) => self.read_blob(blob),
        }
    }

    fn read_blob(&self, blob: BlobRef) -> Result<Vec<u8>, StoreError> {
        let mut value = vec![0u8; blob.len as usize];
        self.inner.journal_reader.read_exact_at(&mut value, blob.offset)?;
        if crc32fast::hash(&value) != blob.crc {
            return Err(StoreError::Decode("a journal reference does not point at its value".to_owned()));
        }
        Ok(value)
    }

    fn resolve_pair(&self, (key, value): (sled::IVec, sled::IVec)) -> Result<KeyValue, StoreError> {
        Ok((key.to_vec(), self.resolve(&value)?))
    }

    /// Every key/value under `prefix`, in key order. A group being applied when it starts is seen whole; one applied
    /// while it runs may be seen in part.
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        // Waits for a group being applied (its callers may have been answered already).
        let refused = self.whole_groups().err();
        let items =
            match refused {
                Some(_) => None,
                None => Some(self.inner.tree.scan_prefix(prefix).map(|item| {
                    item.map_err(|error| self.index_failed(error)).and_then(|pair| self.resolve_pair(pair))
                })),
            };
        refused.map(Err).into_iter().chain(items.into_iter().flatten())
    }

    /// At most `limit` key/values under `prefix` that come after `after` (from the start of `prefix` without one), in
    /// key order: a long scan taken a page at a time, so that no iterator is held across pages.
    pub fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        // Waits for a group being applied, as `scan_prefix` does, without holding commits up for the whole page.
        drop(self.whole_groups()?);
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        let mut page = Vec::new();
        for item in self.inner.tree.range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded)) {
            let (key, value) = item.map_err(|error| self.index_failed(error))?;
            if !key.starts_with(prefix) || page.len() == limit {
                break;
            }
            page.push(self.resolve_pair((key, value))?);
        }
        Ok(page)
    }

    /// The first key/value after `key`, in key order (a seek, not a scan).
    pub fn next_after(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let found = {
            let _whole_groups = self.whole_groups()?;
            self.inner.tree.get_gt(key).map_err(|error| self.index_failed(error))?
        };
        found.map(|pair| self.resolve_pair(pair)).transpose()
    }

    /// The last key/value under `prefix`, in key order (a seek, not a scan).
    pub fn last_under(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let found = {
            let _whole_groups = self.whole_groups()?;
            self.inner.tree.scan_prefix(prefix).next_back().transpose().map_err(|error| self.index_failed(error))?
        };
        found.map(|pair| self.resolve_pair(pair)).transpose()
    }

    /// The value under `key` as the index holds it, a [`Write::PutBlob`] reference unresolved (tests).
    #[cfg(test)]
    pub(crate) fn index_value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.held(key).ok().flatten().map(|value| value.to_vec())
    }

    /// Whether an index value is a reference to a value in the journal (tests).
    #[cfg(test)]
    pub(crate) fn is_journal_reference(value: &[u8]) -> bool {
        BlobRef::decode(value).is_some()
    }

    /// Holds every commit not yet taken up by the committer (as a stalled disk would) until the guard is dropped
    /// (tests).
    #[cfg(test)]
    pub(crate) fn pause_commits(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.commits_paused.lock().unwrap()
    }

    /// Makes the journal's next write fail, as a full disk would (tests).
    #[cfg(test)]
    pub(crate) fn fail_next_journal_write(&self) {
        self.inner.fail_next_journal_write.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Makes reads of keys under `prefix` fail (as an unreadable page would) until [`Self::mend_reads`] (tests).
    #[cfg(test)]
    pub(crate) fn fail_reads_under(&self, prefix: &[u8]) {
        self.inner.failing_reads.lock().unwrap().push(prefix.to_vec());
    }

    #[cfg(test)]
    pub(crate) fn mend_reads(&self) {
        self.inner.failing_reads.lock().unwrap().clear();
    }

    /// The audit log's index (see [`crate::audit::index`]).
    pub fn audit_index(&self) -> crate::audit::index::SharedIndex {
        self.inner.audit_index.clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// Stops the committer after the commits already queued, then records a last checkpoint (so the next start
    /// replays nothing).
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        if let Ok(mut committer) = self.inner.committer.lock()
            && let Some(handle) = committer.take()
        {
            let _ = handle.join();
        }
        if let Ok(mut checkpoints) = self.inner.checkpoints.lock() {
            checkpoints.take();
        }
        if let Ok(mut checkpoint_thread) = self.inner.checkpoint_thread.lock()
            && let Some(handle) = checkpoint_thread.take()
        {
            let _ = handle.join();
        }
        if let Err(error) = self.inner.checkpointer.checkpoint().and_then(|()| Ok(self.inner.tree.flush()?)) {
            tracing::warn!(error = %error, "could not record how far the index has got; the next start replays more of the journal");
        }
    }
}

/// Takes the data directory for this process (an exclusive `flock` on `broker.lock` in it), before anything in it
/// is opened: a second broker on the same folder would otherwise cut off what it takes for the live one's torn
/// tails, and write over its files. Held while the returned file is open.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = data_dir.join("broker.lock");
    let io_err = |source| StoreError::Log(LogError::Io { path: path.clone(), source });
    std::fs::create_dir_all(data_dir).map_err(io_err)?;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(data_dir.to_owned())),
        Err(std::fs::TryLockError::Error(error)) => Err(io_err(error)),
    }
}

fn decode_u64(bytes: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Decode("bad journal offset".to_owned()))?;
    Ok(u64::from_be_bytes(array))
}

/// Applies the writes of the journal record whose frame starts at `record_offset` to sled; `value_starts` are from
/// [`encode_record`].
fn apply_writes(db: &sled::Db, writes: Vec<Write>, record_offset: u64, value_starts: &[usize]) -> sled::Result<()> {
    for (write, value_start) in writes.into_iter().zip(value_starts) {
        match write {
            Write::Put(key, _) if key == AUDIT_NEEDED_KEY || key == AUDIT_ENTRIES_KEY => {}
            Write::Put(key, value) => {
                db.insert(key, value)?;
            }
            Write::Delete(key) => {
                db.remove(key)?;
            }
            Write::PutBlob(key, value) => {
                db.insert(key, BlobRef::at(record_offset, *value_start, &value).encode())?;
            }
            Write::PutAttached(key, head, attachment) => {
                let mut held = Vec::with_capacity(ATTACHED_MAGIC.len() + head.len() + BLOB_REF_BYTES);
                held.extend_from_slice(ATTACHED_MAGIC);
                held.extend_from_slice(&head);
                held.extend_from_slice(&BlobRef::at(record_offset, *value_start, &attachment).encode());
                db.insert(key, held)?;
            }
        }
    }
    Ok(())
}

/// Records how far into the journal sled has durably got (see "How far sled has got" in the module documentation),
/// from the checkpointer thread, after replay and at close.
struct IndexCheckpointer {
    db: sled::Db,
    index_dir: PathBuf,
    /// How far into the journal sled holds every write (updated by the committer after each group).
    applied: Arc<std::sync::atomic::AtomicU64>,
    /// How long `entries.log` was when `applied` was last updated (updated just before it).
    audit_written: Arc<std::sync::atomic::AtomicU64>,
    /// Once making `entries.log` durable has failed, it fails every time until a restart ([`crate::audit::LogSync`]),
    /// so no checkpoint is recorded again: the next start replays the journal from the last one and puts back
    /// whatever `entries.log` lacks.
    audit: crate::audit::Durability,
}

impl IndexCheckpointer {
    /// Makes `entries.log` durable as far as the applied records need (recording that in `audit/durable`), makes
    /// every write applied so far durable in sled, then records how far into the journal that is. sled's `flush`
    /// writes its buffers with `sync_file_range`, which neither writes the file's metadata nor empties the disk's
    /// cache, so its files are `fsync`ed here. The recorded offset itself becomes durable with the next checkpoint;
    /// until then the previous one stands, which only means replaying a little more.
    fn checkpoint(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        let applied = self.applied.load(Ordering::Acquire);
        let audit_written = self.audit_written.load(Ordering::Acquire);
        self.audit.make_durable(audit_written)?;
        self.db.flush()?;
        sync_sled_files(&self.index_dir)?;
        self.db.insert(JOURNAL_APPLIED_KEY, &applied.to_be_bytes())?;
        Ok(())
    }
}

/// `fsync`s sled's log file, any values it wrote as separate files (`blobs/`, for values over about 128 KiB; sled
/// does not sync them) and the folders that name them.
fn sync_sled_files(dir: &Path) -> Result<(), StoreError> {
    let io = |path: &Path, source| StoreError::Log(LogError::Io { path: path.to_owned(), source });
    let sync =
        |path: &Path| std::fs::File::open(path).and_then(|file| file.sync_all()).map_err(|error| io(path, error));
    let blobs = dir.join("blobs");
    if let Ok(entries) = std::fs::read_dir(&blobs) {
        for entry in entries {
            sync(&entry.map_err(|error| io(&blobs, error))?.path())?;
        }
        sync(&blobs)?;
    }
    sync(&dir.join("db"))?;
    sync(dir)
}

/// What the committer needs to apply a group to sled.
struct Applier {
    db: sled::Db,
    applying: Arc<std::sync::RwLock<()>>,
    applied: Arc<std::sync::atomic::AtomicU64>,
    /// Set when applying a group to sled failed, or a read met an I/O failure of sled's: from then on `applied` stays
    /// where it was, and reads are refused (shared with [`Store`]).
    index_broken: Arc<std::sync::atomic::AtomicBool>,
    /// Set when a group whose `fdatasync` failed could not be cut back off the logs: no further commit is accepted
    /// (what the files hold past that point is unknown; a restart recovers from what is durable).
    stopped: Arc<std::sync::atomic::AtomicBool>,
    /// How long `entries.log` was after the last group applied (see [`IndexCheckpointer`]).
    audit_written: Arc<std::sync::atomic::AtomicU64>,
    /// For tests: held by the committer around each group, so a test holding it holds commits back.
    #[cfg(test)]
    paused: Arc<std::sync::Mutex<()>>,
}

impl Applier {
    fn stop_committing(&self, error: &StoreError, what: &str) {
        self.stopped.store(true, std::sync::atomic::Ordering::Release);
        tracing::error!(error = %error, "{what}");
    }
}

fn run_checkpointer(stop: mpsc::Receiver<()>, checkpointer: &IndexCheckpointer) {
    let mut recorded = checkpointer.applied.load(std::sync::atomic::Ordering::Acquire);
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let now = checkpointer.applied.load(std::sync::atomic::Ordering::Acquire);
        if now == recorded {
            continue;
        }
        match checkpointer.checkpoint() {
            Ok(()) => recorded = now,
            // The previous checkpoint stands: the next start replays more of the journal, nothing is lost.
            Err(error) => tracing::warn!(error = %error, "could not record how far the index has got"),
        }
    }
}

fn run_committer(jobs: mpsc::Receiver<Job>, mut journal: Journal, mut audit: AuditLog, applier: Applier) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        #[cfg(test)]
        let paused = applier.paused.clone();
        #[cfg(test)]
        let _paused = paused.lock();
        let started = std::time::Instant::now();
        let metrics = crate::metrics::metrics();
        for job in &group {
            metrics.commit_wait_seconds.observe(started.saturating_duration_since(job.queued).as_secs_f64());
        }
        let result = commit_group(&mut group, &mut journal, &mut audit, &applier);
        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        metrics.commit_group_size.observe(group.len() as f64);
        metrics.audit_entries.set(audit.len() as i64);
        metrics.audit_log_bytes.set(audit.byte_len() as i64);
        match result {
            Ok((sequences, applying)) => {
                for (job, sequences) in group.into_iter().zip(sequences) {
                    let _ = job.reply.send(Ok(sequences));
                }
                if let Some(applying) = applying {
                    let applying_started = std::time::Instant::now();
                    applying.apply(&applier);
                    metrics.apply_seconds.observe(applying_started.elapsed().as_secs_f64());
                }
            }
            Err(error) => {
                tracing::error!(error = %error, commits = group.len(), "commit failed: nothing in this group was acknowledged");
                let message = error.to_string();
                let disk_full = error.is_disk_full();
                for job in group {
                    let _ = job.reply.send(Err((message.clone(), disk_full)));
                }
            }
        }
    }
}

/// The journal record key under which a record written by an older broker says how many audit entries its group
/// needs (see "The audit entries, carried in the journal" in the module documentation). Not written to sled.
const AUDIT_NEEDED_KEY: &[u8] = b"\x00audit-needed";

/// The journal record key under which a group's first record carries its audit entries: the first one's sequence
/// number (u64 big-endian), then each entry's encoding as `len: u32 LE | bytes`. Not written to sled.
const AUDIT_ENTRIES_KEY: &[u8] = b"\x00audit-entries";

fn encode_audit_entries(first: u64, encoded: &[Vec<u8>]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + encoded.iter().map(|bytes| 4 + bytes.len()).sum::<usize>());
    value.extend_from_slice(&first.to_be_bytes());
    for bytes in encoded {
        // An entry is far smaller than a record (`MAX_RECORD_BYTES`).
        value.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        value.extend_from_slice(bytes);
    }
    value
}

/// Audit entries as a journal record carries them: the first one's sequence number and each one's encoding.
type CarriedEntries = (u64, Vec<Vec<u8>>);

/// The audit entries a journal record carries, if it carries any.
fn audit_entries(writes: &[Write]) -> Result<Option<CarriedEntries>, String> {
    let Some(Write::Put(key, value)) = writes.first() else { return Ok(None) };
    if key != AUDIT_ENTRIES_KEY {
        return Ok(None);
    }
    let bad = || "malformed audit entries in a journal record".to_owned();
    let first: [u8; 8] = value.get(..8).and_then(|bytes| bytes.try_into().ok()).ok_or_else(bad)?;
    let mut rest = &value[8..];
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let len: [u8; 4] = rest.get(..4).and_then(|bytes| bytes.try_into().ok()).ok_or_else(bad)?;
        let len = u32::from_le_bytes(len) as usize;
        let bytes = rest.get(4..4 + len).ok_or_else(bad)?;
        entries.push(bytes.to_vec());
        rest = &rest[4 + len..];
    }
    Ok(Some((u64::from_be_bytes(first), entries)))
}

/// How many audit entries a journal record needs, if it says.
fn audit_needed(writes: &[Write]) -> Option<u64> {
    match writes.first() {
        Some(Write::Put(key, value)) if key == AUDIT_NEEDED_KEY => decode_u64(value).ok(),
        _ => None,
    }
}

/// Makes a group durable and returns each commit's audit sequence numbers, with the group's writes still to be
/// applied to sled once its callers are answered.
fn commit_group<'a>(
    group: &mut [Job],
    journal: &mut Journal,
    audit: &mut AuditLog,
    applier: &'a Applier,
) -> Result<(Vec<Vec<u64>>, Option<Applying<'a>>), StoreError> {
    if applier.stopped.load(std::sync::atomic::Ordering::Acquire)
        || applier.index_broken.load(std::sync::atomic::Ordering::Acquire)
    {
        return Err(StoreError::CommitFailed {
            message:
                "storage stopped accepting changes after an earlier failure (see the broker's log); restart the broker"
                    .to_owned(),
            disk_full: false,
        });
    }
    // 1. Audit entries and state writes are written; the journal, which carries the entries too, is made durable.
    let counts: Vec<usize> = group.iter().map(|job| job.commit.audit.len()).collect();
    let mut entries = Vec::with_capacity(counts.iter().sum());
    for job in group.iter_mut() {
        entries.append(&mut job.commit.audit);
    }
    let first_sequence = audit.len();
    let written = audit.write(entries)?;
    let mut sequences = first_sequence..first_sequence + written.len() as u64;
    let per_job: Vec<Vec<u64>> = counts.iter().map(|count| sequences.by_ref().take(*count).collect()).collect();
    let mut group_writes: Vec<Vec<Write>> = group
        .iter_mut()
        .filter(|job| !job.commit.writes.is_empty())
        .map(|job| std::mem::take(&mut job.commit.writes))
        .collect();
    if let Some(first) = written.first_sequence() {
        let carried = Write::Put(AUDIT_ENTRIES_KEY.to_vec(), encode_audit_entries(first, written.encoded()));
        match group_writes.first_mut() {
            Some(writes) => writes.insert(0, carried),
            None => group_writes.push(vec![carried]),
        }
    }
    let mut encoded = Vec::with_capacity(group_writes.len());
    let mut records = Vec::with_capacity(group_writes.len());
    let mut encoding = Ok(());
    for writes in group_writes {
        match encode_record(&writes) {
            Ok((bytes, value_starts)) => {
                encoded.push(bytes);
                records.push((writes, value_starts));
            }
            Err(error) => {
                encoding = Err(error);
                break;
            }
        }
    }
    let journal_start = journal.len();
    let durable = encoding.and_then(|()| {
        if encoded.is_empty() {
            return Ok(Vec::new());
        }
        let offsets = journal.append(encoded.iter().map(Vec::as_slice))?;
        let syncing = std::time::Instant::now();
        journal.sync()?;
        crate::metrics::metrics().journal_sync_seconds.observe(syncing.elapsed().as_secs_f64());
        Ok(offsets)
    });
    // 2. What failed is taken back off both logs, so that the next group does not follow it.
    let offsets = match durable {
        Ok(offsets) => offsets,
        Err(error) => {
            let rolled_back =
                audit.unwrite(written).map_err(StoreError::from).and_then(|()| Ok(journal.truncate(journal_start)?));
            if let Err(rollback) = rolled_back {
                applier.stop_committing(
                    &rollback,
                    "could not take back a commit that was not made durable; refusing further changes",
                );
            }
            return Err(error);
        }
    };
    audit.publish(written);
    // 3. The index, once the callers are answered (see `Applying`).
    let applying = if offsets.is_empty() {
        None
    } else {
        Some(Applying {
            // A poisoned lock (a reader panicked) still guards nothing but sled's consistency, which is intact.
            whole_group: applier.applying.write().unwrap_or_else(std::sync::PoisonError::into_inner),
            records,
            offsets,
            journal_len: journal.len(),
            audit_len: audit.byte_len(),
        })
    };
    Ok((per_job, applying))
}

/// A durable group whose writes are not in sled yet. It holds the lock that single-key readers take
/// ([`Store::get`] and the seeks) from before its callers are answered until its writes are applied, so a
/// reader who has heard of the group (from an answer) sees it whole, while the answer goes out without waiting for
/// sled (about 40 µs per commit with one message in flight).
struct Applying<'a> {
    whole_group: std::sync::RwLockWriteGuard<'a, ()>,
    records: Vec<(Vec<Write>, Vec<usize>)>,
    offsets: Vec<u64>,
    /// The journal's and the audit log's lengths after the group.
    journal_len: u64,
    audit_len: u64,
}

impl Applying<'_> {
    /// Applies the group to sled. If that fails, the group, durable in the journal and already acknowledged, may be
    /// in the index in part until a restart replays it: how far sled has got stops advancing, and the store refuses
    /// every read and every further change.
    fn apply(self, applier: &Applier) {
        let Applying { whole_group, records, offsets, journal_len, audit_len } = self;
        for ((writes, value_starts), offset) in records.into_iter().zip(offsets) {
            if let Err(error) = apply_writes(&applier.db, writes, offset, &value_starts) {
                applier.index_broken.store(true, std::sync::atomic::Ordering::Release);
                applier.stop_committing(
                    &error.into(),
                    "could not apply an acknowledged commit to the index; refusing further changes until a restart \
                     replays it from the journal",
                );
                return;
            }
        }
        if !applier.index_broken.load(std::sync::atomic::Ordering::Acquire) {
            // The audit log's length first: the checkpointer reads `applied` and then this, and must make durable
            // every entry the records before `applied` carry.
            applier.audit_written.store(audit_len, std::sync::atomic::Ordering::Release);
            applier.applied.store(journal_len, std::sync::atomic::Ordering::Release);
        }
        drop(whole_group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        let audit = AuditLog::open(&dir.join("audit")).unwrap();
        Store::open(dir, audit, StoreOptions::for_tests()).unwrap().0
    }

    /// A copy written as a blob, and an attachment, are read back from the journal, including after sled's index is
    /// lost and rebuilt by replaying the journal; deleting its key forgets it; a plain value under the same kind of
    /// key (written by an older broker) still reads back.
    #[tokio::test]
    async fn blobs_read_back_from_the_journal_after_the_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = vec![7u8; 20_000];
        let second = b"second copy".to_vec();
        store
            .commit(Commit {
                audit: Vec::new(),
                writes: vec![
                    Write::Put(b"d/a".to_vec(), b"record".to_vec()),
                    Write::PutBlob(b"c/a".to_vec(), first.clone()),
                    Write::PutBlob(b"c/b".to_vec(), second.clone()),
                    Write::Put(b"c/legacy".to_vec(), b"plain".to_vec()),
                    Write::PutAttached(b"q/a".to_vec(), b"head a".to_vec(), b"attached a".to_vec()),
                    Write::PutAttached(b"q/b".to_vec(), Vec::new(), first.clone()),
                ],
            })
            .await
            .unwrap();
        let attached = |store: &Store| {
            let heads: Vec<_> = store.scan_prefix(b"q/").map(|item| item.unwrap().1).collect();
            let attachments = [store.get_attachment(b"q/a").unwrap(), store.get_attachment(b"q/b").unwrap()];
            (heads, attachments)
        };
        let expected = (vec![b"head a".to_vec(), Vec::new()], [Some(b"attached a".to_vec()), Some(first.clone())]);
        assert_eq!(attached(&store), expected, "scans see heads; attachments are read from the journal");
        assert_eq!(store.get(b"q/a").unwrap(), Some(b"head a".to_vec()));
        assert_eq!(store.get_attachment(b"c/a").unwrap(), None, "a blob is not an attachment");
        assert_eq!(store.get_attachment(b"c/legacy").unwrap(), None);
        assert!(store.index_value(b"q/b").unwrap().len() < 32, "the index holds the attachment's place");
        assert_eq!(store.get(b"c/a").unwrap(), Some(first.clone()));
        assert_eq!(store.get(b"c/b").unwrap(), Some(second.clone()));
        assert_eq!(store.get(b"c/legacy").unwrap(), Some(b"plain".to_vec()));
        assert!(store.index_value(b"c/a").unwrap().len() < 32, "the index holds a reference, not the copy");
        store.commit(Commit { audit: Vec::new(), writes: vec![Write::Delete(b"c/b".to_vec())] }).await.unwrap();
        assert_eq!(store.get(b"c/b").unwrap(), None);
        store.close();
        drop(store);

        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let store = open(dir.path());
        assert_eq!(store.get(b"c/a").unwrap(), Some(first));
        assert_eq!(store.get(b"c/b").unwrap(), None);
        assert_eq!(store.get(b"d/a").unwrap(), Some(b"record".to_vec()));
        assert_eq!(attached(&store), expected);
        store.close();
    }

    /// sled may lose anything written after its last checkpoint (a crash or a power loss): the journal replays it.
    /// Here sled's folder is rolled back to a copy taken at the checkpoint `close` records, after later commits.
    #[tokio::test]
    async fn an_index_rolled_back_to_its_last_checkpoint_is_caught_up_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .commit(Commit { audit: Vec::new(), writes: vec![Write::Put(b"k/1".to_vec(), b"one".to_vec())] })
            .await
            .unwrap();
        store.close();
        drop(store);
        let saved = save_index(dir.path());

        let store = open(dir.path());
        store
            .commit(Commit {
                audit: Vec::new(),
                writes: vec![
                    Write::Put(b"k/2".to_vec(), b"two".to_vec()),
                    Write::Delete(b"k/1".to_vec()),
                    Write::PutBlob(b"c/2".to_vec(), b"copy".to_vec()),
                ],
            })
            .await
            .unwrap();
        store.close();
        drop(store);
        restore_index(dir.path(), &saved);

        let store = open(dir.path());
        assert_eq!(store.get(b"k/1").unwrap(), None);
        assert_eq!(store.get(b"k/2").unwrap(), Some(b"two".to_vec()));
        assert_eq!(store.get(b"c/2").unwrap(), Some(b"copy".to_vec()));
        store.close();
    }

    fn entry(message_id: &str) -> AuditEntry {
        AuditEntry { message_id: message_id.to_owned(), ..AuditEntry::default() }
    }

    /// A data directory after two commits, as a power loss could leave it: the first commit (entry 0, `k/1`) was
    /// checkpointed; the second (entries 1 and 2, `k/2`) is durable only in the journal, which carries its entries;
    /// sled lost it, and `entries.log` is back at its durable point (`audit/durable`; no start-up cache) plus whatever `damage` leaves
    /// of the second group's entries there (given the log's bytes and where the second group starts).
    /// Returns the bytes `entries.log` had with all three entries.
    async fn after_power_loss(dir: &Path, damage: impl FnOnce(&mut Vec<u8>, usize)) -> Vec<u8> {
        after_power_loss_of(dir, vec![Write::Put(b"k/2".to_vec(), b"two".to_vec())], damage).await
    }

    /// As [`after_power_loss`], with the second group's state writes given (none: a group of audit entries only).
    async fn after_power_loss_of(dir: &Path, writes: Vec<Write>, damage: impl FnOnce(&mut Vec<u8>, usize)) -> Vec<u8> {
        let store = open(dir);
        store
            .commit(Commit { audit: vec![entry("m1")], writes: vec![Write::Put(b"k/1".to_vec(), b"one".to_vec())] })
            .await
            .unwrap();
        store.close();
        drop(store);
        let saved = save_index(dir);
        let audit_dir = dir.join("audit");
        let durable = std::fs::metadata(AuditLog::path(&audit_dir)).unwrap().len();

        let store = open(dir);
        let second = Commit { audit: vec![entry("m2"), entry("m2")], writes };
        assert_eq!(store.commit(second).await.unwrap(), vec![1, 2]);
        store.close();
        drop(store);
        restore_index(dir, &saved);
        crate::audit::write_durable_mark(&audit_dir, durable).unwrap();
        // The start-up cache was saved at close, after the second group's entries were made durable, so it names them.
        // In a power loss that loses them it could not (it makes `entries.log` durable before it records `meta`), so
        // it goes here with them.
        std::fs::remove_dir_all(crate::audit::cache::dir(&audit_dir)).unwrap();
        let original = std::fs::read(AuditLog::path(&audit_dir)).unwrap();
        let mut bytes = original.clone();
        damage(&mut bytes, durable as usize);
        std::fs::write(AuditLog::path(&audit_dir), bytes).unwrap();
        original
    }

    /// After a power loss, the audit entries `entries.log` lost past its durable point (all of them, one of them, or
    /// a hole of zeros where they were) are put back from the journal on open: the tree is the same, the state is
    /// there, and committing goes on from there.
    #[tokio::test]
    async fn audit_entries_lost_past_the_durable_point_are_put_back_from_the_journal() {
        let lost_both: fn(&mut Vec<u8>, usize) = |bytes, durable| bytes.truncate(durable);
        let lost_half: fn(&mut Vec<u8>, usize) =
            |bytes, durable| bytes.truncate(durable + (bytes.len() - durable) / 2 + 3);
        let zeros: fn(&mut Vec<u8>, usize) = |bytes, durable| bytes[durable..].fill(0);
        let zeros_then_second: fn(&mut Vec<u8>, usize) = |bytes, durable| {
            let half = (bytes.len() - durable) / 2;
            bytes[durable..durable + half].fill(0);
        };
        let another_sequence: fn(&mut Vec<u8>, usize) = |bytes, durable| {
            bytes.truncate(durable);
            bytes.extend_from_slice(&frame(&AuditEntry { sequence: 7, ..entry("m2") }));
        };
        for (what, damage) in [
            ("both lost", lost_both),
            ("one lost, one torn", lost_half),
            ("zeros", zeros),
            ("a hole, then an entry", zeros_then_second),
            ("a whole entry with another sequence number", another_sequence),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let original = after_power_loss(dir.path(), damage).await;
            let audit_path = AuditLog::path(&dir.path().join("audit"));
            let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
            assert!(audit.len() < 3, "{what}: the damaged tail is cut off");
            let (store, report) = Store::open(dir.path(), audit, StoreOptions::for_tests()).unwrap();
            assert_eq!(report.audit_entries, 3, "{what}");
            assert_eq!(std::fs::read(&audit_path).unwrap(), original, "{what}: the same entries at the same places");
            assert_eq!(
                crate::audit::read_durable_mark(&dir.path().join("audit")).unwrap(),
                Some(original.len() as u64),
                "{what}: what was put back was made durable and recorded so"
            );
            assert_eq!(store.get(b"k/2").unwrap(), Some(b"two".to_vec()), "{what}");
            let next =
                Commit { audit: vec![entry("m3")], writes: vec![Write::Put(b"k/3".to_vec(), b"three".to_vec())] };
            assert_eq!(store.commit(next).await.unwrap(), vec![3], "{what}");
            store.close();
            drop(store);
            let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
            assert_eq!(audit.len(), 4, "{what}: what was put back is durable");
            crate::audit::verify::verify_entries(&audit_path, &[], 0, &mut |_, _| {}).unwrap();
        }
    }

    /// A group of audit entries alone (no state writes) is carried in a journal record of its own, and put back
    /// from it.
    #[tokio::test]
    async fn an_audit_only_group_lost_past_the_durable_point_is_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let original = after_power_loss_of(dir.path(), Vec::new(), |bytes, durable| bytes.truncate(durable)).await;
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        assert_eq!(audit.len(), 1);
        let (store, report) = Store::open(dir.path(), audit, StoreOptions::for_tests()).unwrap();
        assert_eq!(report.audit_entries, 3);
        assert_eq!(std::fs::read(AuditLog::path(&dir.path().join("audit"))).unwrap(), original);
        store.close();
    }

    /// Once an `fdatasync` of `entries.log` has failed, neither the durable point nor the start-up cache moves
    /// again (a later `fdatasync` could succeed without the lost pages), while commits go on, durable in the journal.
    #[tokio::test]
    async fn after_a_failed_audit_sync_nothing_more_is_recorded_as_durable() {
        let dir = tempfile::tempdir().unwrap();
        let audit_dir = dir.path().join("audit");
        let store = open(dir.path());
        store.commit(Commit { audit: vec![entry("m1")], writes: Vec::new() }).await.unwrap();
        store.close();
        drop(store);
        let mark = crate::audit::read_durable_mark(&audit_dir).unwrap();
        assert_eq!(mark, Some(std::fs::metadata(AuditLog::path(&audit_dir)).unwrap().len()));

        let store = open(dir.path());
        store.commit(Commit { audit: vec![entry("m2")], writes: Vec::new() }).await.unwrap();
        store.inner.checkpointer.audit.fail();
        let sequences = store.commit(Commit { audit: vec![entry("m3")], writes: Vec::new() }).await.unwrap();
        assert_eq!(sequences, vec![2], "commits go on");
        assert!(store.inner.checkpointer.checkpoint().is_err());
        store.close();
        drop(store);
        assert_eq!(crate::audit::read_durable_mark(&audit_dir).unwrap(), mark, "the durable point stayed");
        let audit = AuditLog::open(&audit_dir).unwrap();
        assert_eq!(audit.from_cache(), 1, "the start-up cache stayed at its last save");
        assert_eq!(audit.len(), 3);
    }

    /// The committer answers before it applies a group to sled, holding the readers' lock meanwhile: a reader who
    /// heard of the commit sees all of it (a group big enough that applying it takes a while, read at once).
    #[tokio::test]
    async fn a_reader_answered_after_a_commit_sees_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let writes: Vec<Write> =
            (0..20_000u32).map(|n| Write::Put(format!("k/{n:05}").into_bytes(), n.to_be_bytes().to_vec())).collect();
        store.commit(Commit { audit: vec![entry("m1")], writes }).await.unwrap();
        assert_eq!(store.get(b"k/19999").unwrap(), Some(19_999u32.to_be_bytes().to_vec()));
        store.close();
    }

    /// A data directory a newer broker marked is refused before anything in it is opened or written.
    #[test]
    fn a_data_directory_from_a_newer_broker_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mark = format!("safeguarding-broker data format {}\n", format::DATA_FORMAT + 1);
        std::fs::write(dir.path().join(format::FORMAT_FILE), &mark).unwrap();
        let refused = Store::open_index(dir.path(), StoreOptions::for_tests()).err();
        assert!(matches!(refused, Some(StoreError::NewerFormat { .. })), "{refused:?}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(names, [format::FORMAT_FILE], "nothing else was created");
        assert_eq!(std::fs::read_to_string(dir.path().join(format::FORMAT_FILE)).unwrap(), mark);
        // A new directory is marked when it is opened.
        let fresh = tempfile::tempdir().unwrap();
        drop(Store::open_index(fresh.path(), StoreOptions::for_tests()).unwrap());
        assert_eq!(format::read_mark(fresh.path()).unwrap(), format::Mark::Format(format::DATA_FORMAT));
    }

    /// Writes encode exactly as they did when keys and values were plain sequences of `u8` (journals written
    /// before still replay, and re-encode to their own bytes), and decode back.
    #[test]
    fn writes_encode_as_before_byte_strings() {
        #[derive(Serialize)]
        enum Before {
            Put(Vec<u8>, Vec<u8>),
            Delete(Vec<u8>),
            PutBlob(Vec<u8>, Vec<u8>),
        }
        let long: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let now = vec![
            Write::Put(b"m/1".to_vec(), long.clone()),
            Write::Delete(Vec::new()),
            Write::PutBlob(b"c/1".to_vec(), vec![0, 0x80, 0xff]),
        ];
        let before = vec![
            Before::Put(b"m/1".to_vec(), long),
            Before::Delete(Vec::new()),
            Before::PutBlob(b"c/1".to_vec(), vec![0, 0x80, 0xff]),
        ];
        let encoded = postcard::to_stdvec(&now).unwrap();
        assert_eq!(encoded, postcard::to_stdvec(&before).unwrap());
        assert_eq!(postcard::from_bytes::<Vec<Write>>(&encoded).unwrap(), now);
    }

    /// No room (a full disk, a used-up quota, a file at the process's size limit) is told apart from other failures:
    /// the change may be retried later.
    #[test]
    fn lack_of_room_is_told_apart() {
        let io = |source: std::io::Error| StoreError::Log(LogError::Io { path: PathBuf::from("journal"), source });
        for raw in [28, 122, 27] {
            // ENOSPC, EDQUOT, EFBIG on Linux.
            assert!(io(std::io::Error::from_raw_os_error(raw)).is_disk_full(), "os error {raw}");
        }
        assert!(!io(std::io::Error::from_raw_os_error(5)).is_disk_full(), "EIO");
        assert!(!io(std::io::Error::other("injected failure")).is_disk_full());
    }

    /// An I/O failure of sled's met by a read (a send's first step) marks the store as needing a restart, as a failed
    /// apply does, and every later read is refused. A failure a restart would not mend, or one that passes, does not.
    #[tokio::test]
    async fn a_failure_of_sled_met_by_a_read_asks_for_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let put = Commit { audit: Vec::new(), writes: vec![Write::Put(b"k/1".to_vec(), b"v".to_vec())] };
        store.commit(put).await.unwrap();
        for passing in [
            sled::Error::Unsupported("a request sled does not support".to_owned()),
            sled::Error::ReportableBug("a bug sled reports".to_owned()),
            sled::Error::Io(std::io::Error::from(std::io::ErrorKind::Interrupted)),
            sled::Error::Io(std::io::Error::from_raw_os_error(24)),
        ] {
            assert!(matches!(store.index_failed(passing), StoreError::Sled(_)));
        }
        assert!(!store.needs_restart(), "not a failure a restart mends");
        assert_eq!(store.get(b"k/1").unwrap(), Some(b"v".to_vec()));
        // What `held`, the scans and the seeks do with an error from sled.
        let failed = store.index_failed(sled::Error::Io(std::io::Error::from(std::io::ErrorKind::FileTooLarge)));
        assert!(matches!(failed, StoreError::Sled(_)));
        tokio::time::timeout(std::time::Duration::from_secs(5), store.restart_needed()).await.unwrap();
        assert!(matches!(store.get(b"k/1"), Err(StoreError::IndexBroken)));
        assert!(matches!(store.scan_page(b"k/", None, 10), Err(StoreError::IndexBroken)));
        let change = Commit { audit: Vec::new(), writes: vec![Write::Put(b"k/2".to_vec(), b"v".to_vec())] };
        assert!(store.commit(change).await.is_err(), "changes are refused too");
    }

    /// Once sled could not apply an answered group (it may hold part of it), every read is refused, scans and seeks
    /// included, and so is every change.
    #[tokio::test]
    async fn after_a_failed_apply_reads_and_changes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let put = |key: &[u8]| Commit { audit: Vec::new(), writes: vec![Write::Put(key.to_vec(), b"v".to_vec())] };
        store.commit(put(b"k/1")).await.unwrap();
        let healthy = tokio::time::timeout(std::time::Duration::from_millis(600), store.restart_needed()).await;
        assert!(healthy.is_err() && !store.needs_restart(), "a sound store does not ask for a restart");
        // What `Applying::apply` does when sled fails.
        store.inner.index_broken.store(true, std::sync::atomic::Ordering::Release);
        assert!(matches!(store.get(b"k/1"), Err(StoreError::IndexBroken)));
        assert!(matches!(store.get_attachment(b"k/1"), Err(StoreError::IndexBroken)));
        assert!(matches!(store.next_after(b"k/"), Err(StoreError::IndexBroken)));
        assert!(matches!(store.last_under(b"k/"), Err(StoreError::IndexBroken)));
        assert!(matches!(store.scan_page(b"k/", None, 10), Err(StoreError::IndexBroken)));
        assert!(matches!(store.scan_prefix(b"k/").next(), Some(Err(StoreError::IndexBroken))));
        assert!(matches!(store.commit(put(b"k/2")).await, Err(StoreError::CommitFailed { .. })));
        // What the broker waits on to stop (and be restarted, which replays the journal).
        tokio::time::timeout(std::time::Duration::from_secs(5), store.restart_needed()).await.unwrap();
        assert!(store.needs_restart());
        store.close();
    }

    /// A second broker on a data directory in use is refused before it opens anything there; the folder is free
    /// again once the first lets go.
    #[test]
    fn a_data_directory_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        assert!(matches!(lock_data_dir(dir.path()), Err(StoreError::InUse(_))));
        drop(held);
        lock_data_dir(dir.path()).unwrap();
    }

    /// A record as `entries.log` frames it.
    fn frame(entry: &AuditEntry) -> Vec<u8> {
        let encoded = entry.encode().unwrap();
        let mut bytes = (encoded.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&encoded).to_le_bytes());
        bytes.extend_from_slice(&encoded);
        bytes
    }

    /// Damage before the durable point is an error (a bad checksum, an entry with the wrong sequence number), and
    /// so is an entry past it that differs from the one the journal carries, or a gap the journal cannot fill: never
    /// silently dropped or replaced.
    #[tokio::test]
    async fn audit_damage_the_journal_cannot_explain_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        after_power_loss(dir.path(), |bytes, durable| bytes[durable - 3] ^= 0x10).await;
        assert!(AuditLog::open(&dir.path().join("audit")).is_err(), "damage before the durable point");

        let dir = tempfile::tempdir().unwrap();
        let wrong = frame(&AuditEntry { sequence: 5, ..entry("m1") });
        let wrong_len = wrong.len() as u64;
        after_power_loss(dir.path(), |bytes, durable| {
            bytes.splice(..durable, wrong);
        })
        .await;
        crate::audit::write_durable_mark(&dir.path().join("audit"), wrong_len).unwrap();
        let error = AuditLog::open(&dir.path().join("audit")).err().unwrap();
        assert!(matches!(error, AuditError::OutOfSequence { position: 0, found: 5 }), "{error}");

        let dir = tempfile::tempdir().unwrap();
        after_power_loss(dir.path(), |bytes, durable| {
            bytes.truncate(durable);
            bytes.extend_from_slice(&frame(&AuditEntry { sequence: 1, ..entry("another") }));
        })
        .await;
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let error = Store::open(dir.path(), audit, StoreOptions::for_tests()).err().unwrap();
        assert!(matches!(error, StoreError::Audit(AuditError::JournalDisagrees { sequence: 1 })), "{error}");

        // The first group's entry lost although sled had recorded the group as applied: its record is not replayed,
        // so the second group's entries would follow a gap.
        let dir = tempfile::tempdir().unwrap();
        after_power_loss(dir.path(), |_, _| {}).await;
        let audit_dir = dir.path().join("audit");
        let mut bytes = std::fs::read(AuditLog::path(&audit_dir)).unwrap();
        bytes.clear();
        std::fs::write(AuditLog::path(&audit_dir), bytes).unwrap();
        crate::audit::write_durable_mark(&audit_dir, 0).unwrap();
        let audit = AuditLog::open(&audit_dir).unwrap();
        let error = Store::open(dir.path(), audit, StoreOptions::for_tests()).err().unwrap();
        assert!(matches!(error, StoreError::Audit(AuditError::Missing { from: 0, to: 0 })), "{error}");
    }

    /// A journal record written by an older broker (which made the audit log durable with every commit, and wrote
    /// the journal to one file, `journal.log`) says how many audit entries its group needs; if they were lost, the
    /// group was never acknowledged, and opening cuts it off the journal (with what follows). New records then go
    /// into segments after what is left of `journal.log`, and both are read on the next open.
    #[tokio::test]
    async fn an_older_record_whose_audit_entries_were_lost_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let journal_path = dir.path().join(journal::LEGACY_FILE);
        let (mut journal, _) = log::AppendLog::open(&journal_path, 0, |_, _| Ok(())).unwrap();
        let older = |needed: u64, key: &[u8]| {
            encode_record(&[
                Write::Put(AUDIT_NEEDED_KEY.to_vec(), needed.to_be_bytes().to_vec()),
                Write::Put(key.to_vec(), b"v".to_vec()),
                Write::PutBlob(key.iter().chain(b"/copy").copied().collect(), b"older copy".to_vec()),
            ])
            .unwrap()
            .0
        };
        journal.append([older(0, b"k/ok").as_slice()]).unwrap();
        let kept_len = journal.len();
        journal.append([older(3, b"k/2").as_slice(), older(0, b"k/after").as_slice()]).unwrap();
        journal.sync().unwrap();
        drop(journal);

        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, report) = Store::open(dir.path(), audit, StoreOptions::for_tests()).unwrap();
        assert!(report.journal_bytes_truncated > 0);
        assert_eq!(std::fs::metadata(&journal_path).unwrap().len(), kept_len);
        assert_eq!(store.get(b"k/ok").unwrap(), Some(b"v".to_vec()));
        assert_eq!(store.get(b"k/ok/copy").unwrap(), Some(b"older copy".to_vec()));
        assert_eq!(store.get(b"k/2").unwrap(), None);
        assert_eq!(store.get(b"k/after").unwrap(), None);
        store
            .commit(Commit {
                audit: vec![entry("m1")],
                writes: vec![Write::PutBlob(b"k/new".to_vec(), b"new copy".to_vec())],
            })
            .await
            .unwrap();
        store.close();
        drop(store);

        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, report) = Store::open(dir.path(), audit, StoreOptions::for_tests()).unwrap();
        assert_eq!(report.journal_bytes_truncated, 0);
        assert_eq!(std::fs::metadata(&journal_path).unwrap().len(), kept_len, "new records go after it, elsewhere");
        assert_eq!(store.get(b"k/ok/copy").unwrap(), Some(b"older copy".to_vec()));
        assert_eq!(store.get(b"k/new").unwrap(), Some(b"new copy".to_vec()));
        store.close();
    }

    /// A commit whose journal write fails part way (a disk filling up) is refused and taken back off both logs: the
    /// next commit gets the same audit sequence numbers, nothing of the failed one is in the index, and the journal
    /// and the audit log agree when opened again.
    #[tokio::test]
    async fn a_commit_whose_write_fails_is_taken_back_off_both_logs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let commit = |message: &str, key: &[u8]| Commit {
            audit: vec![entry(message), entry(message)],
            writes: vec![Write::Put(key.to_vec(), message.as_bytes().to_vec())],
        };
        assert_eq!(store.commit(commit("m1", b"k/1")).await.unwrap(), vec![0, 1]);
        store.inner.fail_next_journal_write.store(true, std::sync::atomic::Ordering::Release);
        let failed = store.commit(commit("failed", b"k/failed")).await;
        assert!(matches!(failed, Err(StoreError::CommitFailed { .. })), "{failed:?}");
        assert_eq!(store.get(b"k/failed").unwrap(), None);
        assert_eq!(store.commit(commit("m2", b"k/2")).await.unwrap(), vec![2, 3], "the same sequence numbers again");
        store.close();
        drop(store);

        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let mut messages = Vec::new();
        log::read_all(&AuditLog::path(&dir.path().join("audit")), |_, bytes| {
            messages.push(AuditEntry::decode(bytes).unwrap().message_id);
            Ok(())
        })
        .unwrap();
        assert_eq!(messages, ["m1", "m1", "m2", "m2"]);
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, report) = Store::open(dir.path(), audit, StoreOptions::for_tests()).unwrap();
        assert_eq!(report.journal_bytes_truncated, 0);
        assert_eq!(store.get(b"k/failed").unwrap(), None);
        assert_eq!(store.get(b"k/2").unwrap(), Some(b"m2".to_vec()));
        store.close();
    }

    /// A copy of sled's folder as it is now (after `close`: at a checkpoint).
    fn save_index(data_dir: &Path) -> PathBuf {
        let saved = data_dir.join("index-at-checkpoint");
        crate::test_support::copy_dir(&data_dir.join("index"), &saved);
        saved
    }

    /// Puts a copy from [`save_index`] back in place of sled's folder: sled as if it had lost what came after.
    fn restore_index(data_dir: &Path, saved: &Path) {
        std::fs::remove_dir_all(data_dir.join("index")).unwrap();
        std::fs::rename(saved, data_dir.join("index")).unwrap();
    }

    /// Damaged bytes under a reference (a blob's or an attachment's) are an error, never content handed on; a
    /// reference that points elsewhere fails the same check.
    #[tokio::test]
    async fn damaged_or_misplaced_blobs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .commit(Commit {
                audit: Vec::new(),
                writes: vec![
                    Write::PutBlob(b"c/a".to_vec(), b"first copy".to_vec()),
                    Write::PutBlob(b"c/b".to_vec(), b"second copy, longer".to_vec()),
                    Write::PutAttached(b"q/a".to_vec(), b"head".to_vec(), b"attached copy".to_vec()),
                ],
            })
            .await
            .unwrap();
        // A reference moved to another key reads the other value's place and fails its checksum.
        let mut moved = store.index_value(b"c/a").unwrap();
        let b = store.index_value(b"c/b").unwrap();
        moved[BLOB_REF_MAGIC.len()..BLOB_REF_MAGIC.len() + 8]
            .copy_from_slice(&b[BLOB_REF_MAGIC.len()..BLOB_REF_MAGIC.len() + 8]);
        store.commit(Commit { audit: Vec::new(), writes: vec![Write::Put(b"c/moved".to_vec(), moved)] }).await.unwrap();
        assert!(store.get(b"c/moved").is_err());
        // One flipped byte in the journal where the copy is.
        let (_, journal) = journal::segment_files(dir.path())
            .unwrap()
            .into_iter()
            .find(|(_, path)| std::fs::read(path).unwrap().windows(10).any(|window| window == b"first copy"))
            .unwrap();
        let mut bytes = std::fs::read(&journal).unwrap();
        let at = bytes.windows(10).position(|window| window == b"first copy").unwrap();
        bytes[at] ^= 0x01;
        let at = bytes.windows(13).position(|window| window == b"attached copy").unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&journal, bytes).unwrap();
        assert!(store.get(b"c/a").is_err());
        assert!(store.get_attachment(b"q/a").is_err(), "a damaged attachment is an error");
        assert_eq!(store.get(b"q/a").unwrap(), Some(b"head".to_vec()), "the head is in the index, not the journal");
        assert_eq!(store.get(b"c/b").unwrap(), Some(b"second copy, longer".to_vec()));
        store.close();
    }
}
