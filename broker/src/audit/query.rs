//! Auditors' queries over the audit log: a filter, the search (through an index when the filter names something
//! indexed, else a scan of `entries.log`), and "who received this child's data" for subject access requests.
//!
//! Searches only look at the first `size_bound` entries: the caller passes the size of the tree it will prove
//! against, so every result has an inclusion proof in that tree and a scan never reads a record still being written.

use std::{
    collections::BTreeMap,
    io::{BufReader, Read},
    path::Path,
};

use super::{
    AuditEntry, AuditLog, EventType, Pseudonym,
    index::{EntryReader, IndexKind, ReadEntryError},
};
use crate::store::{Store, StoreError};

/// Most entries one query returns.
pub const MAX_LIMIT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Read(#[from] ReadEntryError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the audit index points at entry {found} where entry {expected} was expected")]
    IndexMismatch { expected: u64, found: u64 },
}

/// What an auditor asks for. Every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// The child's pseudonym (the broker computes it from the identifier the auditor gives).
    pub child: Option<Pseudonym>,
    /// The acting or receiving agency.
    pub agency: Option<String>,
    pub practitioner: Option<String>,
    pub rule_id: Option<String>,
    pub message_id: Option<String>,
    /// Any of these event types (empty: any event).
    pub events: Vec<EventType>,
    /// Inclusive lower bound, microseconds since the Unix epoch.
    pub from_micros: Option<i64>,
    /// Exclusive upper bound, microseconds since the Unix epoch.
    pub to_micros: Option<i64>,
}

impl AuditFilter {
    pub fn matches(&self, entry: &AuditEntry) -> bool {
        self.child.as_ref().is_none_or(|child| entry.subject.as_ref() == Some(child))
            && self.agency.as_ref().is_none_or(|agency| &entry.actor.agency == agency || &entry.recipient == agency)
            && self.practitioner.as_ref().is_none_or(|practitioner| &entry.actor.practitioner == practitioner)
            && self.rule_id.as_ref().is_none_or(|rule| entry.rule_ids.contains(rule))
            && self.message_id.as_ref().is_none_or(|message| &entry.message_id == message)
            && (self.events.is_empty() || entry.event.is_some_and(|event| self.events.contains(&event)))
            && self.from_micros.is_none_or(|from| entry.time_micros >= from)
            && self.to_micros.is_none_or(|to| entry.time_micros < to)
    }

    /// A summary without personal data for the auditor-query entry's `detail`: the child appears as its pseudonym.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(child) = &self.child {
            parts.push(format!("child={}", child.to_hex()));
        }
        for (name, value) in [
            ("agency", &self.agency),
            ("practitioner", &self.practitioner),
            ("rule", &self.rule_id),
            ("message", &self.message_id),
        ] {
            if let Some(value) = value {
                parts.push(format!("{name}={value}"));
            }
        }
        if !self.events.is_empty() {
            let events: Vec<&str> = self.events.iter().map(|event| event.as_str()).collect();
            parts.push(format!("events={}", events.join(",")));
        }
        if let Some(from) = self.from_micros {
            parts.push(format!("from_micros={from}"));
        }
        if let Some(to) = self.to_micros {
            parts.push(format!("to_micros={to}"));
        }
        if parts.is_empty() { "all".to_owned() } else { parts.join(" ") }
    }

    /// The most selective index the filter can use, if any.
    fn index(&self) -> Option<IndexKind<'_>> {
        if let Some(child) = &self.child {
            return Some(IndexKind::Child(child));
        }
        if let Some(message) = &self.message_id {
            return Some(IndexKind::Message(message));
        }
        if let Some(practitioner) = &self.practitioner {
            return Some(IndexKind::Practitioner(practitioner));
        }
        if let Some(rule) = &self.rule_id {
            return Some(IndexKind::Rule(rule));
        }
        if let Some(agency) = &self.agency {
            return Some(IndexKind::Agency(agency));
        }
        None
    }
}

/// One entry found, with the bytes the Merkle tree hashed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub encoded: Vec<u8>,
    pub entry: AuditEntry,
}

/// A page of results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub found: Vec<Found>,
    /// Set when more entries match: pass it as `after_sequence` for the next page.
    pub next_after_sequence: Option<u64>,
}

/// Finds the entries matching `filter` with sequence numbers above `after_sequence` and below `size_bound`, in
/// sequence order, at most `limit` (capped at [`MAX_LIMIT`]).
pub fn search(
    store: &Store,
    audit_dir: &Path,
    filter: &AuditFilter,
    after_sequence: Option<u64>,
    limit: usize,
    size_bound: u64,
) -> Result<Page, QueryError> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let first = after_sequence.map_or(0, |after| after.saturating_add(1));
    let mut page = Page::default();
    if first >= size_bound || !AuditLog::path(audit_dir).exists() {
        return Ok(page);
    }
    let mut accept = |found: Found| -> bool {
        if page.found.len() == limit {
            page.next_after_sequence = page.found.last().map(|last| last.entry.sequence);
            return false;
        }
        page.found.push(found);
        true
    };
    match filter.index() {
        Some(index) => {
            let reader = EntryReader::open(audit_dir)?;
            // Read the postings in slices so the index lock is never held while reading the log.
            let mut next = first;
            'postings: loop {
                let slice = match store.audit_index().read() {
                    Ok(memory) => memory.lookup(&index.prefix(), next, size_bound, 1024),
                    Err(poisoned) => poisoned.into_inner().lookup(&index.prefix(), next, size_bound, 1024),
                };
                let Some(last) = slice.last().map(|(sequence, _)| *sequence) else { break };
                next = last + 1;
                for (sequence, offset) in slice {
                    let (encoded, entry) = reader.read_at(offset)?;
                    if entry.sequence != sequence {
                        return Err(QueryError::IndexMismatch { expected: sequence, found: entry.sequence });
                    }
                    if filter.matches(&entry) && !accept(Found { encoded, entry }) {
                        break 'postings;
                    }
                }
            }
        }
        None => scan(audit_dir, size_bound, |encoded, entry| {
            if entry.sequence < first || !filter.matches(&entry) {
                return Ok(true);
            }
            Ok(accept(Found { encoded, entry }))
        })?,
    }
    Ok(page)
}

/// Reads the first `size_bound` entries of `entries.log` in order, handing each to `visit` until it returns false.
pub fn scan(
    audit_dir: &Path,
    size_bound: u64,
    mut visit: impl FnMut(Vec<u8>, AuditEntry) -> Result<bool, QueryError>,
) -> Result<(), QueryError> {
    let path = AuditLog::path(audit_dir);
    let io = |source| ReadEntryError::Io { path: path.display().to_string(), source };
    let file = std::fs::File::open(&path).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    for _ in 0..size_bound {
        let mut header = [0u8; 8];
        reader.read_exact(&mut header).map_err(io)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > crate::store::log::MAX_RECORD_BYTES {
            return Err(ReadEntryError::Damaged { offset, reason: "impossible record length".to_owned() }.into());
        }
        let mut payload = vec![0u8; len];
        reader.read_exact(&mut payload).map_err(io)?;
        if crc32fast::hash(&payload) != crc {
            return Err(ReadEntryError::Damaged { offset, reason: "checksum mismatch".to_owned() }.into());
        }
        let entry = AuditEntry::decode(&payload).map_err(|reason| ReadEntryError::Damaged { offset, reason })?;
        offset += 8 + len as u64;
        if !visit(payload, entry)? {
            break;
        }
    }
    Ok(())
}

/// One recipient of a child's data: a decision to share, with when the copy was first delivered and acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub decision: Found,
    pub first_delivered_micros: Option<i64>,
    pub acknowledged_micros: Option<i64>,
}

/// Every decision to share this child's data (at most [`MAX_LIMIT`] per page), with delivery and acknowledgement
/// times, among the first `size_bound` entries.
pub fn recipients_of_child(
    store: &Store,
    audit_dir: &Path,
    child: &Pseudonym,
    from_micros: Option<i64>,
    to_micros: Option<i64>,
    size_bound: u64,
) -> Result<Vec<Receipt>, QueryError> {
    let filter = AuditFilter { child: Some(child.clone()), from_micros, to_micros, ..AuditFilter::default() };
    let mut receipts: BTreeMap<(String, String), Receipt> = BTreeMap::new();
    let mut after = None;
    loop {
        let page = search(store, audit_dir, &filter, after, MAX_LIMIT, size_bound)?;
        for found in page.found {
            let key = (found.entry.message_id.clone(), found.entry.recipient.clone());
            let time = found.entry.time_micros;
            match found.entry.event {
                Some(EventType::DecisionToShare) => {
                    receipts.entry(key).or_insert(Receipt {
                        decision: found,
                        first_delivered_micros: None,
                        acknowledged_micros: None,
                    });
                }
                Some(EventType::Delivery | EventType::Redelivery) => {
                    if let Some(receipt) = receipts.get_mut(&key) {
                        receipt.first_delivered_micros.get_or_insert(time);
                    }
                }
                Some(EventType::Acknowledgement) => {
                    if let Some(receipt) = receipts.get_mut(&key) {
                        receipt.acknowledged_micros.get_or_insert(time);
                    }
                }
                _ => {}
            }
        }
        match page.next_after_sequence {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut receipts: Vec<Receipt> = receipts.into_values().collect();
    receipts.sort_by_key(|receipt| receipt.decision.entry.sequence);
    Ok(receipts)
}
