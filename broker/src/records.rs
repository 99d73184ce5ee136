//! What the broker stores about messages and deliveries, and the keys it stores them under.
//!
//! Values are postcard-encoded. Key layout (one sled tree, so that a commit's writes apply atomically). The records
//! are written as `store::Write::PutBlob` and the copies as `store::Write::PutAttached` to their `q/` entries: their
//! bytes stay in the journal and sled holds references to them; only the `q/` heads and `i/` values are held in sled
//! itself.
//!
//! | key | value |
//! |---|---|
//! | `m/<message_id>` | [`MessageRecord`]: sender, time, and the receipt per named recipient |
//! | `i/<sender>/<idempotency key>` | the message id the key was first used for, and the SHA-256 of that message's content ([`idempotency_value`]) |
//! | `d/<delivery_id>` | [`DeliveryRecord`]: state of one recipient's copy, with its tracking events |
//! | `q/<recipient>/<seq, 20 digits>` | while the copy waits for acknowledgement: the delivery id and its pending acknowledgement deadline ([`queue_value`]; what `Store::get` and scans read), with the encoded `pb::Delivery` (the recipient's copy) attached (`Store::get_attachment`); deleted once acknowledged or dead-lettered |
//! | `n/<delivery_id>` | empty: escalation or dead-letter notices are owed for this delivery ([`notice_key`]) |
//! | `c/<delivery_id>` | the copy, for a copy queued by a broker from before attached copies (its `q/` entry has no attachment); deleted with the `q/` entry |
//!
//! Message content is reachable only through `q/` (or `c/`) and only until the recipient has it: transport copies should not
//! live long (DOMAIN.md, retention), while the tracking record and the audit log stay. The bytes themselves stay in
//! the journal until journal compaction exists (ARCHITECTURE.md, known limits).

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{audit::Pseudonym, store::StoreError};

pub fn message_key(message_id: &str) -> Vec<u8> {
    format!("m/{message_id}").into_bytes()
}

pub fn idempotency_key(sender: &str, key: &str) -> Vec<u8> {
    format!("i/{sender}/{key}").into_bytes()
}

pub fn delivery_key(delivery_id: &str) -> Vec<u8> {
    format!("d/{delivery_id}").into_bytes()
}

/// A notice owed for this delivery: written in the same commit as its dead letter or escalation, deleted in the
/// commit that stores the notices, so a broker that stopped in between sends them at its next start.
pub fn notice_key(delivery_id: &str) -> Vec<u8> {
    format!("n/{delivery_id}").into_bytes()
}

pub const NOTICE_PREFIX: &[u8] = b"n/";

pub fn copy_key(delivery_id: &str) -> Vec<u8> {
    format!("c/{delivery_id}").into_bytes()
}

pub fn queue_key(recipient: &str, seq: u64) -> Vec<u8> {
    format!("q/{recipient}/{seq:020}").into_bytes()
}

pub const QUEUE_PREFIX: &[u8] = b"q/";

/// The prefix of one recipient's `q/` keys.
pub fn queue_prefix(recipient: &str) -> Vec<u8> {
    format!("q/{recipient}/").into_bytes()
}

/// Splits a `q/<recipient>/<seq>` key.
pub fn parse_queue_key(key: &[u8]) -> Option<(String, u64)> {
    let text = std::str::from_utf8(key).ok()?.strip_prefix("q/")?;
    let (recipient, seq) = text.rsplit_once('/')?;
    Some((recipient.to_owned(), seq.parse().ok()?))
}

/// The value under a `q/` key: `<delivery id>\n<acknowledgement deadline, microseconds>`, the deadline empty when
/// there is none or it has already escalated. Rebuilding the queues on start then reads `q/` alone rather than every
/// queued copy's delivery record (that read was most of the start-up time with many copies queued).
pub fn queue_value(delivery_id: &str, pending_deadline_micros: Option<i64>) -> Vec<u8> {
    match pending_deadline_micros {
        Some(micros) => format!("{delivery_id}\n{micros}").into_bytes(),
        None => format!("{delivery_id}\n").into_bytes(),
    }
}

/// What a `q/` value says: the delivery id, and the pending deadline if the value says (`None` for a value written
/// before deadlines were kept there, which holds the id alone: read the delivery record). `None` if undecodable.
pub fn parse_queue_value(value: &[u8]) -> Option<(String, Option<Option<i64>>)> {
    let text = std::str::from_utf8(value).ok()?;
    match text.split_once('\n') {
        None => Some((text.to_owned(), None)),
        Some((delivery_id, "")) => Some((delivery_id.to_owned(), Some(None))),
        Some((delivery_id, micros)) => Some((delivery_id.to_owned(), Some(Some(micros.parse().ok()?)))),
    }
}

/// The value under an `i/` key: the message id, then a newline and the hex SHA-256 of the content the key was first
/// used for (see `exchange::content_digest`).
pub fn idempotency_value(message_id: &str, digest: &[u8; 32]) -> Vec<u8> {
    format!("{message_id}\n{}", hex::encode(digest)).into_bytes()
}

/// What an `i/` value says: the message id, and the content digest (`None` for a value an older broker wrote,
/// which holds the id alone, or one that does not parse).
pub fn parse_idempotency_value(value: &[u8]) -> (String, Option<[u8; 32]>) {
    let text = String::from_utf8_lossy(value);
    match text.split_once('\n') {
        Some((message_id, digest)) => {
            let digest = hex::decode(digest).ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
            (message_id.to_owned(), digest)
        }
        None => (text.into_owned(), None),
    }
}

pub fn delivery_id(message_id: &str, recipient: &str) -> String {
    format!("{message_id}.{recipient}")
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|error| StoreError::Decode(error.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Decode(error.to_string()))
}

/// A message as accepted: who sent it and what was decided for each named recipient.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MessageRecord {
    pub message_id: String,
    pub sender: String,
    pub sender_practitioner: String,
    pub sender_role: String,
    pub kind: i32,
    pub accepted_at_micros: i64,
    pub idempotency_key: String,
    pub policy_set_hash: String,
    pub subject: Option<Pseudonym>,
    pub recipients: Vec<RecipientDecision>,
}

/// The decision for one named recipient, as the receipt reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecipientDecision {
    pub recipient: String,
    pub accepted: bool,
    pub reason_code: String,
    pub explanation: String,
    pub rule_ids: Vec<String>,
    pub fields_shared: Vec<String>,
    pub fields_withheld: Vec<String>,
    pub acknowledge_by_micros: Option<i64>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum DeliveryState {
    Queued,
    Delivered,
    Acknowledged,
    DeadLettered,
}

/// One tracking event of a delivery, as `track` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrackEvent {
    pub at_micros: i64,
    pub event: String,
    pub attempt: u32,
    pub detail: String,
}

/// The state of one recipient's copy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub delivery_id: String,
    pub message_id: String,
    pub recipient: String,
    pub sender: String,
    pub seq: u64,
    pub state: DeliveryState,
    pub attempts: u32,
    pub queued_at_micros: i64,
    pub last_delivered_at_micros: Option<i64>,
    pub acknowledged_at_micros: Option<i64>,
    pub acknowledge_by_micros: Option<i64>,
    pub escalated: bool,
    /// Agency to tell, besides the sender, when the acknowledgement deadline passes.
    pub escalate_to: Option<String>,
    pub subject: Option<Pseudonym>,
    pub rule_ids: Vec<String>,
    pub policy_set_hash: String,
    pub events: Vec<TrackEvent>,
}

impl DeliveryRecord {
    pub fn push_event(&mut self, at_micros: i64, event: &str, detail: impl Into<String>) {
        self.events.push(TrackEvent {
            at_micros,
            event: event.to_owned(),
            attempt: self.attempts,
            detail: detail.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keys_sort_by_sequence_and_parse_back() {
        let low = queue_key("luton-csc", 9);
        let high = queue_key("luton-csc", 10);
        assert!(low < high);
        assert_eq!(parse_queue_key(&high), Some(("luton-csc".to_owned(), 10)));
        assert_eq!(parse_queue_key(b"m/abc"), None);
    }

    #[test]
    fn queue_values_carry_the_pending_deadline() {
        let id = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b.luton-csc";
        assert_eq!(parse_queue_value(&queue_value(id, Some(-5))), Some((id.to_owned(), Some(Some(-5)))));
        assert_eq!(
            parse_queue_value(&queue_value(id, Some(1_700_000_000_000_000))),
            Some((id.to_owned(), Some(Some(1_700_000_000_000_000))))
        );
        assert_eq!(parse_queue_value(&queue_value(id, None)), Some((id.to_owned(), Some(None))));
        // Written by an older broker: the id alone, deadline unknown.
        assert_eq!(parse_queue_value(id.as_bytes()), Some((id.to_owned(), None)));
        assert_eq!(parse_queue_value(b"id\nsoon"), None);
    }
}
