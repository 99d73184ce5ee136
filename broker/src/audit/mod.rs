//! The audit log: one entry per decision, delivery, acknowledgement and other event, append-only and durable.
//!
//! - [`AuditEntry`] is the record. It is encoded deterministically with postcard (a fixed, documented wire format:
//!   varint integers, length-prefixed strings and sequences, no maps and no floats in our types), prefixed with a
//!   format version byte; protobuf is not used because it has no canonical form. The encoded bytes are what the
//!   Merkle tree hashes.
//! - [`AuditLog`] appends entries to `audit/entries.log` (an [`AppendLog`]). In every group commit
//!   [`crate::store`] writes them there and carries the same bytes in its journal record, whose `fdatasync` makes
//!   them durable, so an entry is durable before the action it records is acknowledged or delivered (DESIGN.md
//!   invariant 4) at the cost of one `fdatasync` per commit, not two. `entries.log` itself is made durable every
//!   ten seconds and at close, and the point it is durable to is recorded in `audit/durable` ([`Durability`]); on
//!   open, a tail past that point that did not survive is cut off and put back from the journal
//!   ([`AuditLog::repair`]). If the log cannot be written the commit fails and nothing is shared (fail closed).
//! - The Merkle tree and the auditors' index are derived from the log and held in memory; [`cache`] saves them so
//!   that a start reads only the entries written since the last save, not the whole log.
//! - [`Pseudonymiser`] turns a child's identifiers into a keyed pseudonym (HMAC-SHA-256 under a broker-held key with
//!   a key version): entries never hold an NHS number, a name or message content (invariant 6).

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::store::log::{AppendLog, LogError, SyncHandle, Tail};

pub mod cache;
pub mod checkpoint;
pub mod checkpoints;
pub mod cli;
pub mod index;
pub mod merkle;
pub mod postings;
pub mod query;
pub mod verify;

use crate::store::log::Keep;
use merkle::MerkleTree;

/// The Merkle tree, shared between the committer (the only writer) and readers.
pub type SharedTree = std::sync::Arc<std::sync::RwLock<MerkleTree>>;

/// Version byte that starts every encoded entry.
pub const ENTRY_FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("audit entry {sequence} is malformed: {reason}")]
    Malformed { sequence: u64, reason: String },
    #[error("audit entry at position {position} has sequence number {found}")]
    OutOfSequence { position: u64, found: u64 },
    #[error("could not read or write the key file `{path}`: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("checkpoints: {0}")]
    Checkpoints(String),
    #[error("the thread reading the audit log stopped unexpectedly")]
    Stopped,
    #[error(
        "audit entry {sequence} in the journal differs from the one in `entries.log` (entries before the durable point \
         in `audit/durable` are never rewritten; see ARCHITECTURE.md, \"Durability\")"
    )]
    JournalDisagrees { sequence: u64 },
    #[error("`entries.log` lacks entries {from} to {to}, which the journal needs but does not carry")]
    Missing { from: u64, to: u64 },
    #[error("`{path}` is damaged: {reason}")]
    DurableMark { path: PathBuf, reason: String },
    #[error(
        "an earlier fdatasync of the audit log failed: nothing more is recorded as durable until the broker restarts \
         (which puts back from the journal what the log lost)"
    )]
    WriteBackFailed,
    #[error(
        "the audit log in `{data_dir}` holds entries, but `keys/{missing}` is missing: restore it from a backup (a new \
         key in its place could never again link a child to earlier entries, or sign checkpoints auditors can verify)"
    )]
    KeysMissing { data_dir: PathBuf, missing: String },
}

/// Refuses to go on when a key the audit log depends on is missing from a data directory whose audit log holds
/// entries or checkpoints: the broker would make a new one in its place, silently (a new pseudonymisation key can
/// never link earlier pseudonyms to a child again; a new signing key cannot sign on from checkpoints signed with the
/// old one). A new data directory, with nothing in its log, gets its keys made as before.
pub fn check_keys_kept(data_dir: &Path) -> Result<(), AuditError> {
    let audit_dir = data_dir.join("audit");
    let holds = |path: PathBuf| std::fs::metadata(path).is_ok_and(|metadata| metadata.len() > 0);
    if !holds(AuditLog::path(&audit_dir)) && !holds(checkpoints::checkpoints_path(&audit_dir)) {
        return Ok(());
    }
    let keys = data_dir.join("keys");
    let missing: Vec<&str> = [PSEUDONYM_KEY_FILE, checkpoints::SIGNING_KEY_FILE]
        .into_iter()
        .filter(|name| !keys.join(name).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(AuditError::KeysMissing { data_dir: data_dir.to_owned(), missing: missing.join("` and `keys/") })
}

/// File name of the pseudonymisation key under the keys directory.
pub const PSEUDONYM_KEY_FILE: &str = "pseudonym-v1.key";

/// What happened.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum EventType {
    /// The policy permitted sharing with this recipient.
    DecisionToShare,
    /// The policy refused sharing with this recipient (a first-class record, golden rule 7).
    DecisionNotToShare,
    /// A copy was handed to the recipient's agent (attempt 1).
    Delivery,
    /// A copy was handed to the recipient's agent again (attempt 2 or later).
    Redelivery,
    Acknowledgement,
    NegativeAcknowledgement,
    /// Given up after the maximum number of attempts.
    DeadLetter,
    /// An acknowledgement deadline passed.
    Escalation,
    /// Sharing went ahead without the family's agreement (break-glass).
    OverrideUsed,
    PolicyActivated,
    PolicyRejected,
    AuditorQuery,
    KeyRotation,
    /// A request was refused before any decision (authentication, malformed input).
    RequestRefused,
}

impl EventType {
    /// Every event type, in a fixed order.
    pub const ALL: [EventType; 14] = [
        EventType::DecisionToShare,
        EventType::DecisionNotToShare,
        EventType::Delivery,
        EventType::Redelivery,
        EventType::Acknowledgement,
        EventType::NegativeAcknowledgement,
        EventType::DeadLetter,
        EventType::Escalation,
        EventType::OverrideUsed,
        EventType::PolicyActivated,
        EventType::PolicyRejected,
        EventType::AuditorQuery,
        EventType::KeyRotation,
        EventType::RequestRefused,
    ];

    /// The event type named `name` (as [`EventType::as_str`] spells it).
    pub fn parse(name: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|event| event.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::DecisionToShare => "decision-to-share",
            EventType::DecisionNotToShare => "decision-not-to-share",
            EventType::Delivery => "delivery",
            EventType::Redelivery => "redelivery",
            EventType::Acknowledgement => "acknowledgement",
            EventType::NegativeAcknowledgement => "negative-acknowledgement",
            EventType::DeadLetter => "dead-letter",
            EventType::Escalation => "escalation",
            EventType::OverrideUsed => "override-used",
            EventType::PolicyActivated => "policy-activated",
            EventType::PolicyRejected => "policy-rejected",
            EventType::AuditorQuery => "auditor-query",
            EventType::KeyRotation => "key-rotation",
            EventType::RequestRefused => "request-refused",
        }
    }
}

/// Who acted.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    /// Agency id from the client certificate; `broker` for the broker's own acts.
    pub agency: String,
    /// Practitioner subject from the agency's token, if any.
    pub practitioner: String,
    pub role: String,
}

/// A keyed pseudonym of the child: HMAC-SHA-256 of the child's identifier under the pseudonymisation key of
/// `key_version`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pseudonym {
    pub key_version: u32,
    pub value: [u8; 32],
}

impl Pseudonym {
    pub fn to_hex(&self) -> String {
        format!("v{}:{}", self.key_version, hex::encode(self.value))
    }
}

/// One audit entry. Field order is part of the encoding: append new fields only with a new format version.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEntry {
    /// Position in the log, from 0; assigned when the entry is appended.
    pub sequence: u64,
    /// Microseconds since the Unix epoch, UTC.
    pub time_micros: i64,
    pub event: Option<EventType>,
    pub actor: Actor,
    pub subject: Option<Pseudonym>,
    pub message_id: String,
    /// The recipient agency the event concerns, if any.
    pub recipient: String,
    pub rule_ids: Vec<String>,
    pub lawful_basis: Vec<String>,
    pub reason_code: String,
    pub fields_shared: Vec<String>,
    pub fields_withheld: Vec<String>,
    pub policy_set_hash: String,
    /// Delivery attempt, where the event is about one.
    pub attempt: u32,
    /// Further detail without personal data (an override reason code, a deadline, a query's filter summary).
    pub detail: String,
}

impl AuditEntry {
    /// The deterministic encoding hashed into the Merkle tree.
    pub fn encode(&self) -> Result<Vec<u8>, AuditError> {
        let bytes = vec![ENTRY_FORMAT_VERSION];
        postcard::to_extend(self, bytes)
            .map_err(|error| AuditError::Malformed { sequence: self.sequence, reason: error.to_string() })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&ENTRY_FORMAT_VERSION, rest)) => postcard::from_bytes(rest).map_err(|error| error.to_string()),
            Some((version, _)) => Err(format!("unknown entry format version {version}")),
            None => Err("empty entry".to_owned()),
        }
    }

    /// Reads only the sequence number (the first field) of an encoded entry.
    pub fn decode_sequence(bytes: &[u8]) -> Result<u64, String> {
        match bytes.split_first() {
            Some((&ENTRY_FORMAT_VERSION, rest)) => {
                postcard::take_from_bytes::<u64>(rest).map(|(sequence, _)| sequence).map_err(|error| error.to_string())
            }
            Some((version, _)) => Err(format!("unknown entry format version {version}")),
            None => Err("empty entry".to_owned()),
        }
    }

    pub fn now_micros() -> i64 {
        let now = time::OffsetDateTime::now_utc();
        (now.unix_timestamp_nanos() / 1000) as i64
    }
}

/// The append-only audit log file.
pub struct AuditLog {
    log: AppendLog,
    next_sequence: u64,
    dir: PathBuf,
    /// The RFC 6962 tree over every entry's encoding, loaded from the start-up cache and the log on open (see
    /// [`merkle`] for its memory cost). Shared so the checkpoint signer and proof requests can read it while the
    /// committer appends.
    tree: SharedTree,
    /// The auditors' index, loaded like the tree (see [`index`]).
    index: index::SharedIndex,
    /// What has been handed to the start-up cache's thread, which saves it (see [`cache`]); `None` if its files
    /// could not be opened.
    cache: Option<cache::Writer>,
    saved: cache::Saved,
    last_save: std::time::Instant,
    /// Entries loaded from the start-up cache on open (the rest were read from the log).
    from_cache: u64,
    /// Set once any `fdatasync` of `entries.log` failed (see [`LogSync`]).
    write_back_failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AuditLog {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("entries.log")
    }

    /// Opens the log under `dir`: loads the start-up cache if it agrees with the log (see [`cache`]), then reads
    /// every entry after it (all of them without a cache), checking each decodes and that sequence numbers run on
    /// without a gap.
    ///
    /// Entries before the durable point recorded in `audit/durable` must read back whole (damage there is an
    /// error); after it, the first entry that does not read back (torn, a hole of zeros, a bad checksum, the wrong
    /// sequence number) ends the log and is cut off with everything after it: those bytes were never made durable
    /// here, and the store puts back from the journal every entry that was acknowledged ([`AuditLog::repair`]).
    /// Without `audit/durable` (a log written by a broker that made every entry durable at once, or restored from a
    /// backup) only a torn last record is cut off, as before. Opening does not move the durable point: the store's
    /// checkpoint after its replay does (so a failed start leaves the point where it was).
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        let path = Self::path(dir);
        // Where damage stops being an error and ends the log instead.
        let (tail, lenient_from) = match read_durable_mark(dir)? {
            Some(durable_to) => (Tail::DurableTo(durable_to), durable_to),
            None => (Tail::TornOnly, u64::MAX),
        };
        let (mut tree, mut memory_index, scan_from, mut saved, fresh) = match cache::load(dir, &path) {
            Ok(loaded) => {
                let saved = cache::Saved::from_meta(&loaded.meta);
                (loaded.tree, loaded.index, loaded.meta.log_offset, saved, false)
            }
            Err(reason) => {
                if !matches!(reason, cache::Unusable::Missing) && path.exists() {
                    tracing::warn!(reason = %reason, "the audit log's start-up cache is not used; reading the whole log and rebuilding it");
                }
                (MerkleTree::new(), index::MemoryIndex::default(), 0, cache::Saved::default(), true)
            }
        };
        let mut files = match cache::Files::open(dir, fresh) {
            Ok(files) => Some(files),
            Err(error) => {
                tracing::warn!(error = %error, "cannot write the audit log's start-up cache; the next start reads the whole log");
                None
            }
        };
        memory_index.record_unsaved(files.is_some());
        let from_cache = tree.size();
        let mut next_sequence = from_cache;
        let mut problem = None;
        let (log, recovery) = AppendLog::open_until(&path, scan_from, tail, |offset, bytes| {
            if problem.is_none() {
                match AuditEntry::decode(bytes) {
                    Ok(entry) if entry.sequence == next_sequence => memory_index.add(&entry, next_sequence, offset),
                    // Past the durable point: bytes never made durable (see above).
                    _ if offset >= lenient_from => return Ok(Keep::No),
                    Ok(entry) => {
                        problem = Some(AuditError::OutOfSequence { position: next_sequence, found: entry.sequence })
                    }
                    Err(reason) => problem = Some(AuditError::Malformed { sequence: next_sequence, reason }),
                }
            }
            tree.push(bytes);
            next_sequence += 1;
            // Reading a long log, write the cache as it grows (its postings would otherwise all wait in memory).
            if next_sequence % 65_536 == 0
                && problem.is_none()
                && let Some(cache) = &mut files
            {
                let end = offset + crate::store::log::HEADER_BYTES + bytes.len() as u64;
                if let Err(error) = cache.write(&saved.take(&tree, &mut memory_index, end)) {
                    tracing::warn!(error = %error, "cannot write the audit log's start-up cache");
                }
            }
            Ok(Keep::Yes)
        })?;
        if let Some(problem) = problem {
            return Err(problem);
        }
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "the audit log's torn or unsynced tail was cut off; the journal puts back what was acknowledged"
            );
        }
        let write_back_failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cache = files.and_then(|files| match LogSync::new(&log, &write_back_failed) {
            Ok(log_sync) => match cache::Writer::start(files, log_sync) {
                Ok(writer) => Some(writer),
                Err(error) => {
                    tracing::warn!(error = %error, "cannot start the audit log's start-up cache thread");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(error = %error, "cannot start the audit log's start-up cache thread");
                None
            }
        });
        memory_index.record_unsaved(cache.is_some());
        if let Some(writer) = &cache
            && (fresh || recovery.records > 0)
        {
            writer.save(saved.take(&tree, &mut memory_index, log.len()));
        }
        Ok(Self {
            log,
            next_sequence,
            dir: dir.to_owned(),
            tree: std::sync::Arc::new(std::sync::RwLock::new(tree)),
            index: std::sync::Arc::new(std::sync::RwLock::new(memory_index)),
            cache,
            saved,
            last_save: std::time::Instant::now(),
            from_cache,
            write_back_failed,
        })
    }

    /// Entries that opening took from the start-up cache rather than reading the log (see [`cache`]).
    pub fn from_cache(&self) -> u64 {
        self.from_cache
    }

    /// Hands what was added since the last save to the start-up cache's thread (see [`cache`]). Called every
    /// [`cache::HAND_OVER_EVERY`] entries or [`cache::SAVE_EVERY`] as entries are published, and on close.
    fn save_cache(&mut self) {
        let Some(writer) = &self.cache else { return };
        self.last_save = std::time::Instant::now();
        let tree = match self.tree.read() {
            Ok(tree) => tree,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut index = match self.index.write() {
            Ok(index) => index,
            Err(poisoned) => poisoned.into_inner(),
        };
        writer.save(self.saved.take(&tree, &mut index, self.log.len()));
    }

    /// Saves the start-up cache and waits until it is durable. Also done when the log is dropped.
    pub fn close(&mut self) {
        self.save_cache();
        if let Some(writer) = &mut self.cache {
            writer.finish();
        }
        self.cache = None;
    }

    /// Number of entries.
    pub fn len(&self) -> u64 {
        self.next_sequence
    }

    /// Size of `entries.log` in bytes.
    pub fn byte_len(&self) -> u64 {
        self.log.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next_sequence == 0
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The Merkle tree over all entries.
    pub fn tree(&self) -> SharedTree {
        self.tree.clone()
    }

    /// The auditors' index over all entries.
    pub fn index(&self) -> index::SharedIndex {
        self.index.clone()
    }

    /// Assigns sequence numbers, appends and makes the entries durable (and records that in `audit/durable`);
    /// returns their sequence numbers. For tools and tests: the broker's store writes entries with
    /// [`AuditLog::write`] and makes them durable in its journal.
    pub fn append(&mut self, entries: Vec<AuditEntry>) -> Result<Vec<u64>, AuditError> {
        Ok(self.append_located(entries)?.into_iter().map(|(sequence, _)| sequence).collect())
    }

    /// As [`AuditLog::append`], returning each entry's sequence number and byte offset in `entries.log` (what the
    /// query indexes point at).
    pub fn append_located(&mut self, entries: Vec<AuditEntry>) -> Result<Vec<(u64, u64)>, AuditError> {
        let written = self.write(entries)?;
        self.sync()?;
        write_durable_mark(&self.dir, self.log.len())?;
        Ok(self.publish(written))
    }

    /// The first half of [`AuditLog::append`]: assigns sequence numbers and writes the entries, without making them
    /// durable. Nothing else may be written before [`AuditLog::publish`] is called with the result, and that only
    /// once the entries are durable: the store copies [`Written::encoded`] into its journal record and makes that
    /// durable (one `fdatasync` per commit); `entries.log` itself is made durable later ([`Durability`]) and
    /// repaired from the journal on open ([`AuditLog::repair`]).
    pub fn write(&mut self, mut entries: Vec<AuditEntry>) -> Result<Written, AuditError> {
        let first = self.next_sequence;
        let mut encoded = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter_mut().enumerate() {
            entry.sequence = first + index as u64;
            encoded.push(entry.encode()?);
        }
        let offsets =
            if entries.is_empty() { Vec::new() } else { self.log.append(encoded.iter().map(Vec::as_slice))? };
        Ok(Written { entries, encoded, offsets })
    }

    /// Makes everything written durable.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        use std::sync::atomic::Ordering;
        if self.write_back_failed.load(Ordering::Acquire) {
            return Err(AuditError::WriteBackFailed);
        }
        self.log.sync().map_err(|error| {
            self.write_back_failed.store(true, Ordering::Release);
            error.into()
        })
    }

    /// Takes back entries written but not made durable (their `fdatasync` failed): the log is cut back to where they
    /// start, so the next entries take their sequence numbers.
    pub fn unwrite(&mut self, written: Written) -> Result<(), AuditError> {
        if let Some(start) = written.offsets.first() {
            self.log.truncate(*start)?;
        }
        Ok(())
    }

    /// What makes the log durable from another thread and records how far it is (see [`Durability`]).
    pub fn durability(&self) -> Result<Durability, AuditError> {
        Ok(Durability { log: LogSync::new(&self.log, &self.write_back_failed)?, dir: self.dir.clone() })
    }

    /// Puts back entries the journal carries (their encodings, from sequence number `first` on) that the log lost
    /// past its durable point (see [`AuditLog::open`]); returns how many were put back. Entries the log already
    /// holds must have exactly the same bytes (compared by leaf hash), and none may be missing before them. For
    /// opening only: the caller makes the log durable (the store checkpoints after replay) before anything reads
    /// what was put back.
    pub fn repair(&mut self, first: u64, encoded: Vec<Vec<u8>>) -> Result<u64, AuditError> {
        let mut entries = Vec::new();
        let mut missing = Vec::new();
        for (index, bytes) in encoded.into_iter().enumerate() {
            let Some(sequence) = first.checked_add(index as u64) else {
                return Err(AuditError::Malformed { sequence: first, reason: "sequence numbers overflow".to_owned() });
            };
            let next = self.next_sequence + missing.len() as u64;
            if sequence < self.next_sequence {
                let held = match self.tree.read() {
                    Ok(tree) => tree.leaf_hash_at(sequence),
                    Err(poisoned) => poisoned.into_inner().leaf_hash_at(sequence),
                };
                if held != Some(merkle::leaf_hash(&bytes)) {
                    return Err(AuditError::JournalDisagrees { sequence });
                }
            } else if sequence == next {
                let entry = AuditEntry::decode(&bytes).map_err(|reason| AuditError::Malformed { sequence, reason })?;
                if entry.sequence != sequence {
                    return Err(AuditError::OutOfSequence { position: sequence, found: entry.sequence });
                }
                entries.push(entry);
                missing.push(bytes);
            } else {
                return Err(AuditError::Missing { from: next, to: sequence - 1 });
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let offsets = self.log.append(missing.iter().map(Vec::as_slice))?;
        let repaired = missing.len() as u64;
        self.publish(Written { entries, encoded: missing, offsets });
        Ok(repaired)
    }

    /// The second half of [`AuditLog::append`]: the written entries, now durable, join the tree that checkpoints and
    /// proofs are made from, and the auditors' index. Returns each entry's sequence number and byte offset.
    pub fn publish(&mut self, written: Written) -> Vec<(u64, u64)> {
        let Written { entries, encoded, offsets } = written;
        if entries.is_empty() {
            return Vec::new();
        }
        let first = self.next_sequence;
        let mut tree = match self.tree.write() {
            Ok(tree) => tree,
            Err(poisoned) => poisoned.into_inner(),
        };
        for bytes in &encoded {
            tree.push(bytes);
        }
        drop(tree);
        let mut index = match self.index.write() {
            Ok(index) => index,
            Err(poisoned) => poisoned.into_inner(),
        };
        for ((entry, offset), sequence) in entries.iter().zip(&offsets).zip(first..) {
            index.add(entry, sequence, *offset);
        }
        drop(index);
        self.next_sequence += entries.len() as u64;
        if self.cache.is_some()
            && (self.next_sequence - self.saved.entries() >= cache::HAND_OVER_EVERY
                || self.last_save.elapsed() >= cache::SAVE_EVERY)
        {
            self.save_cache();
        }
        (first..self.next_sequence).zip(offsets).collect()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if self.cache.is_some() {
            self.close();
        }
    }
}

/// Entries written to the audit log but not yet durable nor published (see [`AuditLog::write`]).
#[must_use = "written entries must be published once durable"]
pub struct Written {
    entries: Vec<AuditEntry>,
    encoded: Vec<Vec<u8>>,
    offsets: Vec<u64>,
}

impl Written {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entries' encodings, in sequence order (what the tree hashes and the store copies into the journal).
    pub fn encoded(&self) -> &[Vec<u8>] {
        &self.encoded
    }

    /// The first entry's sequence number (if there are any).
    pub fn first_sequence(&self) -> Option<u64> {
        self.entries.first().map(|entry| entry.sequence)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The file under the audit directory that records how far `entries.log` is known to be durable.
const DURABLE_MARK: &str = "durable";
const DURABLE_MARK_MAGIC: &[u8; 8] = b"SGAUDD01";

/// Makes `entries.log` durable from a thread other than the committer's (the store's checkpointer, the start-up
/// cache's thread). Each has an open file of its own, so each is told of a failed write-back; and all of one log's
/// share one flag with [`AuditLog::sync`]: once any `fdatasync` of the log has failed, none of them succeeds again
/// until a restart. (Linux reports a failed write-back once and then marks the pages clean, so a later `fdatasync`
/// can succeed although entries were lost; the journal still holds them, and the next start puts them back, but
/// only if nothing recorded them as durable meanwhile.)
pub struct LogSync {
    handle: SyncHandle,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LogSync {
    fn new(log: &AppendLog, failed: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<Self, LogError> {
        Ok(Self { handle: log.sync_handle()?, failed: failed.clone() })
    }

    pub fn sync(&self) -> Result<(), AuditError> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) {
            return Err(AuditError::WriteBackFailed);
        }
        self.handle.sync().map_err(|error| {
            self.failed.store(true, Ordering::Release);
            error.into()
        })
    }

    /// As if an `fdatasync` had failed (tests of what must then stop).
    #[cfg(test)]
    pub fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Makes `entries.log` durable from another thread and then records how far it is (the store's checkpointer, every
/// ten seconds, after its replay on open and at close; see [`crate::store`]). Between two such points the audit
/// log's newest entries are durable only in the journal, which carries them.
pub struct Durability {
    log: LogSync,
    dir: PathBuf,
}

impl Durability {
    /// `fdatasync`s `entries.log`, then records `up_to` (a record boundary no later than what was written before
    /// this call) as its durable point.
    pub fn make_durable(&self, up_to: u64) -> Result<(), AuditError> {
        self.log.sync()?;
        write_durable_mark(&self.dir, up_to)
    }

    /// As if an `fdatasync` of the log had failed (tests).
    #[cfg(test)]
    pub fn fail(&self) {
        self.log.fail();
    }
}

/// The recorded durable point of `entries.log`, if any.
pub(crate) fn read_durable_mark(dir: &Path) -> Result<Option<u64>, AuditError> {
    let path = dir.join(DURABLE_MARK);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LogError::Io { path, source }.into()),
    };
    let damaged = |reason: &str| AuditError::DurableMark { path: path.clone(), reason: reason.to_owned() };
    let (Some(magic), Some(offset), Some(crc)) = (bytes.get(..8), bytes.get(8..16), bytes.get(16..20)) else {
        return Err(damaged("too short"));
    };
    if bytes.len() != 20 || magic != DURABLE_MARK_MAGIC {
        return Err(damaged("not a durable mark of this format"));
    }
    if crc32fast::hash(&bytes[..16]).to_le_bytes() != crc {
        return Err(damaged("checksum mismatch"));
    }
    let mut value = [0u8; 8];
    value.copy_from_slice(offset);
    Ok(Some(u64::from_le_bytes(value)))
}

/// Records `offset` as the durable point of `entries.log` (write, `fsync`, rename, `fsync` the folder).
pub(crate) fn write_durable_mark(dir: &Path, offset: u64) -> Result<(), AuditError> {
    let mut bytes = DURABLE_MARK_MAGIC.to_vec();
    bytes.extend_from_slice(&offset.to_le_bytes());
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    crate::store::log::replace_durably(dir, DURABLE_MARK, &bytes)
        .map_err(|source| LogError::Io { path: dir.join(DURABLE_MARK), source }.into())
}

/// Keyed pseudonyms of children's identifiers.
#[derive(Clone)]
pub struct Pseudonymiser {
    key_version: u32,
    key: [u8; 32],
}

impl Pseudonymiser {
    /// Loads the pseudonymisation key from `keys_dir/pseudonym-v1.key`, creating it on first run.
    pub fn load_or_create(keys_dir: &Path) -> Result<Self, AuditError> {
        let path = keys_dir.join(PSEUDONYM_KEY_FILE);
        let key_error = |reason: String| AuditError::Key { path: path.clone(), reason };
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|error| key_error(error.to_string()))?;
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| key_error("expected 32 bytes of hex".to_owned()))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                crate::pki::write_file(&path.with_extension("key"), &hex::encode(key))
                    .map_err(|error| key_error(error.to_string()))?;
                key
            }
            Err(error) => return Err(key_error(error.to_string())),
        };
        Ok(Self { key_version: 1, key })
    }

    /// The pseudonym of a child, from the NHS number if given, else the local reference, else name and date of
    /// birth. `None` when the message identifies no child.
    pub fn child(&self, child: Option<&proto::pb::Child>) -> Option<Pseudonym> {
        let child = child?;
        let identifier = if !child.nhs_number.trim().is_empty() {
            format!("nhs:{}", child.nhs_number.chars().filter(char::is_ascii_digit).collect::<String>())
        } else if !child.local_reference.trim().is_empty() {
            format!("local:{}", child.local_reference.trim())
        } else if !child.family_name.trim().is_empty() {
            let dob = child.date_of_birth.as_ref().map(|d| format!("{:04}-{:02}-{:02}", d.year, d.month, d.day));
            format!(
                "name:{}|{}|{}",
                child.family_name.trim().to_lowercase(),
                child.given_name.trim().to_lowercase(),
                dob.unwrap_or_default()
            )
        } else {
            return None;
        };
        Some(self.of(&identifier))
    }

    /// The pseudonym of an NHS number, for auditors' queries.
    pub fn nhs_number(&self, nhs_number: &str) -> Pseudonym {
        self.of(&format!("nhs:{}", nhs_number.chars().filter(char::is_ascii_digit).collect::<String>()))
    }

    fn of(&self, identifier: &str) -> Pseudonym {
        // HMAC pads a key shorter than the hash's block to the block size with zeros; doing it here gives the same
        // MAC through the infallible constructor.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&self.key);
        let mut mac = <Hmac<Sha256> as hmac::digest::KeyInit>::new(&block.into());
        mac.update(identifier.as_bytes());
        Pseudonym { key_version: self.key_version, value: mac.finalize().into_bytes().into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_encode_deterministically() {
        let entry = AuditEntry {
            sequence: 7,
            time_micros: 1_700_000_000_000_000,
            event: Some(EventType::DecisionToShare),
            actor: Actor { agency: "beds-police".into(), practitioner: "pc-1234".into(), role: "spoc".into() },
            message_id: "m-1".into(),
            rule_ids: vec!["f1-operation-encompass".into()],
            ..AuditEntry::default()
        };
        let first = entry.encode().unwrap();
        assert_eq!(first, entry.clone().encode().unwrap());
        assert_eq!(first[0], ENTRY_FORMAT_VERSION);
        assert_eq!(AuditEntry::decode(&first).unwrap(), entry);
    }

    #[test]
    fn appended_entries_get_consecutive_sequence_numbers_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        let sequences = log.append(vec![AuditEntry::default(), AuditEntry::default()]).unwrap();
        assert_eq!(sequences, vec![0, 1]);
        assert_eq!(log.append(vec![AuditEntry::default()]).unwrap(), vec![2]);
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 3);
    }

    /// A directory whose audit log holds entries must still have its keys: a missing one is named, not made anew.
    /// A new directory, or one whose keys are there, is fine.
    #[test]
    fn a_missing_key_beside_a_log_with_entries_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        check_keys_kept(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("audit")).unwrap();
        std::fs::write(AuditLog::path(&dir.path().join("audit")), b"an entry").unwrap();
        let error = check_keys_kept(dir.path()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("pseudonym-v1.key") && text.contains("checkpoint.ed25519"), "{text}");
        Pseudonymiser::load_or_create(&dir.path().join("keys")).unwrap();
        let text = check_keys_kept(dir.path()).unwrap_err().to_string();
        assert!(!text.contains("pseudonym-v1.key") && text.contains("checkpoint.ed25519"), "{text}");
        std::fs::write(dir.path().join("keys").join(checkpoints::SIGNING_KEY_FILE), "00").unwrap();
        check_keys_kept(dir.path()).unwrap();
    }

    #[test]
    fn pseudonyms_are_keyed_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let first = Pseudonymiser::load_or_create(dir.path()).unwrap();
        let again = Pseudonymiser::load_or_create(dir.path()).unwrap();
        let other = Pseudonymiser::load_or_create(&dir.path().join("other")).unwrap();
        let child = proto::pb::Child { nhs_number: "943 476 5919".into(), ..Default::default() };
        let pseudonym = first.child(Some(&child)).unwrap();
        assert_eq!(pseudonym, again.child(Some(&child)).unwrap());
        assert_eq!(pseudonym, first.nhs_number("9434765919"));
        assert_ne!(pseudonym, other.child(Some(&child)).unwrap());
        assert!(!pseudonym.to_hex().contains("9434765919"));
    }
}
