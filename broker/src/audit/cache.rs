//! A start-up cache of what the broker derives from the audit log: the Merkle tree's stored hashes and the auditors'
//! index. Without it every start reads, decodes and hashes every entry ever written (3.8–4.9 s for a million
//! entries, and the log is never truncated); with it a start reads these files and only the entries written since
//! the cache was last saved (PERFORMANCE.md).
//!
//! Files, in `audit/cache/`:
//!
//! | file | holds |
//! |---|---|
//! | `level-KK.hashes` | level `KK` of the tree ([`MerkleTree::level`]): 32-byte hashes in order |
//! | `offsets` | each entry's byte offset in `entries.log`, u64 little-endian, by sequence number |
//! | `postings` | the index's (key hash, sequence) pairs, two u64 little-endian each, in the order they were added |
//! | `meta` | how much of the files counts: entries, where in `entries.log` the next entry starts, postings, the root |
//!
//! Every file only grows, and is written at fixed positions (an entry's hashes, offset and postings always land in
//! the same place), by a thread of its own ("audit-cache") so that the committer only copies what is new.
//! [`AuditLog`](super::AuditLog) hands it what was added every [`HAND_OVER_EVERY`] entries, every [`SAVE_EVERY`]
//! and when it closes; the thread writes it to the files at once, and at most every [`SAVE_EVERY`] (and when the log
//! goes quiet or closes) `fdatasync`s them, then replaces `meta` (write, `fsync`, rename, `fsync` the folder). So
//! `meta` only ever names data that is durable, and bytes past what it names (a save cut short by a crash) are
//! ignored and later overwritten.
//!
//! INVARIANT: `meta` names only entries that were durable in `entries.log` when it was written (the thread
//! `fdatasync`s `entries.log` before it records `meta`: the store makes new entries durable in its journal and
//! `entries.log` only now and then).
//!
//! On open ([`load`]) the cache is used only if it agrees with the log: `meta` decodes and its checksum holds, the
//! files are long enough, the tree they hold has the root `meta` names, and the last entry it covers is in
//! `entries.log` where the offsets say, with that sequence number and that leaf hash, ending where `meta` says the
//! next one starts. Otherwise (no cache yet, a cache from another format, a log restored from a backup, a damaged
//! file) the log is read from the start as before, and the cache is written afresh. The cache is never a source of
//! truth: an auditor's `broker audit verify` reads `entries.log` itself, and every entry a query reads through the
//! index is checked again (see [`super::index`]). Deleting `audit/cache/` is always safe; the next start rebuilds it.
//!
//! What the cache skips: the start no longer re-checks the frame checksum and sequence number of every entry before
//! the cached point on every start (a tail written since is still checked). Damage there is found by `broker audit
//! verify`, and by any query or proof that reads the damaged entry.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{self, Read},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use super::{
    AuditEntry,
    index::MemoryIndex,
    merkle::{Hash, MerkleTree, leaf_hash},
    postings::Postings,
};

/// How often the cache thread makes what it was handed durable and names it in `meta`. A start after a crash reads at
/// most about this much of the log's tail besides the cache.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// The audit log hands what it added to the cache thread every this many entries (and every [`SAVE_EVERY`]), so
/// what waits to be handed over stays small (about 230 bytes an entry).
pub const HAND_OVER_EVERY: u64 = 8192;

/// Which function the index's key hashes were made with ([`super::index::key_hash`]): a cache made with another is
/// not used.
pub const KEY_HASH: u32 = 1;

const MAGIC: &[u8; 8] = b"SGAUDC01";
/// Read files in pieces of this size (the tree's lowest level alone is 32 MB for a million entries).
const READ_CHUNK: usize = 1 << 20;

/// What `meta` says: how much of the cache files counts, and the CRC-32 of each file's bytes up to there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Entries covered: sequence numbers `0..entries`.
    pub entries: u64,
    /// Byte offset in `entries.log` where entry `entries` (the first not covered) starts.
    pub log_offset: u64,
    /// Pairs in `postings` that count.
    pub postings: u64,
    /// The tree's root over the covered entries.
    pub root: Hash,
    /// CRC-32 of the covered bytes of each level's file, level 0 first (one per level of a tree of `entries`
    /// leaves).
    pub level_crcs: Vec<u32>,
    pub offsets_crc: u32,
    pub postings_crc: u32,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(96 + 4 * self.level_crcs.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&KEY_HASH.to_le_bytes());
        bytes.extend_from_slice(&self.entries.to_le_bytes());
        bytes.extend_from_slice(&self.log_offset.to_le_bytes());
        bytes.extend_from_slice(&self.postings.to_le_bytes());
        bytes.extend_from_slice(&self.root);
        bytes.extend_from_slice(&(self.level_crcs.len() as u32).to_le_bytes());
        for crc in &self.level_crcs {
            bytes.extend_from_slice(&crc.to_le_bytes());
        }
        bytes.extend_from_slice(&self.offsets_crc.to_le_bytes());
        bytes.extend_from_slice(&self.postings_crc.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let truncated = || "meta is truncated".to_owned();
        let (body, crc) = bytes.split_at_checked(bytes.len().saturating_sub(4)).ok_or_else(truncated)?;
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err("meta fails its checksum".to_owned());
        }
        let mut rest = body;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(truncated)?;
            rest = tail;
            Ok(head)
        };
        if take(8)? != MAGIC {
            return Err("meta is of another format".to_owned());
        }
        let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let long = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let key_hash = word(take(4)?);
        if key_hash != KEY_HASH {
            return Err(format!("the index was saved with key hash {key_hash}, not {KEY_HASH}"));
        }
        let entries = long(take(8)?);
        let log_offset = long(take(8)?);
        let postings = long(take(8)?);
        let root: Hash = take(32)?.try_into().map_err(|_| truncated())?;
        let levels = word(take(4)?) as usize;
        if levels > 64 {
            return Err("meta names too many levels".to_owned());
        }
        let mut level_crcs = Vec::with_capacity(levels);
        for _ in 0..levels {
            level_crcs.push(word(take(4)?));
        }
        let offsets_crc = word(take(4)?);
        let postings_crc = word(take(4)?);
        if !rest.is_empty() {
            return Err("meta has bytes after its fields".to_owned());
        }
        Ok(Self { entries, log_offset, postings, root, level_crcs, offsets_crc, postings_crc })
    }
}

/// The cache as loaded.
pub struct Loaded {
    pub tree: MerkleTree,
    pub index: MemoryIndex,
    pub meta: Meta,
}

/// Why the cache was not used (the log is then read from the start).
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("there is no cache yet")]
    Missing,
    #[error("{0}")]
    Disagrees(String),
    #[error("`{path}`: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub fn dir(audit_dir: &Path) -> PathBuf {
    audit_dir.join("cache")
}

fn level_path(dir: &Path, level: usize) -> PathBuf {
    dir.join(format!("level-{level:02}.hashes"))
}

/// Loads the cache of the log at `log_path` under `audit_dir`, if it agrees with the log (see the module
/// documentation).
pub fn load(audit_dir: &Path, log_path: &Path) -> Result<Loaded, Unusable> {
    let dir = dir(audit_dir);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Unusable::Io { path, source }
    };
    let meta_path = dir.join("meta");
    let meta = match std::fs::read(&meta_path) {
        Ok(bytes) => Meta::decode(&bytes).map_err(Unusable::Disagrees)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
        Err(error) => return Err(io(&meta_path)(error)),
    };
    let log = File::open(log_path).map_err(io(log_path))?;
    let log_len = log.metadata().map_err(io(log_path))?.len();
    if log_len < meta.log_offset {
        return Err(Unusable::Disagrees(format!(
            "the cache covers {} bytes of the log, which has {log_len}",
            meta.log_offset
        )));
    }
    let level_count = (u64::BITS - meta.entries.leading_zeros()) as usize;
    if meta.level_crcs.len() != level_count {
        return Err(Unusable::Disagrees(format!(
            "the cache names {} levels for a tree of {} entries",
            meta.level_crcs.len(),
            meta.entries
        )));
    }
    let mut levels = Vec::with_capacity(level_count);
    for (level, crc) in meta.level_crcs.iter().enumerate() {
        levels.push(read_items(&level_path(&dir, level), meta.entries >> level, *crc, |hash: [u8; 32]| hash)?);
    }
    let tree = MerkleTree::from_levels(levels).map_err(Unusable::Disagrees)?;
    if tree.root() != meta.root {
        return Err(Unusable::Disagrees("the cached tree does not have the root the cache names".to_owned()));
    }
    let offsets = read_items(&dir.join("offsets"), meta.entries, meta.offsets_crc, u64::from_le_bytes)?;
    if let Some(last) = meta.entries.checked_sub(1) {
        check_last_entry(&log, last, offsets.last().copied(), tree.leaf_hash_at(last), meta.log_offset)?;
    } else if meta.log_offset != 0 {
        return Err(Unusable::Disagrees("an empty cache names a position in the log".to_owned()));
    }
    let postings = read_postings(&dir.join("postings"), &meta)?;
    Ok(Loaded { tree, index: MemoryIndex::from_parts(postings, offsets), meta })
}

/// Checks that entry `sequence` is in the log at `offset`, whole, with `leaf` as its leaf hash, and that it ends at
/// `end`.
fn check_last_entry(
    log: &File,
    sequence: u64,
    offset: Option<u64>,
    leaf: Option<Hash>,
    end: u64,
) -> Result<(), Unusable> {
    let disagrees = |what: &str| Unusable::Disagrees(format!("the log's entry {sequence} {what}"));
    let offset = offset.ok_or_else(|| disagrees("has no cached offset"))?;
    let mut header = [0u8; 8];
    log.read_exact_at(&mut header, offset).map_err(|_| disagrees("cannot be read where the cache says"))?;
    let len = u64::from(u32::from_le_bytes([header[0], header[1], header[2], header[3]]));
    if offset.checked_add(8 + len) != Some(end) {
        return Err(disagrees("does not end where the cache says the next entry starts"));
    }
    let mut payload = vec![0u8; len as usize];
    log.read_exact_at(&mut payload, offset + 8).map_err(|_| disagrees("cannot be read where the cache says"))?;
    if crc32fast::hash(&payload).to_le_bytes() != header[4..8] {
        return Err(disagrees("fails its checksum"));
    }
    if AuditEntry::decode_sequence(&payload) != Ok(sequence) {
        return Err(disagrees("has another sequence number"));
    }
    if Some(leaf_hash(&payload)) != leaf {
        return Err(disagrees("does not have the cached leaf hash"));
    }
    Ok(())
}

/// Reads the first `count` items of `N` bytes each from `path`, which must have at least that many and whose bytes
/// up to there must have CRC-32 `crc`. Reads in pieces straight into the result, so loading never holds the bytes
/// twice.
fn read_items<T, const N: usize>(
    path: &Path,
    count: u64,
    crc: u32,
    decode: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, Unusable> {
    let io = |source| Unusable::Io { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(io)?;
    let have = file.metadata().map_err(io)?.len();
    if have / (N as u64) < count {
        return Err(Unusable::Disagrees(format!(
            "`{}` has {have} bytes; the cache names {count} items",
            path.display()
        )));
    }
    let mut items = Vec::new();
    items
        .try_reserve_exact(usize::try_from(count).unwrap_or(usize::MAX))
        .map_err(|_| Unusable::Disagrees("the cache is too large to load".to_owned()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; READ_CHUNK / N * N];
    let mut left = count;
    while left > 0 {
        let take = left.min((buffer.len() / N) as u64) as usize;
        let chunk = &mut buffer[..take * N];
        file.read_exact(chunk).map_err(io)?;
        hasher.update(chunk);
        items.extend(chunk.chunks_exact(N).filter_map(|item| <[u8; N]>::try_from(item).ok()).map(&decode));
        left -= take as u64;
    }
    if hasher.finalize() != crc {
        return Err(Unusable::Disagrees(format!("`{}` fails its checksum", path.display())));
    }
    Ok(items)
}

/// Reads the postings `meta` covers into the index's map; every sequence must be below `meta.entries` and each
/// key's sequences ascending.
fn read_postings(path: &Path, meta: &Meta) -> Result<HashMap<u64, Postings>, Unusable> {
    let io = |source| Unusable::Io { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(io)?;
    let have = file.metadata().map_err(io)?.len();
    if have / 16 < meta.postings {
        return Err(Unusable::Disagrees(format!("`{}` holds fewer than {} postings", path.display(), meta.postings)));
    }
    let disagrees = || Unusable::Disagrees(format!("`{}` fails its checksum", path.display()));
    let mut postings: HashMap<u64, Postings> = HashMap::new();
    let mut crc = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut left = meta.postings;
    while left > 0 {
        let pairs = left.min((READ_CHUNK / 16) as u64) as usize;
        let chunk = &mut buffer[..pairs * 16];
        file.read_exact(chunk).map_err(io)?;
        crc.update(chunk);
        for pair in chunk.chunks_exact(16) {
            let (hash, sequence) = pair.split_at(8);
            let hash = u64::from_le_bytes(hash.try_into().unwrap_or_default());
            let sequence = u64::from_le_bytes(sequence.try_into().unwrap_or_default());
            // Each key's sequence numbers must ascend (`push` refuses any other).
            if sequence >= meta.entries || !postings.entry(hash).or_default().push(sequence) {
                return Err(disagrees());
            }
        }
        left -= pairs as u64;
    }
    if crc.finalize() != meta.postings_crc {
        return Err(disagrees());
    }
    Ok(postings)
}

/// New bytes for one cache file: where they go, and what they are.
struct Piece {
    at: u64,
    bytes: Vec<u8>,
}

/// What was added since the last save, serialised by the audit log (see [`Saved::take`]) for the cache thread.
pub struct Delta {
    levels: Vec<Piece>,
    offsets: Piece,
    postings: Piece,
    meta: Meta,
}

/// How much has been handed to the cache thread so far, with each file's running CRC-32; owned by the audit log.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    /// Per level: hashes handed over, and the CRC-32 of their bytes.
    levels: Vec<(u64, u32)>,
    entries: u64,
    offsets_crc: u32,
    postings: u64,
    postings_crc: u32,
}

/// Continues the CRC-32 `crc` of earlier bytes over `bytes`.
fn crc_continue(crc: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(crc);
    hasher.update(bytes);
    hasher.finalize()
}

impl Saved {
    /// Entries handed over so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// What a cache loaded with `meta` holds.
    pub fn from_meta(meta: &Meta) -> Self {
        let levels =
            meta.level_crcs.iter().enumerate().map(|(k, crc)| (meta.entries.checked_shr(k as u32).unwrap_or(0), *crc));
        Self {
            levels: levels.collect(),
            entries: meta.entries,
            offsets_crc: meta.offsets_crc,
            postings: meta.postings,
            postings_crc: meta.postings_crc,
        }
    }

    /// Copies out what `tree` and `index` hold beyond what was handed over before; `log_offset` is where the next
    /// entry will start in `entries.log`.
    pub fn take(&mut self, tree: &MerkleTree, index: &mut MemoryIndex, log_offset: u64) -> Delta {
        let mut levels = Vec::new();
        for k in 0..tree.level_count() {
            let hashes = tree.level(k);
            if self.levels.len() <= k {
                self.levels.push((0, 0));
            }
            let (count, crc) = self.levels[k];
            let bytes: Vec<u8> = hashes.get(count as usize..).unwrap_or_default().iter().flatten().copied().collect();
            self.levels[k] = (hashes.len() as u64, crc_continue(crc, &bytes));
            levels.push(Piece { at: count * 32, bytes });
        }
        let offsets: Vec<u8> = index
            .offsets()
            .get(self.entries as usize..)
            .unwrap_or_default()
            .iter()
            .flat_map(|offset| offset.to_le_bytes())
            .collect();
        let offsets = Piece { at: self.entries * 8, bytes: offsets };
        self.offsets_crc = crc_continue(self.offsets_crc, &offsets.bytes);
        self.entries = index.len();
        let new_postings = index.take_unsaved();
        let postings: Vec<u8> = new_postings
            .iter()
            .flat_map(|(hash, sequence)| [hash.to_le_bytes(), sequence.to_le_bytes()])
            .flatten()
            .collect();
        let postings = Piece { at: self.postings * 16, bytes: postings };
        self.postings_crc = crc_continue(self.postings_crc, &postings.bytes);
        self.postings += new_postings.len() as u64;
        let meta = Meta {
            entries: self.entries,
            log_offset,
            postings: self.postings,
            root: tree.root(),
            level_crcs: self.levels.iter().map(|(_, crc)| *crc).collect(),
            offsets_crc: self.offsets_crc,
            postings_crc: self.postings_crc,
        };
        Delta { levels, offsets, postings, meta }
    }
}

/// The cache's files, open for writing.
pub struct Files {
    dir: PathBuf,
    levels: Vec<File>,
    offsets: File,
    postings: File,
    /// Set when a write failed: the files may then have a gap, so nothing more is written and `meta` stays at the
    /// last save that worked (the next start reads more of the log).
    broken: bool,
}

impl Files {
    /// Opens the cache files, emptying them first when `fresh` (the cache is being rebuilt; `meta` is removed first,
    /// so a crash meanwhile leaves no cache rather than a wrong one).
    pub fn open(audit_dir: &Path, fresh: bool) -> io::Result<Self> {
        let dir = dir(audit_dir);
        std::fs::create_dir_all(&dir)?;
        if fresh {
            match std::fs::remove_file(dir.join("meta")) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
            sync_dir(&dir)?;
            for entry in std::fs::read_dir(&dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|extension| extension == "hashes") {
                    std::fs::remove_file(path)?;
                }
            }
        }
        let open = |path: PathBuf| OpenOptions::new().create(true).truncate(fresh).write(true).open(path);
        Ok(Self {
            levels: Vec::new(),
            offsets: open(dir.join("offsets"))?,
            postings: open(dir.join("postings"))?,
            dir,
            broken: false,
        })
    }

    /// Writes a delta at its positions (not yet durable).
    pub fn write(&mut self, delta: &Delta) -> io::Result<()> {
        self.unless_broken(|files| files.write_inner(delta))
    }

    /// Makes everything written durable, then records `meta` (see the module documentation).
    pub fn commit(&mut self, meta: &Meta) -> io::Result<()> {
        self.unless_broken(|files| files.commit_inner(meta))
    }

    /// Runs `step` unless an earlier step failed; a failure marks the files broken.
    fn unless_broken(&mut self, step: impl FnOnce(&mut Self) -> io::Result<()>) -> io::Result<()> {
        if self.broken {
            return Ok(());
        }
        let result = step(self);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn write_inner(&mut self, delta: &Delta) -> io::Result<()> {
        for (k, piece) in delta.levels.iter().enumerate() {
            while self.levels.len() <= k {
                let path = level_path(&self.dir, self.levels.len());
                self.levels.push(OpenOptions::new().create(true).truncate(false).write(true).open(path)?);
            }
            self.levels[k].write_all_at(&piece.bytes, piece.at)?;
        }
        self.offsets.write_all_at(&delta.offsets.bytes, delta.offsets.at)?;
        self.postings.write_all_at(&delta.postings.bytes, delta.postings.at)?;
        Ok(())
    }

    fn commit_inner(&mut self, meta: &Meta) -> io::Result<()> {
        for file in self.levels.iter().chain([&self.offsets, &self.postings]) {
            file.sync_data()?;
        }
        crate::store::log::replace_durably(&self.dir, "meta", &meta.encode())
    }
}

use crate::store::log::sync_dir;

/// The thread that writes the cache ("audit-cache").
pub struct Writer {
    deltas: Option<mpsc::Sender<Delta>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread; `log` makes `entries.log` durable before each `meta` is recorded (the store makes new
    /// entries durable in its journal, and `entries.log` only now and then).
    pub fn start(mut files: Files, log: super::LogSync) -> io::Result<Self> {
        let (deltas, received) = mpsc::channel::<Delta>();
        let thread = thread::Builder::new().name("audit-cache".to_owned()).spawn(move || {
            // Deltas are written as they come (each is small); they are made durable and named in `meta` at most
            // every `SAVE_EVERY`, when the audit log goes quiet, and when it closes.
            let mut unrecorded: Option<Meta> = None;
            let mut recorded_at = std::time::Instant::now();
            let report = |error: io::Error| {
                // The cache stays at its last save; the next start reads more of the log. Nothing is lost.
                tracing::warn!(error = %error, "could not save the audit log's start-up cache; it is no longer updated");
            };
            loop {
                let closed = match received.recv_timeout(SAVE_EVERY) {
                    Ok(delta) => {
                        if let Err(error) = files.write(&delta) {
                            report(error);
                        }
                        unrecorded = Some(delta.meta);
                        false
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => true,
                };
                if closed || recorded_at.elapsed() >= SAVE_EVERY {
                    if let Some(meta) = unrecorded.take() {
                        match log.sync() {
                            Ok(()) => {
                                if let Err(error) = files.commit(&meta) {
                                    report(error);
                                }
                            }
                            // Not recorded, now or later (a failed `fdatasync` of the log stops every later one,
                            // see `LogSync`): the entries `meta` would name may not be durable in `entries.log`.
                            Err(error) => tracing::warn!(error = %error, "could not save the audit log's start-up cache"),
                        }
                    }
                    recorded_at = std::time::Instant::now();
                }
                if closed {
                    break;
                }
            }
        })?;
        Ok(Self { deltas: Some(deltas), thread: Some(thread) })
    }

    /// Hands a delta to the thread.
    pub fn save(&self, delta: Delta) {
        if let Some(deltas) = &self.deltas {
            let _ = deltas.send(delta);
        }
    }

    /// Waits until every delta handed over is saved, and stops the thread.
    pub fn finish(&mut self) {
        self.deltas.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, AuditLog, EventType, Pseudonym, index::IndexKind};

    fn entry(n: u64) -> AuditEntry {
        AuditEntry {
            event: Some(if n.is_multiple_of(3) { EventType::Delivery } else { EventType::DecisionToShare }),
            actor: Actor {
                agency: format!("agency-{}", n % 4),
                practitioner: format!("p-{}", n % 7),
                role: "dsl".into(),
            },
            subject: Some(Pseudonym { key_version: 1, value: [(n % 11) as u8; 32] }),
            message_id: format!("m-{}", n / 2),
            recipient: format!("agency-{}", (n + 1) % 4),
            rule_ids: vec![format!("rule-{}", n % 5)],
            ..AuditEntry::default()
        }
    }

    fn append(log: &mut AuditLog, range: std::ops::Range<u64>) {
        for chunk in range.collect::<Vec<_>>().chunks(17) {
            log.append(chunk.iter().map(|n| entry(*n)).collect()).unwrap();
        }
    }

    /// Every index key the entries use, as queries spell them.
    fn keys(count: u64) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = (0..count).flat_map(|n| crate::audit::index::entry_prefixes(&entry(n))).collect();
        keys.sort();
        keys.dedup();
        keys.push(IndexKind::Agency("nobody").prefix());
        keys
    }

    /// The root, and every key's lookup, of the log under `dir`.
    fn state(log: &AuditLog, count: u64) -> (Hash, Vec<Vec<(u64, u64)>>) {
        let root = log.tree().read().unwrap().root();
        let index = log.index();
        let index = index.read().unwrap();
        (root, keys(count).iter().map(|key| index.lookup(key, 0, u64::MAX, usize::MAX)).collect())
    }

    /// What a log opened without any cache holds (the cache under a copy of `dir` removed).
    fn from_scratch(dir: &Path, count: u64) -> (Hash, Vec<Vec<(u64, u64)>>) {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(AuditLog::path(dir), AuditLog::path(copy.path())).unwrap();
        let log = AuditLog::open(copy.path()).unwrap();
        assert_eq!(log.from_cache(), 0);
        assert_eq!(log.len(), count);
        state(&log, count)
    }

    #[test]
    fn running_crcs_continue_over_later_bytes() {
        let (first, second) = (b"leaf hashes, ".as_slice(), b"then more".as_slice());
        let whole = [first, second].concat();
        assert_eq!(crc_continue(crc32fast::hash(first), second), crc32fast::hash(&whole));
        assert_eq!(crc_continue(0, &whole), crc32fast::hash(&whole));
    }

    #[test]
    fn meta_round_trips_and_rejects_damage() {
        let meta = Meta {
            entries: 5,
            log_offset: 999,
            postings: 21,
            root: [3; 32],
            level_crcs: vec![1, 2, 3],
            offsets_crc: 4,
            postings_crc: 5,
        };
        let bytes = meta.encode();
        assert_eq!(Meta::decode(&bytes).unwrap(), meta);
        for at in [0, 9, 20, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            assert!(Meta::decode(&damaged).is_err(), "a flipped byte at {at} is noticed");
        }
        assert!(Meta::decode(&bytes[..bytes.len() - 5]).is_err());
        assert!(Meta::decode(&[]).is_err());
    }

    #[test]
    fn a_reopened_log_takes_what_the_cache_holds_and_reads_only_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        append(&mut log, 0..300);
        let before = state(&log, 300);
        drop(log);
        let mut log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), 300, "closing saved the cache");
        assert_eq!(log.len(), 300);
        assert_eq!(state(&log, 300), before);
        assert_eq!(state(&log, 300), from_scratch(dir.path(), 300));
        // Entries appended after a cached open join the cache at the next save.
        append(&mut log, 300..333);
        assert_eq!(log.append(vec![entry(333)]).unwrap(), vec![333]);
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), 334);
        assert_eq!(state(&log, 334), from_scratch(dir.path(), 334));
        // Entries past the cache (written after its last save, before a crash) are read from the log.
        let mut log = log;
        log.cache = None;
        append(&mut log, 334..400);
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), 334);
        assert_eq!(log.len(), 400);
        assert_eq!(state(&log, 400), from_scratch(dir.path(), 400));
    }

    #[test]
    fn many_hand_overs_add_up_to_the_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        let count = (2 * HAND_OVER_EVERY).next_multiple_of(1_000) + 1_000;
        for start in (0..count).step_by(1_000) {
            log.append((start..start + 1_000).map(entry).collect()).unwrap();
        }
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), count);
        assert_eq!(state(&log, count), from_scratch(dir.path(), count));
    }

    #[test]
    fn bytes_past_what_meta_names_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        append(&mut log, 0..100);
        drop(log);
        // A save cut short by a crash: bytes written past what `meta` names.
        let cache = super::dir(dir.path());
        for file in ["level-00.hashes", "level-03.hashes", "offsets", "postings"] {
            let mut bytes = std::fs::read(cache.join(file)).unwrap();
            bytes.extend_from_slice(&[0xee; 40]);
            std::fs::write(cache.join(file), bytes).unwrap();
        }
        let mut log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), 100);
        append(&mut log, 100..150);
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.from_cache(), 150);
        assert_eq!(state(&log, 150), from_scratch(dir.path(), 150));
    }

    #[test]
    fn a_cache_that_disagrees_with_the_log_is_rebuilt_from_the_log() {
        type Damage = fn(&Path);
        fn flip(path: &Path, at: usize) {
            let mut bytes = std::fs::read(path).unwrap();
            bytes[at] ^= 0x40;
            std::fs::write(path, bytes).unwrap();
        }
        let damages: [(&str, Damage); 7] = [
            ("a leaf hash", |dir| flip(&super::dir(dir).join("level-00.hashes"), 32 * 40 + 5)),
            ("an interior hash", |dir| flip(&super::dir(dir).join("level-02.hashes"), 7)),
            ("an offset", |dir| flip(&super::dir(dir).join("offsets"), 8 * 10)),
            ("a posting", |dir| flip(&super::dir(dir).join("postings"), 16 * 30 + 9)),
            ("meta", |dir| flip(&super::dir(dir).join("meta"), 30)),
            ("a missing level", |dir| std::fs::remove_file(super::dir(dir).join("level-01.hashes")).unwrap()),
            ("a shorter log, as from an older backup", |dir| {
                // Cut the log back to its first 90 entries. A restored backup has no durable mark.
                std::fs::remove_file(dir.join("durable")).unwrap();
                let file = std::fs::OpenOptions::new().write(true).open(AuditLog::path(dir)).unwrap();
                let offsets = std::fs::read(super::dir(dir).join("offsets")).unwrap();
                let offset = u64::from_le_bytes(offsets[8 * 90..8 * 91].try_into().unwrap());
                file.set_len(offset).unwrap();
            }),
        ];
        for (what, damage) in damages {
            let dir = tempfile::tempdir().unwrap();
            let mut log = AuditLog::open(dir.path()).unwrap();
            append(&mut log, 0..120);
            drop(log);
            damage(dir.path());
            let count = if what.starts_with("a shorter log") { 90 } else { 120 };
            let log = AuditLog::open(dir.path()).unwrap();
            assert_eq!(log.from_cache(), 0, "{what}: the damaged cache is not used");
            assert_eq!(log.len(), count, "{what}");
            assert_eq!(state(&log, count), from_scratch(dir.path(), count), "{what}");
            drop(log);
            let log = AuditLog::open(dir.path()).unwrap();
            assert_eq!(log.from_cache(), count, "{what}: the cache was rebuilt");
            assert_eq!(state(&log, count), from_scratch(dir.path(), count), "{what}");
        }
    }
}
