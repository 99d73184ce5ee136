//! Durable state: the only module that names sled.
//!
//! # How durability is achieved
//! sled's `flush` uses `sync_file_range`, which does not guarantee durability on power loss (sled issue #1452), so
//! sled is not the source of truth. Every change is a [`Commit`]: audit entries plus key/value writes. One committer
//! thread takes every commit waiting in its queue (group commit), then
//!
//! 1. appends their audit entries to the audit log ([`crate::audit::AuditLog`]) and their writes to the state journal
//!    (`journal.log`),
//! 2. `fdatasync`s both at the same time (the audit log on its own thread),
//! 3. applies the writes to sled, one by one, while readers of single keys wait (so a reader sees a group whole
//!    or not at all),
//! 4. and only then answers each waiting caller.
//!
//! A failed `fdatasync` cuts the group back off both logs (entries of the audit log that did become durable stay),
//! so the next group does not follow unacknowledged records; if that cut fails, the store refuses further changes.
//!
//! INVARIANT: nothing is acknowledged to a sender, delivered or reported before both logs are durable (DESIGN.md
//! invariants 4 and 5). A crash can leave a recorded decision whose message was never stored (the sender got no
//! answer and retries), but never a stored message without its decision (see the next section).
//!
//! # Audit and journal, made durable together
//! The two `fdatasync`s run at the same time, so after a crash either file may hold a group the other lacks. The
//! first journal record of a group with audit entries starts with a write under [`AUDIT_NEEDED_KEY`] saying how many
//! audit entries the log must hold for the group to count. On start, replay stops at the first record that needs more
//! entries than the audit log recovered, and cuts it and everything after it off the journal: that group was never
//! acknowledged (acknowledgement waits for both), and every later record was written after it. Running the two
//! `fdatasync`s one after the other (audit log first) cost a second device flush on every commit's path.
//!
//! On start, the journal is replayed into sled from the offset sled last recorded, so sled holds every change that
//! was ever acknowledged, whatever sled itself lost. Replaying a write twice is harmless: writes are whole values,
//! replayed in journal order.
//!
//! # How far sled has got
//! INVARIANT: the offset recorded under [`JOURNAL_APPLIED_KEY`] is written only after every write before it has
//! been applied to sled, sled has written its buffers (`flush`) and its file has been `fsync`ed. So whatever sled
//! recovers after a crash or a power loss, every write before the recorded offset is in it, and replay from that
//! offset restores the rest; no assumption is made about which of sled's later writes survived. A checkpointer
//! thread does this every [`CHECKPOINT_EVERY`] (ten seconds; and `close` once more), which bounds the replay after a
//! crash.
//! Writing the offset with each group instead (in one atomic sled batch) made sled seal and write an IO buffer per
//! group on its IO threads, waking all seven of them each time: a third of the broker's CPU with one message in
//! flight.
//! The journal is never truncated yet (see ARCHITECTURE.md, "known limits").

pub mod log;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::audit::{AuditEntry, AuditError, AuditLog};
use log::{AppendLog, LogError};

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
}

impl StoreError {
    /// True when the failure is lack of space: the caller may retry later.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Log(LogError::Io { source, .. }) => Some(source),
            StoreError::Audit(AuditError::Log(LogError::Io { source, .. })) => Some(source),
            StoreError::CommitFailed { disk_full, .. } => return *disk_full,
            _ => None,
        };
        io.is_some_and(|error| error.raw_os_error() == Some(28))
    }
}

/// A key and its value, as read back.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One key/value change.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Write {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// A large value written once and read back rarely (a recipient's copy): its bytes stay in the journal, and the
    /// index holds only where to find them (a [`BlobRef`]); read it with [`Store::get_blob`]. Keeping copies out of
    /// sled took sled's node rewrites and log writes of every copy off the commit path (sled was ~40% of the
    /// broker's CPU when sending) and left sled's cache to the small records.
    PutBlob(Vec<u8>, Vec<u8>),
}

/// Marks an index value as a [`BlobRef`]. A recipient's copy (a `pb::Delivery`) written as a plain value by an
/// older broker starts with a field tag, never with 0xFF.
const BLOB_REF_MAGIC: &[u8] = b"\xffjref";

/// Where a [`Write::PutBlob`] value is in `journal.log`: `len` bytes at byte `offset`, with their CRC-32 (so that
/// reading one copy reads only that copy, not the whole commit it came in: a message to 64 recipients would
/// otherwise decode all 64 copies for each delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobRef {
    offset: u64,
    len: u32,
    crc: u32,
}

impl BlobRef {
    fn encode(self) -> Vec<u8> {
        let mut bytes = BLOB_REF_MAGIC.to_vec();
        bytes.extend_from_slice(&self.offset.to_be_bytes());
        bytes.extend_from_slice(&self.len.to_be_bytes());
        bytes.extend_from_slice(&self.crc.to_be_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let rest = bytes.strip_prefix(BLOB_REF_MAGIC)?;
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
            Write::Put(_, value) | Write::PutBlob(_, value) => value.len(),
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
}

/// Handle to the durable state. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    tree: sled::Db,
    /// Held for writing while the committer applies a group to sled, for reading by [`Store::get`] and
    /// [`Store::get_blob`]: a reader of single keys sees a group's writes all or none.
    applying: Arc<std::sync::RwLock<()>>,
    /// Stops the checkpointer when dropped.
    checkpoints: std::sync::Mutex<Option<mpsc::Sender<()>>>,
    checkpointer: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    /// How far into the journal sled holds every write (updated by the committer after each group).
    applied: Arc<std::sync::atomic::AtomicU64>,
    index_dir: PathBuf,
    /// A read-only handle on `journal.log`, for [`Store::get_blob`] (positioned reads, shared by all readers).
    journal_reader: std::fs::File,
    journal_path: PathBuf,
    /// The audit log's in-memory index, for auditors' queries (the log itself belongs to the committer thread).
    audit_index: crate::audit::index::SharedIndex,
    jobs: std::sync::Mutex<Option<mpsc::Sender<Job>>>,
    committer: std::sync::Mutex<Option<thread::JoinHandle<()>>>,
    data_dir: PathBuf,
}

/// What opening found, for the start-up log line.
#[derive(Debug, Clone, Copy)]
pub struct OpenReport {
    pub journal_records_replayed: u64,
    pub journal_bytes_truncated: u64,
    pub audit_entries: u64,
}

/// sled, opened but not yet caught up with the journal (see [`Store::open_index`]).
pub struct OpenedIndex {
    db: sled::Db,
    index_dir: PathBuf,
    applied: u64,
}

impl Store {
    /// Opens the data directory: sled under `index/`, the journal `journal.log`, and the audit log, replaying the
    /// journal into sled.
    pub fn open(data_dir: &Path, audit: AuditLog, sled_cache_bytes: u64) -> Result<(Self, OpenReport), StoreError> {
        Self::open_with(Self::open_index(data_dir, sled_cache_bytes)?, data_dir, audit)
    }

    /// The first half of [`Store::open`], which does not need the audit log: opens sled, which replays its own log
    /// (long after a long run: sled 0.34 writes its snapshot only when it opens), so the broker does it while the
    /// audit log is read.
    pub fn open_index(data_dir: &Path, sled_cache_bytes: u64) -> Result<OpenedIndex, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        let index_dir = data_dir.join("index");
        let config = sled::Config::new()
            .path(&index_dir)
            .cache_capacity(sled_cache_bytes)
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
        Ok(OpenedIndex { db, index_dir, applied })
    }

    /// The second half of [`Store::open`]: replays the journal into the index opened by [`Store::open_index`].
    pub fn open_with(index: OpenedIndex, data_dir: &Path, audit: AuditLog) -> Result<(Self, OpenReport), StoreError> {
        let OpenedIndex { db, index_dir, applied } = index;
        let mut replayed = 0;
        let audit_entries = audit.len();
        let (journal, recovery) = AppendLog::open_until(&data_dir.join("journal.log"), applied, |offset, payload| {
            let record: JournalRecord = postcard::from_bytes(payload).map_err(|error| LogError::Corrupt {
                path: data_dir.join("journal.log"),
                offset,
                reason: format!("undecodable journal record: {error}"),
            })?;
            let corrupt = |reason: String| LogError::Corrupt { path: data_dir.join("journal.log"), offset, reason };
            let (again, value_starts) = encode_record(&record.writes).map_err(|error| corrupt(error.to_string()))?;
            if again != payload {
                return Err(corrupt("a journal record does not re-encode to its own bytes".to_owned()));
            }
            if audit_needed(&record.writes).is_some_and(|needed| needed > audit_entries) {
                // Its group's audit entries did not all become durable, so the group was never acknowledged.
                return Ok(log::Keep::No);
            }
            apply_writes(&db, record.writes, offset, &value_starts).map_err(|error| LogError::Corrupt {
                path: data_dir.join("index"),
                offset,
                reason: format!("could not replay into the index: {error}"),
            })?;
            replayed += 1;
            Ok(log::Keep::Yes)
        })?;
        let applied = Arc::new(std::sync::atomic::AtomicU64::new(journal.len()));
        if replayed > 0 {
            // What was replayed need not be replayed again.
            checkpoint(&db, &index_dir, journal.len())?;
        }
        let journal_path = data_dir.join("journal.log");
        let journal_reader =
            std::fs::File::open(&journal_path).map_err(|source| LogError::Io { path: journal_path.clone(), source })?;
        let audit_index = audit.index();
        let report = OpenReport {
            journal_records_replayed: replayed,
            journal_bytes_truncated: recovery.truncated_bytes,
            audit_entries: audit.len(),
        };
        let applying = Arc::new(std::sync::RwLock::new(()));
        let audit_syncer = AuditSyncer::start(audit.sync_handle()?, data_dir)?;
        let (sender, receiver) = mpsc::channel::<Job>();
        let committer = Applier {
            db: db.clone(),
            applying: applying.clone(),
            applied: applied.clone(),
            failed: std::sync::atomic::AtomicBool::new(false),
            stopped: std::sync::atomic::AtomicBool::new(false),
            audit_syncer,
        };
        let handle = thread::Builder::new()
            .name("committer".to_owned())
            .spawn(move || run_committer(receiver, journal, audit, committer))
            .map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        let (stop_checkpoints, stopped) = mpsc::channel::<()>();
        let (checkpoint_db, checkpoint_dir, checkpoint_applied) = (db.clone(), index_dir.clone(), applied.clone());
        let checkpointer = thread::Builder::new()
            .name("checkpointer".to_owned())
            .spawn(move || run_checkpointer(stopped, checkpoint_db, checkpoint_dir, checkpoint_applied))
            .map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        let inner = Inner {
            tree: db,
            applying,
            checkpoints: std::sync::Mutex::new(Some(stop_checkpoints)),
            checkpointer: std::sync::Mutex::new(Some(checkpointer)),
            applied,
            index_dir,
            journal_reader,
            journal_path,
            audit_index,
            jobs: std::sync::Mutex::new(Some(sender)),
            committer: std::sync::Mutex::new(Some(handle)),
            data_dir: data_dir.to_owned(),
        };
        Ok((Self { inner: Arc::new(inner) }, report))
    }

    /// Makes the commit durable (see the module documentation) and returns the sequence numbers given to its audit
    /// entries.
    pub async fn commit(&self, commit: Commit) -> Result<Vec<u64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        {
            let jobs = self.inner.jobs.lock().map_err(|_| StoreError::Stopped)?;
            let sender = jobs.as_ref().ok_or(StoreError::Stopped)?;
            sender.send(Job { commit, reply }).map_err(|_| StoreError::Stopped)?;
        }
        match answer.await {
            Ok(Ok(sequences)) => Ok(sequences),
            Ok(Err((message, disk_full))) => Err(StoreError::CommitFailed { message, disk_full }),
            Err(_) => Err(StoreError::Stopped),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let _whole_groups = self.inner.applying.read().map_err(|_| StoreError::Stopped)?;
        Ok(self.inner.tree.get(key)?.map(|value| value.to_vec()))
    }

    /// The value of a [`Write::PutBlob`], read back from the journal (only its bytes, checked against their CRC).
    pub fn get_blob(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        use std::os::unix::fs::FileExt;
        let Some(stored) = self.get(key)? else { return Ok(None) };
        let Some(blob) = BlobRef::decode(&stored) else {
            // Written as a plain value (by a broker from before blobs).
            return Ok(Some(stored));
        };
        let mut value = vec![0u8; blob.len as usize];
        self.inner
            .journal_reader
            .read_exact_at(&mut value, blob.offset)
            .map_err(|source| LogError::Io { path: self.inner.journal_path.clone(), source })?;
        if crc32fast::hash(&value) != blob.crc {
            return Err(StoreError::Decode("a journal reference does not point at its value".to_owned()));
        }
        Ok(Some(value))
    }

    /// Every key/value under `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.inner
            .tree
            .scan_prefix(prefix)
            .map(|item| item.map(|(key, value)| (key.to_vec(), value.to_vec())).map_err(StoreError::from))
    }

    /// At most `limit` key/values under `prefix` that come after `after` (from the start of `prefix` without one), in
    /// key order: a long scan taken a page at a time, so that no iterator is held across pages.
    pub fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        let mut page = Vec::new();
        for item in self.inner.tree.range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded)) {
            let (key, value) = item?;
            if !key.starts_with(prefix) || page.len() == limit {
                break;
            }
            page.push((key.to_vec(), value.to_vec()));
        }
        Ok(page)
    }

    /// The first key/value after `key`, in key order (a seek, not a scan).
    pub fn next_after(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.inner.tree.get_gt(key)?.map(|(key, value)| (key.to_vec(), value.to_vec())))
    }

    /// The last key/value under `prefix`, in key order (a seek, not a scan).
    pub fn last_under(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.inner.tree.scan_prefix(prefix).next_back() {
            Some(item) => Ok(Some(item.map(|(key, value)| (key.to_vec(), value.to_vec()))?)),
            None => Ok(None),
        }
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
        if let Ok(mut checkpointer) = self.inner.checkpointer.lock()
            && let Some(handle) = checkpointer.take()
        {
            let _ = handle.join();
        }
        let applied = self.inner.applied.load(std::sync::atomic::Ordering::Acquire);
        if let Err(error) =
            checkpoint(&self.inner.tree, &self.inner.index_dir, applied).and_then(|()| Ok(self.inner.tree.flush()?))
        {
            tracing::warn!(error = %error, "could not record how far the index has got; the next start replays more of the journal");
        }
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
            Write::Put(key, _) if key == AUDIT_NEEDED_KEY => {}
            Write::Put(key, value) => {
                db.insert(key, value)?;
            }
            Write::Delete(key) => {
                db.remove(key)?;
            }
            Write::PutBlob(key, value) => {
                let blob = BlobRef {
                    offset: record_offset + log::HEADER_BYTES + *value_start as u64,
                    // A record is at most `MAX_RECORD_BYTES` (256 MiB), so its values fit.
                    len: u32::try_from(value.len()).unwrap_or(u32::MAX),
                    crc: crc32fast::hash(&value),
                };
                db.insert(key, blob.encode())?;
            }
        }
    }
    Ok(())
}

/// Makes every write applied so far durable in sled, then records `applied` as how far into the journal sled has
/// got (see "How far sled has got" in the module documentation). sled's `flush` writes its buffers with
/// `sync_file_range`, which neither writes the file's metadata nor empties the disk's cache, so its files are
/// `fsync`ed here. The recorded offset itself becomes durable with the next checkpoint; until then the previous one
/// stands, which only means replaying a little more.
fn checkpoint(db: &sled::Db, index_dir: &Path, applied: u64) -> Result<(), StoreError> {
    db.flush()?;
    sync_sled_files(index_dir)?;
    db.insert(JOURNAL_APPLIED_KEY, &applied.to_be_bytes())?;
    Ok(())
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
    /// Set when applying a group to sled failed: from then on `applied` stays where it was.
    failed: std::sync::atomic::AtomicBool,
    /// Set when a group whose `fdatasync` failed could not be cut back off the logs: no further commit is accepted
    /// (what the files hold past that point is unknown; a restart recovers from what is durable).
    stopped: std::sync::atomic::AtomicBool,
    audit_syncer: AuditSyncer,
}

impl Applier {
    fn stop_committing(&self, error: &StoreError) {
        self.stopped.store(true, std::sync::atomic::Ordering::Release);
        tracing::error!(error = %error, "could not take back a commit that was not made durable; refusing further changes");
    }
}

fn run_checkpointer(
    stop: mpsc::Receiver<()>,
    db: sled::Db,
    index_dir: PathBuf,
    applied: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut recorded = applied.load(std::sync::atomic::Ordering::Acquire);
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        let now = applied.load(std::sync::atomic::Ordering::Acquire);
        if now == recorded {
            continue;
        }
        match checkpoint(&db, &index_dir, now) {
            Ok(()) => recorded = now,
            // The previous checkpoint stands: the next start replays more of the journal, nothing is lost.
            Err(error) => tracing::warn!(error = %error, "could not record how far the index has got"),
        }
    }
}

fn run_committer(jobs: mpsc::Receiver<Job>, mut journal: AppendLog, mut audit: AuditLog, applier: Applier) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit_group(&mut group, &mut journal, &mut audit, &applier);
        let metrics = crate::metrics::metrics();
        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        metrics.commit_group_size.observe(group.len() as f64);
        metrics.audit_entries.set(audit.len() as i64);
        metrics.audit_log_bytes.set(audit.byte_len() as i64);
        match result {
            Ok(sequences) => {
                for (job, sequences) in group.into_iter().zip(sequences) {
                    let _ = job.reply.send(Ok(sequences));
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

/// Makes the audit log durable on its own thread while the committer makes the journal durable.
struct AuditSyncer {
    requests: mpsc::Sender<()>,
    done: mpsc::Receiver<Result<(), LogError>>,
}

impl AuditSyncer {
    fn start(handle: log::SyncHandle, data_dir: &Path) -> Result<Self, StoreError> {
        let (requests, requested) = mpsc::channel::<()>();
        let (finished, done) = mpsc::channel();
        thread::Builder::new()
            .name("audit-sync".to_owned())
            .spawn(move || {
                while requested.recv().is_ok() {
                    if finished.send(handle.sync()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| LogError::Io { path: data_dir.to_owned(), source })?;
        Ok(Self { requests, done })
    }

    /// Runs `meanwhile` while the audit log is made durable; returns both results.
    fn sync_while<T>(&self, meanwhile: impl FnOnce() -> T) -> (Result<(), LogError>, T) {
        if self.requests.send(()).is_err() {
            return (Err(syncer_stopped()), meanwhile());
        }
        let other = meanwhile();
        (self.done.recv().unwrap_or_else(|_| Err(syncer_stopped())), other)
    }
}

fn syncer_stopped() -> LogError {
    LogError::Io {
        path: PathBuf::from("audit/entries.log"),
        source: std::io::Error::other("the audit sync thread stopped"),
    }
}

/// The journal record key under which a group's first record says how many audit entries the group needs (see
/// "Audit and journal, made durable together" in the module documentation). Not written to sled.
const AUDIT_NEEDED_KEY: &[u8] = b"\x00audit-needed";

/// How many audit entries a journal record needs, if it says.
fn audit_needed(writes: &[Write]) -> Option<u64> {
    match writes.first() {
        Some(Write::Put(key, value)) if key == AUDIT_NEEDED_KEY => decode_u64(value).ok(),
        _ => None,
    }
}

fn commit_group(
    group: &mut [Job],
    journal: &mut AppendLog,
    audit: &mut AuditLog,
    applier: &Applier,
) -> Result<Vec<Vec<u64>>, StoreError> {
    if applier.stopped.load(std::sync::atomic::Ordering::Acquire) {
        return Err(StoreError::CommitFailed {
            message:
                "storage stopped accepting changes after a failed fsync could not be taken back; restart the broker"
                    .to_owned(),
            disk_full: false,
        });
    }
    // 1. Audit entries and state writes are written, then made durable together.
    let counts: Vec<usize> = group.iter().map(|job| job.commit.audit.len()).collect();
    let mut entries = Vec::with_capacity(counts.iter().sum());
    for job in group.iter_mut() {
        entries.append(&mut job.commit.audit);
    }
    let first_sequence = audit.len();
    let written = audit.write(entries)?;
    let audit_needed = first_sequence + written.len() as u64;
    let mut sequences = first_sequence..audit_needed;
    let per_job: Vec<Vec<u64>> = counts.iter().map(|count| sequences.by_ref().take(*count).collect()).collect();
    let mut encoded = Vec::with_capacity(group.len());
    let mut records = Vec::with_capacity(group.len());
    let mut encoding = Ok(());
    for job in group.iter_mut().filter(|job| !job.commit.writes.is_empty()) {
        let mut writes = std::mem::take(&mut job.commit.writes);
        if records.is_empty() && !written.is_empty() {
            writes.insert(0, Write::Put(AUDIT_NEEDED_KEY.to_vec(), audit_needed.to_be_bytes().to_vec()));
        }
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
    let appended = encoding.and_then(|()| {
        if encoded.is_empty() { Ok(Vec::new()) } else { Ok(journal.append(encoded.iter().map(Vec::as_slice))?) }
    });
    let journal_written = matches!(&appended, Ok(offsets) if !offsets.is_empty());
    let (audit_synced, journal_synced) = match (written.is_empty(), journal_written) {
        (false, true) => {
            let (audit_synced, journal_synced) = applier.audit_syncer.sync_while(|| journal.sync());
            (audit_synced.map_err(StoreError::from), journal_synced)
        }
        (false, false) => (audit.sync().map_err(StoreError::from), Ok(())),
        (true, true) => (Ok(()), journal.sync()),
        (true, false) => (Ok(()), Ok(())),
    };
    // 2. What failed is taken back, so that the next group does not follow it; audit entries that are durable stay
    // (a decision recorded for a message whose state was not stored, as if the broker had stopped in between).
    if let Err(error) = audit_synced {
        let rolled_back =
            audit.unwrite(written).map_err(StoreError::from).and_then(|()| Ok(journal.truncate(journal_start)?));
        if let Err(rollback) = rolled_back {
            applier.stop_committing(&rollback);
        }
        return Err(error);
    }
    audit.publish(written);
    let offsets = appended?;
    if let Err(error) = journal_synced {
        if let Err(rollback) = journal.truncate(journal_start) {
            applier.stop_committing(&rollback.into());
        }
        return Err(error.into());
    }
    if !offsets.is_empty() {
        // 3. The index. If this fails the group is reported as failed although it is durable in the journal (the
        // sender's retry is recognised by its idempotency key); how far sled has got stops advancing, so the next
        // start replays this group and everything after it.
        let _whole_group = applier.applying.write().map_err(|_| StoreError::Stopped)?;
        for ((writes, value_starts), offset) in records.into_iter().zip(offsets) {
            if let Err(error) = apply_writes(&applier.db, writes, offset, &value_starts) {
                applier.failed.store(true, std::sync::atomic::Ordering::Release);
                return Err(error.into());
            }
        }
        if !applier.failed.load(std::sync::atomic::Ordering::Acquire) {
            applier.applied.store(journal.len(), std::sync::atomic::Ordering::Release);
        }
    }
    Ok(per_job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Store {
        let audit = AuditLog::open(&dir.join("audit")).unwrap();
        Store::open(dir, audit, 1024 * 1024).unwrap().0
    }

    /// A copy written as a blob is read back from the journal, including after sled's index is lost and rebuilt by
    /// replaying the journal; deleting its key forgets it; a plain value under the same kind of key (written by an
    /// older broker) still reads back.
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
                ],
            })
            .await
            .unwrap();
        assert_eq!(store.get_blob(b"c/a").unwrap(), Some(first.clone()));
        assert_eq!(store.get_blob(b"c/b").unwrap(), Some(second.clone()));
        assert_eq!(store.get_blob(b"c/legacy").unwrap(), Some(b"plain".to_vec()));
        assert!(store.get(b"c/a").unwrap().unwrap().len() < 32, "the index holds a reference, not the copy");
        store.commit(Commit { audit: Vec::new(), writes: vec![Write::Delete(b"c/b".to_vec())] }).await.unwrap();
        assert_eq!(store.get_blob(b"c/b").unwrap(), None);
        store.close();
        drop(store);

        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let store = open(dir.path());
        assert_eq!(store.get_blob(b"c/a").unwrap(), Some(first));
        assert_eq!(store.get_blob(b"c/b").unwrap(), None);
        assert_eq!(store.get(b"d/a").unwrap(), Some(b"record".to_vec()));
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
        assert_eq!(store.get_blob(b"c/2").unwrap(), Some(b"copy".to_vec()));
        store.close();
    }

    /// The two logs are made durable at the same time, so a crash can keep a group's journal record and lose its
    /// audit entries. That group was never acknowledged: opening cuts it off the journal (with what follows), and
    /// the state it would have written never appears.
    #[tokio::test]
    async fn a_journal_record_whose_audit_entries_were_lost_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let entry = |message_id: &str| AuditEntry { message_id: message_id.to_owned(), ..AuditEntry::default() };
        store
            .commit(Commit { audit: vec![entry("m1")], writes: vec![Write::Put(b"k/1".to_vec(), b"one".to_vec())] })
            .await
            .unwrap();
        store.close();
        drop(store);
        let saved = save_index(dir.path());
        let audit_path = AuditLog::path(&dir.path().join("audit"));
        let audit_len = std::fs::metadata(&audit_path).unwrap().len();
        let journal_len = std::fs::metadata(dir.path().join("journal.log")).unwrap().len();

        let store = open(dir.path());
        store
            .commit(Commit {
                audit: vec![entry("m2"), entry("m2")],
                writes: vec![Write::Put(b"k/2".to_vec(), b"two".to_vec())],
            })
            .await
            .unwrap();
        store.close();
        drop(store);
        // The crash: the audit log lost the group's last entry, and the index never had the group.
        let audit_file = std::fs::OpenOptions::new().write(true).open(&audit_path).unwrap();
        let second_entry_len = (std::fs::metadata(&audit_path).unwrap().len() - audit_len) / 2;
        audit_file.set_len(audit_len + second_entry_len).unwrap();
        drop(audit_file);
        restore_index(dir.path(), &saved);

        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        assert_eq!(audit.len(), 2, "the torn entry is cut off the audit log");
        let (store, report) = Store::open(dir.path(), audit, 1024 * 1024).unwrap();
        assert!(report.journal_bytes_truncated > 0);
        assert_eq!(std::fs::metadata(dir.path().join("journal.log")).unwrap().len(), journal_len);
        assert_eq!(store.get(b"k/1").unwrap(), Some(b"one".to_vec()));
        assert_eq!(store.get(b"k/2").unwrap(), None);
        // Committing goes on from there, and survives reopening.
        let sequences = store
            .commit(Commit { audit: vec![entry("m3")], writes: vec![Write::Put(b"k/3".to_vec(), b"three".to_vec())] })
            .await
            .unwrap();
        assert_eq!(sequences, vec![2]);
        store.close();
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.get(b"k/2").unwrap(), None);
        assert_eq!(store.get(b"k/3").unwrap(), Some(b"three".to_vec()));
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

    /// Damaged bytes under a reference are an error, never content handed on; a reference that points elsewhere
    /// fails the same check.
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
                ],
            })
            .await
            .unwrap();
        // A reference moved to another key reads the other value's place and fails its checksum.
        let mut moved = store.get(b"c/a").unwrap().unwrap();
        let b = store.get(b"c/b").unwrap().unwrap();
        moved[BLOB_REF_MAGIC.len()..BLOB_REF_MAGIC.len() + 8]
            .copy_from_slice(&b[BLOB_REF_MAGIC.len()..BLOB_REF_MAGIC.len() + 8]);
        store.commit(Commit { audit: Vec::new(), writes: vec![Write::Put(b"c/moved".to_vec(), moved)] }).await.unwrap();
        assert!(store.get_blob(b"c/moved").is_err());
        // One flipped byte in the journal where the copy is.
        let journal = dir.path().join("journal.log");
        let mut bytes = std::fs::read(&journal).unwrap();
        let at = bytes.windows(10).position(|window| window == b"first copy").unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&journal, bytes).unwrap();
        assert!(store.get_blob(b"c/a").is_err());
        assert_eq!(store.get_blob(b"c/b").unwrap(), Some(b"second copy, longer".to_vec()));
        store.close();
    }
}
