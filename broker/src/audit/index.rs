//! The auditors' indexes over the audit log, and reading one entry back by its byte offset.
//!
//! The committer ([`crate::store`]) adds, for every audit entry it appends, one index key per thing auditors filter
//! by, written in the same journal record and sled batch as the commit's other writes (so the index is as durable as
//! the rest of the state and is rebuilt by journal replay). A key is `x/<kind>/<value>` + `0x00` + the sequence
//! number as 20 decimal digits, and its value is the entry's byte offset in `audit/entries.log` (8 bytes, big
//! endian). Finding one child's entries among millions is then a prefix scan plus one positioned read per entry.
//!
//! | kind | value |
//! |---|---|
//! | `child` | the subject pseudonym, `v<key version>:<hex>` |
//! | `agency` | the acting agency and, if different, the recipient agency |
//! | `practitioner` | the acting practitioner's subject |
//! | `rule` | each deciding rule id |
//! | `event` | the event type (`decision-to-share`, ...) |
//! | `message` | the message id |
//!
//! The index is a lookup aid only: every entry read through it is checked (frame checksum, decoding, sequence
//! number) and matched against the whole filter again, so a stale or colliding key can cost a read, never a wrong
//! answer.

use std::{fs::File, path::Path};

use super::{AuditEntry, EventType, Pseudonym};
use crate::store::Write;

/// The prefix of every audit index key.
pub const INDEX_PREFIX: &str = "x/";

/// What an index key is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexKind<'a> {
    Child(&'a Pseudonym),
    Agency(&'a str),
    Practitioner(&'a str),
    Rule(&'a str),
    Event(EventType),
    Message(&'a str),
}

impl IndexKind<'_> {
    /// The prefix every key of this kind and value starts with (up to and including the `0x00` separator).
    pub fn prefix(&self) -> Vec<u8> {
        let (kind, value) = match self {
            IndexKind::Child(pseudonym) => ("child", pseudonym.to_hex()),
            IndexKind::Agency(agency) => ("agency", (*agency).to_owned()),
            IndexKind::Practitioner(practitioner) => ("practitioner", (*practitioner).to_owned()),
            IndexKind::Rule(rule) => ("rule", (*rule).to_owned()),
            IndexKind::Event(event) => ("event", event.as_str().to_owned()),
            IndexKind::Message(message) => ("message", (*message).to_owned()),
        };
        let mut key = format!("{INDEX_PREFIX}{kind}/{value}").into_bytes();
        key.push(0);
        key
    }
}

/// The key prefixes under which an entry is indexed (each followed by its sequence number when written).
pub fn entry_prefixes(entry: &AuditEntry) -> Vec<Vec<u8>> {
    let mut prefixes = Vec::with_capacity(6 + entry.rule_ids.len());
    if let Some(subject) = &entry.subject {
        prefixes.push(IndexKind::Child(subject).prefix());
    }
    if !entry.actor.agency.is_empty() {
        prefixes.push(IndexKind::Agency(&entry.actor.agency).prefix());
    }
    if !entry.recipient.is_empty() && entry.recipient != entry.actor.agency {
        prefixes.push(IndexKind::Agency(&entry.recipient).prefix());
    }
    if !entry.actor.practitioner.is_empty() {
        prefixes.push(IndexKind::Practitioner(&entry.actor.practitioner).prefix());
    }
    for rule in &entry.rule_ids {
        prefixes.push(IndexKind::Rule(rule).prefix());
    }
    if let Some(event) = entry.event {
        prefixes.push(IndexKind::Event(event).prefix());
    }
    if !entry.message_id.is_empty() {
        prefixes.push(IndexKind::Message(&entry.message_id).prefix());
    }
    prefixes
}

/// The index writes for an entry appended at `sequence`, `offset`.
pub fn index_writes(prefixes: Vec<Vec<u8>>, sequence: u64, offset: u64) -> impl Iterator<Item = Write> {
    prefixes.into_iter().map(move |mut key| {
        key.extend_from_slice(format!("{sequence:020}").as_bytes());
        Write::Put(key, offset.to_be_bytes().to_vec())
    })
}

/// Reads the sequence number and offset back from an index key and value.
pub fn parse_index_item(key: &[u8], value: &[u8]) -> Option<(u64, u64)> {
    let digits = key.get(key.len().checked_sub(20)?..)?;
    let sequence = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let offset = u64::from_be_bytes(value.try_into().ok()?);
    Some((sequence, offset))
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
    fn index_keys_sort_by_sequence_and_lead_back_to_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open(dir.path()).unwrap();
        let entry = AuditEntry {
            event: Some(EventType::Delivery),
            actor: Actor { agency: "broker".into(), ..Actor::default() },
            recipient: "luton-csc".into(),
            subject: Some(Pseudonym { key_version: 1, value: [7; 32] }),
            rule_ids: vec!["f3".into()],
            message_id: "m-1".into(),
            ..AuditEntry::default()
        };
        log.append(vec![AuditEntry::default()]).unwrap();
        let located = log.append_located(vec![entry.clone()]).unwrap();
        let (sequence, offset) = located[0];
        let writes: Vec<Write> = index_writes(entry_prefixes(&entry), sequence, offset).collect();
        assert_eq!(writes.len(), 6, "child, two agencies, rule, event, message");
        let Write::Put(key, value) = &writes[0] else { panic!("a put") };
        assert!(key.starts_with(&IndexKind::Child(entry.subject.as_ref().unwrap()).prefix()));
        assert_eq!(parse_index_item(key, value), Some((1, offset)));
        let reader = EntryReader::open(dir.path()).unwrap();
        let (bytes, read) = reader.read_at(offset).unwrap();
        assert_eq!(read.sequence, 1);
        assert_eq!(read.recipient, "luton-csc");
        assert_eq!(bytes, read.encode().unwrap());
        // A prefix is never a prefix of another value's keys: `ab` does not find `abc`.
        assert!(!IndexKind::Agency("abc").prefix().starts_with(&IndexKind::Agency("ab").prefix()));
    }
}
