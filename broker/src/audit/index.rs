//! The auditors' indexes over the audit log, and reading one entry back by its byte offset.
//!
//! The index is held in memory ([`MemoryIndex`]): for every key an entry is indexed under, the sequence numbers of
//! the entries, in order, plus every entry's byte offset in `audit/entries.log`. [`crate::audit::AuditLog`] loads it
//! on start from the start-up cache ([`crate::audit::cache`]) and the entries after it, and adds each entry once it
//! is durable. Finding one child's entries among millions is then a hash lookup plus one positioned read per entry.
//! Keeping it out of sled keeps the commit path to the audit log and the journal: an earlier version wrote about
//! seven sled keys per entry, which limited durable appends to about 7k entries/s.
//!
//! Keys are held as a 64-bit hash of the key's bytes ([`key_hash`], fixed because the cache saves them), built
//! without allocating: a collision costs a read, never a wrong answer (see below). Memory: 8 bytes per entry for its
//! offset, 1–3 bytes per (entry, key) pair in a busy key's list ([`crate::audit::postings`]), plus one map slot of
//! 48 bytes per distinct key, which holds a short list (a message's entries) inline; every message id is a distinct
//! key. Event types are not indexed (each would hold every
//! entry); a filter on events alone reads the log in order.
//!
//! | kind | value |
//! |---|---|
//! | `child` | the subject pseudonym, `v<key version>:<hex>` |
//! | `agency` | the acting agency and, if different, the recipient agency |
//! | `practitioner` | the acting practitioner's subject |
//! | `rule` | each deciding rule id |
//! | `message` | the message id |
//!
//! The index is a lookup aid only: every entry read through it is checked (frame checksum, decoding, sequence
//! number) and matched against the whole filter again, so a stale or colliding key can cost a read, never a wrong
//! answer.

use std::{
    collections::HashMap,
    fs::File,
    path::Path,
    sync::{Arc, RwLock},
};

use super::{AuditEntry, Pseudonym, postings::Postings};

/// The in-memory index, shared between the committer (the only writer) and queries.
pub type SharedIndex = Arc<RwLock<MemoryIndex>>;

/// For each index key (by [`key_hash`]), the sequence numbers of the entries under it (ascending, held compactly:
/// [`Postings`]); and each entry's byte offset.
#[derive(Debug, Default)]
pub struct MemoryIndex {
    postings: HashMap<u64, Postings>,
    offsets: Vec<u64>,
    /// Reused to spell each key while adding, so that adding allocates only for new keys.
    scratch: Vec<u8>,
    /// The (key hash, sequence) pairs added since [`crate::audit::cache`] last took them, for it to save; kept only
    /// while `recording` (when there is a cache to save them).
    unsaved: Vec<(u64, u64)>,
    recording: bool,
}

impl MemoryIndex {
    /// Adds the entry at `sequence` (which must be the next one) stored at `offset`.
    pub fn add(&mut self, entry: &AuditEntry, sequence: u64, offset: u64) {
        debug_assert_eq!(sequence, self.offsets.len() as u64);
        self.offsets.push(offset);
        let mut scratch = std::mem::take(&mut self.scratch);
        for_each_key_hash(entry, &mut scratch, |hash| {
            // A key an entry names twice (a rule listed twice) holds the entry once.
            if self.postings.entry(hash).or_default().push(sequence) && self.recording {
                self.unsaved.push((hash, sequence));
            }
        });
        self.scratch = scratch;
    }

    /// An index loaded from [`crate::audit::cache`]: every key's ascending sequence numbers, and every entry's
    /// offset.
    pub(crate) fn from_parts(postings: HashMap<u64, Postings>, offsets: Vec<u64>) -> Self {
        Self { postings, offsets, scratch: Vec::new(), unsaved: Vec::new(), recording: false }
    }

    /// Whether to keep the pairs added from now on for [`Self::take_unsaved`] (off by default: nothing saves them).
    pub(crate) fn record_unsaved(&mut self, recording: bool) {
        self.recording = recording;
        if !recording {
            self.unsaved = Vec::new();
        }
    }

    /// Number of entries indexed.
    pub fn len(&self) -> u64 {
        self.offsets.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Every entry's byte offset in `entries.log`, by sequence number.
    pub(crate) fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// The (key hash, sequence) pairs added since the last call, in the order they were added.
    pub(crate) fn take_unsaved(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.unsaved)
    }

    /// The (sequence, offset) of the entries under `prefix` with `first <= sequence < size_bound`, at most `limit`.
    pub fn lookup(&self, prefix: &[u8], first: u64, size_bound: u64, limit: usize) -> Vec<(u64, u64)> {
        let Some(sequences) = self.postings.get(&key_hash(prefix)) else { return Vec::new() };
        sequences
            .from(first)
            .take_while(|sequence| *sequence < size_bound)
            .take(limit)
            .filter_map(|sequence| self.offsets.get(sequence as usize).map(|offset| (sequence, *offset)))
            .collect()
    }
}

/// The prefix of every audit index key.
pub const INDEX_PREFIX: &str = "x/";

/// What an index key is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexKind<'a> {
    Child(&'a Pseudonym),
    Agency(&'a str),
    Practitioner(&'a str),
    Rule(&'a str),
    Message(&'a str),
}

impl IndexKind<'_> {
    /// The prefix every key of this kind and value starts with (up to and including the `0x00` separator).
    pub fn prefix(&self) -> Vec<u8> {
        let mut key = Vec::new();
        self.write_prefix(&mut key);
        key
    }

    /// Writes [`Self::prefix`] into `out` (cleared first) without allocating once `out` has grown: adding entries
    /// to the index spells every key of every entry, on start for the whole log.
    pub fn write_prefix(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.clear();
        out.extend_from_slice(INDEX_PREFIX.as_bytes());
        let (kind, value) = match self {
            IndexKind::Child(pseudonym) => {
                // The spelling of `Pseudonym::to_hex`: `v<key version>:<hex>`. Writing to a Vec cannot fail.
                let _ = write!(out, "child/v{}:", pseudonym.key_version);
                let mut hex = [0u8; 64];
                // 32 bytes always fit 64 hex digits.
                let _ = hex::encode_to_slice(pseudonym.value, &mut hex);
                out.extend_from_slice(&hex);
                out.push(0);
                return;
            }
            IndexKind::Agency(agency) => ("agency", *agency),
            IndexKind::Practitioner(practitioner) => ("practitioner", *practitioner),
            IndexKind::Rule(rule) => ("rule", *rule),
            IndexKind::Message(message) => ("message", *message),
        };
        out.extend_from_slice(kind.as_bytes());
        out.push(b'/');
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

/// The hash an index key is held under: SipHash-1-3 with the keys (0, 0) over the key's bytes. The index is saved
/// in [`crate::audit::cache`] by these hashes, so the function must never change without a new
/// [`crate::audit::cache::KEY_HASH`] (the `siphasher` crate's output is fixed; std's `DefaultHasher` is the same
/// function today but documented as free to change between Rust releases).
pub fn key_hash(key: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut hasher = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    hasher.write(key);
    hasher.finish()
}

/// Calls `visit` with each key an entry is indexed under.
fn for_each_kind<'a>(entry: &'a AuditEntry, mut visit: impl FnMut(IndexKind<'a>)) {
    if let Some(subject) = &entry.subject {
        visit(IndexKind::Child(subject));
    }
    if !entry.actor.agency.is_empty() {
        visit(IndexKind::Agency(&entry.actor.agency));
    }
    if !entry.recipient.is_empty() && entry.recipient != entry.actor.agency {
        visit(IndexKind::Agency(&entry.recipient));
    }
    if !entry.actor.practitioner.is_empty() {
        visit(IndexKind::Practitioner(&entry.actor.practitioner));
    }
    for rule in &entry.rule_ids {
        visit(IndexKind::Rule(rule));
    }
    if !entry.message_id.is_empty() {
        visit(IndexKind::Message(&entry.message_id));
    }
}

/// Calls `visit` with the [`key_hash`] of each of [`entry_prefixes`]`(entry)`, spelling each key in `scratch`.
fn for_each_key_hash(entry: &AuditEntry, scratch: &mut Vec<u8>, mut visit: impl FnMut(u64)) {
    for_each_kind(entry, |kind| {
        kind.write_prefix(scratch);
        visit(key_hash(scratch));
    });
}

/// The key prefixes under which an entry is indexed (each followed by its sequence number when written).
pub fn entry_prefixes(entry: &AuditEntry) -> Vec<Vec<u8>> {
    let mut prefixes = Vec::with_capacity(6 + entry.rule_ids.len());
    for_each_kind(entry, |kind| prefixes.push(kind.prefix()));
    prefixes
}

/// Why an entry could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadEntryError {
    #[error("`{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the audit record at byte offset {offset} is damaged: {reason}")]
    Damaged { offset: u64, reason: String },
}

/// Positioned reads of single entries from `entries.log`.
pub struct EntryReader {
    file: File,
    path: String,
}

impl EntryReader {
    pub fn open(audit_dir: &Path) -> Result<Self, ReadEntryError> {
        let path = super::AuditLog::path(audit_dir);
        let file =
            File::open(&path).map_err(|source| ReadEntryError::Io { path: path.display().to_string(), source })?;
        Ok(Self { file, path: path.display().to_string() })
    }

    /// Reads the framed record at `offset`, checks its checksum and decodes it; returns the encoded bytes (what the
    /// Merkle tree hashes) and the entry.
    pub fn read_at(&self, offset: u64) -> Result<(Vec<u8>, AuditEntry), ReadEntryError> {
        use std::os::unix::fs::FileExt;
        let io = |source| ReadEntryError::Io { path: self.path.clone(), source };
        let mut header = [0u8; 8];
        self.file.read_exact_at(&mut header, offset).map_err(io)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > crate::store::log::MAX_RECORD_BYTES {
            return Err(ReadEntryError::Damaged { offset, reason: "impossible record length".to_owned() });
        }
        let mut payload = vec![0u8; len];
        self.file.read_exact_at(&mut payload, offset + 8).map_err(io)?;
        if crc32fast::hash(&payload) != crc {
            return Err(ReadEntryError::Damaged { offset, reason: "checksum mismatch".to_owned() });
        }
        let entry = AuditEntry::decode(&payload).map_err(|reason| ReadEntryError::Damaged { offset, reason })?;
        Ok((payload, entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, AuditLog};

    #[test]
    fn the_index_leads_back_to_the_entry_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        let entry = AuditEntry {
            event: Some(crate::audit::EventType::Delivery),
            actor: Actor { agency: "broker".into(), ..Actor::default() },
            recipient: "luton-csc".into(),
            subject: Some(Pseudonym { key_version: 1, value: [7; 32] }),
            rule_ids: vec!["f3".into()],
            message_id: "m-1".into(),
            ..AuditEntry::default()
        };
        assert_eq!(entry_prefixes(&entry).len(), 5, "child, two agencies, rule, message");
        log.append(vec![AuditEntry::default()]).unwrap();
        let located = log.append_located(vec![entry.clone()]).unwrap();
        let (sequence, offset) = located[0];
        let child = IndexKind::Child(entry.subject.as_ref().unwrap()).prefix();
        let found = log.index().read().unwrap().lookup(&child, 0, 10, 10);
        assert_eq!(found, vec![(sequence, offset)]);
        assert!(log.index().read().unwrap().lookup(&child, sequence + 1, 10, 10).is_empty());
        let reader = EntryReader::open(dir.path()).unwrap();
        let (bytes, read) = reader.read_at(offset).unwrap();
        assert_eq!(read.sequence, 1);
        assert_eq!(read.recipient, "luton-csc");
        assert_eq!(bytes, read.encode().unwrap());
        drop(log);
        let reopened = AuditLog::open(dir.path()).unwrap();
        assert_eq!(reopened.index().read().unwrap().lookup(&child, 0, 10, 10), vec![(sequence, offset)]);
        // The keys hashed while adding are exactly the prefixes queries ask for, and a child's key is spelt as
        // `Pseudonym::to_hex` spells the pseudonym.
        for version in [0, 1, 9, 10, 4_294_967_295] {
            let pseudonym = Pseudonym { key_version: version, value: [0xab; 32] };
            assert_eq!(
                IndexKind::Child(&pseudonym).prefix(),
                format!("{INDEX_PREFIX}child/{}\0", pseudonym.to_hex()).into_bytes()
            );
            let entry = AuditEntry {
                subject: Some(Pseudonym { key_version: version, value: [0xab; 32] }),
                rule_ids: vec!["f3".into(), "f3".into()],
                ..entry.clone()
            };
            let mut added = Vec::new();
            for_each_key_hash(&entry, &mut Vec::new(), |hash| added.push(hash));
            let expected: Vec<u64> = entry_prefixes(&entry).iter().map(|prefix| key_hash(prefix)).collect();
            assert_eq!(added, expected);
        }
        // A prefix is never a prefix of another value's keys: `ab` does not find `abc`.
        assert!(!IndexKind::Agency("abc").prefix().starts_with(&IndexKind::Agency("ab").prefix()));
    }
}
