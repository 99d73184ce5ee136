//! Sending and tracking: what happens between an agent's `Send` and the copies waiting in recipients' queues.
//!
//! [`Exchange::send`] checks the envelope, answers a repeated idempotency key with the first receipt, asks the
//! policy about each named recipient, builds each permitted recipient's copy from its allowed fields, and commits
//! the decisions (audit entries), the message record and the queued copies in one durable commit before answering.
//! It knows nothing of gRPC: [`crate::transport`] converts its errors to statuses.

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, RwLock},
};

use prost::Message;
use time::OffsetDateTime;

use crate::{
    audit::{Actor, AuditEntry, EventType, Pseudonymiser},
    auth::Caller,
    delivery::{Deliveries, Enqueued, broker_actor},
    policy::{Decision, DecisionRequest, PolicySet},
    records::{self, DeliveryRecord, DeliveryState, MessageRecord, RecipientDecision},
    store::{Commit, Store, StoreError, Write},
};
use proto::pb::{self, envelope::Body};

/// Most recipients one message may name.
pub const MAX_RECIPIENTS: usize = 64;
const IDEMPOTENCY_STRIPES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("`{field}`: {description}")]
    InvalidArgument { field: &'static str, description: String },
    /// No recipient was permitted. The receipt says why for each.
    #[error("the information-sharing policy permits none of the recipients: {summary}")]
    Refused { receipt: Box<pb::SendResponse>, summary: String },
    #[error("no message `{0}` sent by this agency")]
    NotFound(String),
    /// A correction that does not go to every agency the original reached.
    #[error(
        "this message corrects `{original}`, which reached {missing}: a correction must go to every agency that \
         received the original (add them to `recipients`)"
    )]
    CorrectionMissesRecipients { original: String, missing: String },
    /// The recipients' copies together are more than one commit may hold.
    #[error(
        "the copies of this message for its recipients come to more than the {limit} bytes one message may store: \
         send it to fewer recipients at a time, or make it smaller"
    )]
    TooLarge { limit: usize },
    /// The idempotency key was first used for a message with other content.
    #[error(
        "this idempotency key was used for another message (`{message_id}`), with different content: give each \
         message a key of its own (this one was not sent)"
    )]
    KeyReused { message_id: String },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// The shared, swappable policy set: hot reload replaces the `Arc` inside.
pub type CurrentPolicy = Arc<RwLock<Arc<PolicySet>>>;

/// Send and track, over the store, the delivery engine and the current policy set.
#[derive(Clone)]
pub struct Exchange {
    store: Store,
    deliveries: Deliveries,
    policy: CurrentPolicy,
    pseudonymiser: Pseudonymiser,
    /// Serialises sends that share an idempotency key, so two concurrent sends cannot both store a message.
    idempotency_locks: Arc<Vec<Arc<tokio::sync::Mutex<()>>>>,
    /// [`MAX_COPY_BYTES_PER_SEND`], smaller in tests.
    max_copy_bytes: usize,
}

impl Exchange {
    pub fn new(store: Store, deliveries: Deliveries, policy: CurrentPolicy, pseudonymiser: Pseudonymiser) -> Self {
        let idempotency_locks =
            Arc::new((0..IDEMPOTENCY_STRIPES).map(|_| Arc::new(tokio::sync::Mutex::new(()))).collect());
        Self { store, deliveries, policy, pseudonymiser, idempotency_locks, max_copy_bytes: MAX_COPY_BYTES_PER_SEND }
    }

    pub fn policy(&self) -> Arc<PolicySet> {
        match self.policy.read() {
            Ok(policy) => policy.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Decides, stores durably and queues; answers with the receipt.
    pub async fn send(&self, caller: &Caller, mut envelope: pb::Envelope) -> Result<pb::SendResponse, ExchangeError> {
        validate(&envelope)?;
        let key = envelope.idempotency_key.clone();
        // Held until the message's commit has been applied, in the task that commits it: a caller that goes away
        // (its deadline passed while the disk was slow) does not let its retry with the same key decide again while
        // the first commit is still on its way (both would be stored and delivered).
        let guard = if key.is_empty() {
            None
        } else {
            let mut hasher = DefaultHasher::new();
            (&caller.agency, &key).hash(&mut hasher);
            let stripe = (hasher.finish() % IDEMPOTENCY_STRIPES as u64) as usize;
            Some(self.idempotency_locks[stripe].clone().lock_owned().await)
        };
        // Only a send with a key needs it.
        let digest = if key.is_empty() { [0; 32] } else { content_digest(&mut envelope) };
        if !key.is_empty()
            && let Some(value) = self.store.get(&records::idempotency_key(&caller.agency, &key))?
        {
            let (message_id, stored_digest) = records::parse_idempotency_value(&value);
            if stored_digest.is_some_and(|stored| stored != digest) {
                return Err(ExchangeError::KeyReused { message_id });
            }
            let record = self.message_record(&message_id)?.ok_or_else(|| ExchangeError::NotFound(message_id))?;
            // A key an older broker kept for a send refused for every recipient: decided again, as a new broker
            // does for such a send (the new decision's commit writes the key afresh if anyone is accepted).
            if record.recipients.iter().any(|decision| decision.accepted) {
                let mut receipt = receipt_of(&record);
                receipt.duplicate = true;
                return refusal_or(receipt);
            }
        }

        self.check_correction(caller, &envelope)?;
        let policy = self.policy();
        let now = OffsetDateTime::now_utc();
        let now_micros = micros(now);
        let message_id = uuid::Uuid::now_v7().to_string();
        envelope.message_id = message_id.clone();
        let subject = self.pseudonymiser.child(envelope.subject.as_ref());
        let actor = Actor {
            agency: caller.agency.clone(),
            practitioner: caller.practitioner.clone(),
            role: envelope.sender_role.clone(),
        };
        let mut commit = Commit::default();
        let mut decisions = Vec::new();
        let mut enqueued = Vec::new();
        // Encoded once, with its message id: every recipient's decision and copy read these bytes.
        let encoded = envelope.encode_to_vec();
        let mut copy_bytes = 0usize;
        for recipient in &envelope.recipients {
            let request = DecisionRequest {
                sender: &caller.agency,
                sender_practitioner: &caller.practitioner,
                sender_roles: &caller.roles,
                recipient,
                envelope: &envelope,
                encoded_envelope: Some(&encoded),
                now,
            };
            let mut decision = policy.decide(&request);
            let mut copy = None;
            if decision.permitted {
                match policy.build_copy_encoded(&encoded, &decision) {
                    Ok(built) => {
                        // Checked before anything is stored: one send is one journal record, which has a limit.
                        copy_bytes = copy_bytes.saturating_add(built.len());
                        if copy_bytes > self.max_copy_bytes {
                            return Err(ExchangeError::TooLarge { limit: self.max_copy_bytes });
                        }
                        copy = Some(built);
                    }
                    Err(error) => {
                        // Deny on any error while deciding (invariant 1).
                        tracing::error!(error = %error, %recipient, "could not build a recipient copy: refused");
                        decision.permitted = false;
                        decision.explanation = "the broker could not build this recipient's copy".to_owned();
                    }
                }
            }
            let reason_code = if decision.permitted || copy.is_some() {
                decision.reason_code.as_str().to_owned()
            } else if decision.reason_code.as_str() == "permitted" {
                "copy-failed".to_owned()
            } else {
                decision.reason_code.as_str().to_owned()
            };
            let acknowledge_by = decision
                .obligations
                .acknowledge_within
                .as_ref()
                .filter(|_| copy.is_some())
                .map(|deadline| micros(policy.deadline_at(deadline, now)));
            commit.audit.push(decision_entry(
                &actor,
                &subject,
                &message_id,
                recipient,
                &decision,
                &reason_code,
                copy.is_some(),
                now_micros,
            ));
            if decision.override_used.is_some() && copy.is_some() {
                let mut entry =
                    decision_entry(&actor, &subject, &message_id, recipient, &decision, &reason_code, true, now_micros);
                entry.event = Some(EventType::OverrideUsed);
                entry.detail = override_detail(&envelope);
                commit.audit.push(entry);
            }
            if let Some(copy) = copy {
                let delivery_id = records::delivery_id(&message_id, recipient);
                let delivery = pb::Delivery {
                    delivery_id: delivery_id.clone(),
                    message_id: message_id.clone(),
                    attempt: 0,
                    sender_agency: caller.agency.clone(),
                    sender_practitioner: caller.practitioner.clone(),
                    sender_role: envelope.sender_role.clone(),
                    // The copy goes in as it was built, encoded (`NewCopy::envelope`).
                    envelope: None,
                    rule_ids: decision.rule_ids.clone(),
                    lawful_basis: decision.lawful_basis.join(", "),
                    // Never the fields this message held that the copy leaves out: that they exist is often the
                    // sensitive fact itself (that the police recorded exploitation concerns, say). The sender's
                    // receipt and the audit log keep that list.
                    fields_withheld: Vec::new(),
                    obligations: Some(pb::Obligations {
                        acknowledge_within_seconds: acknowledge_by.map_or(0, |by| (by - now_micros) / 1_000_000),
                        retention_class: decision.obligations.retention_class.clone().unwrap_or_default(),
                        onward_disclosure_allowed: decision.obligations.onward_disclosure,
                    }),
                    accepted_at: Some(timestamp(now)),
                    policy_set_hash: policy.hash().to_owned(),
                };
                let copy = NewCopy {
                    recipient: recipient.clone(),
                    sender: caller.agency.clone(),
                    delivery,
                    envelope: copy,
                    acknowledge_by,
                    escalate_to: decision.obligations.escalate_to.clone(),
                    subject: subject.clone(),
                    rule_ids: decision.rule_ids.clone(),
                    policy_set_hash: policy.hash().to_owned(),
                };
                enqueued.push(self.queue_copy(&mut commit, copy, now_micros)?);
            }
            crate::metrics::metrics().message(
                pb::MessageKind::try_from(envelope.kind).map_or("unknown", |kind| kind.as_str_name()),
                decision.permitted,
                &reason_code,
            );
            decisions.push(RecipientDecision {
                recipient: recipient.clone(),
                accepted: decision.permitted,
                reason_code,
                explanation: decision.explanation.clone(),
                rule_ids: decision.rule_ids.clone(),
                fields_shared: if decision.permitted { decision.fields_shared.clone() } else { Vec::new() },
                fields_withheld: if decision.permitted { decision.fields_withheld.clone() } else { Vec::new() },
                acknowledge_by_micros: acknowledge_by,
            });
        }
        let record = MessageRecord {
            message_id: message_id.clone(),
            sender: caller.agency.clone(),
            sender_practitioner: caller.practitioner.clone(),
            sender_role: envelope.sender_role.clone(),
            kind: envelope.kind,
            accepted_at_micros: now_micros,
            idempotency_key: key.clone(),
            policy_set_hash: policy.hash().to_owned(),
            subject,
            recipients: decisions,
        };
        commit.writes.push(Write::PutBlob(records::message_key(&message_id), records::encode(&record)?));
        // A send refused for every recipient is recorded (its decisions are audited, and `track` shows them) but not
        // kept under its key: the call failed, so the same request sent again (once the policy or the envelope is
        // mended) is decided again rather than answered with the old refusal.
        let any_accepted = record.recipients.iter().any(|decision| decision.accepted);
        if !key.is_empty() && any_accepted {
            commit.writes.push(Write::Put(
                records::idempotency_key(&caller.agency, &key),
                records::idempotency_value(&message_id, &digest),
            ));
        }
        self.commit_and_enqueue(commit, enqueued, guard).await?;
        tracing::info!(
            %message_id,
            sender = %caller.agency,
            kind = envelope.kind,
            accepted = record.recipients.iter().filter(|r| r.accepted).count(),
            refused = record.recipients.iter().filter(|r| !r.accepted).count(),
            "message decided"
        );
        refusal_or(receipt_of(&record))
    }

    /// A correction (`corrects`) must name a message this agency sent, and go to every agency that message was
    /// accepted for: each of them holds the data being corrected (DOMAIN.md: tell every recipient when shared data
    /// is corrected). The broker does not add them itself; the sender addresses them, and the policy decides each.
    fn check_correction(&self, caller: &Caller, envelope: &pb::Envelope) -> Result<(), ExchangeError> {
        if envelope.corrects.is_empty() {
            return Ok(());
        }
        let original = match self.message_record(&envelope.corrects)? {
            Some(record) if record.sender == caller.agency => record,
            _ => return Err(ExchangeError::NotFound(envelope.corrects.clone())),
        };
        let missing: Vec<&str> = original
            .recipients
            .iter()
            .filter(|decision| decision.accepted && !envelope.recipients.contains(&decision.recipient))
            .map(|decision| decision.recipient.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(ExchangeError::CorrectionMissesRecipients {
            original: original.message_id,
            missing: missing.iter().map(|agency| format!("`{agency}`")).collect::<Vec<_>>().join(", "),
        })
    }

    /// The state of a message the caller's agency sent, per recipient.
    pub fn track(&self, caller: &Caller, message_id: &str) -> Result<pb::TrackResponse, ExchangeError> {
        let record = match self.message_record(message_id)? {
            Some(record) if record.sender == caller.agency => record,
            _ => return Err(ExchangeError::NotFound(message_id.to_owned())),
        };
        let mut recipients = Vec::new();
        for decision in &record.recipients {
            if !decision.accepted {
                recipients.push(pb::RecipientTrack {
                    recipient: decision.recipient.clone(),
                    state: pb::DeliveryState::Refused as i32,
                    reason_code: decision.reason_code.clone(),
                    ..Default::default()
                });
                continue;
            }
            let delivery_id = records::delivery_id(message_id, &decision.recipient);
            let Some(bytes) = self.store.get(&records::delivery_key(&delivery_id))? else { continue };
            let delivery: DeliveryRecord = records::decode(&bytes)?;
            recipients.push(pb::RecipientTrack {
                recipient: delivery.recipient.clone(),
                state: match delivery.state {
                    DeliveryState::Queued => pb::DeliveryState::Queued,
                    DeliveryState::Delivered => pb::DeliveryState::Delivered,
                    DeliveryState::Acknowledged => pb::DeliveryState::Acknowledged,
                    DeliveryState::DeadLettered => pb::DeliveryState::DeadLettered,
                } as i32,
                attempts: delivery.attempts,
                queued_at: Some(timestamp_micros(delivery.queued_at_micros)),
                last_delivered_at: delivery.last_delivered_at_micros.map(timestamp_micros),
                acknowledged_at: delivery.acknowledged_at_micros.map(timestamp_micros),
                acknowledge_by: delivery.acknowledge_by_micros.map(timestamp_micros),
                escalated: delivery.escalated,
                reason_code: decision.reason_code.clone(),
                events: delivery
                    .events
                    .iter()
                    .map(|event| pb::TrackEvent {
                        at: Some(timestamp_micros(event.at_micros)),
                        event: event.event.clone(),
                        attempt: event.attempt,
                        detail: event.detail.clone(),
                    })
                    .collect(),
            });
        }
        Ok(pb::TrackResponse {
            message_id: record.message_id.clone(),
            accepted_at: Some(timestamp_micros(record.accepted_at_micros)),
            recipients,
        })
    }

    /// Tells the sender of a copy whose acknowledgement deadline passed (and the agency the rule names for
    /// escalation) with a broker-written escalation notice. The notice names the message and the recipient, never
    /// the child or the content, so it needs no sharing decision; it is audited like any other share.
    pub async fn send_escalation_notices(&self, late: DeliveryRecord) -> Result<(), ExchangeError> {
        let dead_lettered = matches!(late.state, records::DeliveryState::DeadLettered);
        let (reason, reason_code, explanation) = if dead_lettered {
            (
                pb::EscalationReason::DeadLettered,
                "dead-letter-notice",
                format!(
                    "{} could not take message {}: the broker gave it up after {} delivery attempts, so {} will not \
                     receive it through the broker; contact them by other means",
                    late.recipient, late.message_id, late.attempts, late.recipient
                ),
            )
        } else {
            (
                pb::EscalationReason::DeadlinePassed,
                "escalation-notice",
                format!("{} has not acknowledged message {} by its deadline", late.recipient, late.message_id),
            )
        };
        let policy = self.policy();
        let now = OffsetDateTime::now_utc();
        let now_micros = micros(now);
        let mut targets = vec![late.sender.clone()];
        if let Some(escalate_to) = &late.escalate_to
            && !targets.contains(escalate_to)
        {
            targets.push(escalate_to.clone());
        }
        let message_id = uuid::Uuid::now_v7().to_string();
        let envelope = pb::Envelope {
            message_id: message_id.clone(),
            kind: pb::MessageKind::EscalationNotice as i32,
            purpose: "escalation".to_owned(),
            urgency: pb::Urgency::Immediate as i32,
            recipients: targets.clone(),
            correlation_id: late.message_id.clone(),
            created_at: Some(timestamp(now)),
            body: Some(Body::Escalation(pb::Escalation {
                message_id: late.message_id.clone(),
                recipient: late.recipient.clone(),
                deadline: late.acknowledge_by_micros.map(timestamp_micros),
                rule_id: late.rule_ids.join(","),
                explanation,
                reason: reason as i32,
            })),
            ..Default::default()
        };
        let encoded = envelope.encode_to_vec();
        let mut commit = Commit::default();
        let mut enqueued = Vec::new();
        let mut decisions = Vec::new();
        for target in &targets {
            let delivery_id = records::delivery_id(&message_id, target);
            let delivery = pb::Delivery {
                delivery_id: delivery_id.clone(),
                message_id: message_id.clone(),
                sender_agency: "broker".to_owned(),
                rule_ids: vec!["broker-escalation-notice".to_owned()],
                accepted_at: Some(timestamp(now)),
                policy_set_hash: policy.hash().to_owned(),
                ..Default::default()
            };
            commit.audit.push(AuditEntry {
                time_micros: now_micros,
                event: Some(EventType::DecisionToShare),
                actor: broker_actor(),
                subject: late.subject.clone(),
                message_id: message_id.clone(),
                recipient: target.clone(),
                rule_ids: vec!["broker-escalation-notice".to_owned()],
                reason_code: reason_code.to_owned(),
                policy_set_hash: policy.hash().to_owned(),
                detail: if dead_lettered {
                    format!("reports the dead letter {}", late.delivery_id)
                } else {
                    format!("escalates {}", late.delivery_id)
                },
                ..AuditEntry::default()
            });
            let copy = NewCopy {
                recipient: target.clone(),
                sender: "broker".to_owned(),
                delivery,
                envelope: encoded.clone(),
                acknowledge_by: None,
                escalate_to: None,
                subject: None,
                rule_ids: vec!["broker-escalation-notice".to_owned()],
                policy_set_hash: policy.hash().to_owned(),
            };
            enqueued.push(self.queue_copy(&mut commit, copy, now_micros)?);
            decisions.push(RecipientDecision {
                recipient: target.clone(),
                accepted: true,
                reason_code: reason_code.to_owned(),
                explanation: if dead_lettered { "dead-lettered" } else { "acknowledgement deadline passed" }.to_owned(),
                rule_ids: vec!["broker-escalation-notice".to_owned()],
                fields_shared: Vec::new(),
                fields_withheld: Vec::new(),
                acknowledge_by_micros: None,
            });
        }
        let record = MessageRecord {
            message_id: message_id.clone(),
            sender: "broker".to_owned(),
            sender_practitioner: String::new(),
            sender_role: String::new(),
            kind: pb::MessageKind::EscalationNotice as i32,
            accepted_at_micros: now_micros,
            idempotency_key: String::new(),
            policy_set_hash: policy.hash().to_owned(),
            subject: late.subject.clone(),
            recipients: decisions,
        };
        commit.writes.push(Write::PutBlob(records::message_key(&message_id), records::encode(&record)?));
        // No longer owed once this commit is durable.
        commit.writes.push(Write::Delete(records::notice_key(&late.delivery_id)));
        self.commit_and_enqueue(commit, enqueued, None).await?;
        Ok(())
    }

    /// The deliveries whose escalation or dead-letter notices are owed (recorded, but the broker stopped before it
    /// stored the notices): the start sends them.
    pub fn notices_owed(&self) -> Result<Vec<DeliveryRecord>, ExchangeError> {
        let mut owed = Vec::new();
        for item in self.store.scan_prefix(records::NOTICE_PREFIX) {
            let (key, _) = item?;
            let Some(delivery_id) = key.strip_prefix(records::NOTICE_PREFIX) else { continue };
            let delivery_id = String::from_utf8_lossy(delivery_id);
            match self.store.get(&records::delivery_key(&delivery_id))? {
                Some(bytes) => owed.push(records::decode(&bytes)?),
                None => tracing::warn!(%delivery_id, "a notice is owed for a delivery with no record: skipped"),
            }
        }
        Ok(owed)
    }

    /// [`Self::send_escalation_notices`], retried after a failure (a full disk may clear), from `wait` doubling up to a
    /// minute, while the broker runs: the escalation or dead letter they report is already durable, so only a stop
    /// before they are stored loses them (ARCHITECTURE.md).
    pub async fn notify_until_stored(&self, late: DeliveryRecord, mut wait: std::time::Duration) {
        loop {
            match self.send_escalation_notices(late.clone()).await {
                Ok(()) => return,
                Err(ExchangeError::Store(error @ (StoreError::Stopped | StoreError::NeedsRestart))) => {
                    tracing::error!(error = %error, delivery_id = %late.delivery_id, "escalation notices not queued: the broker is stopping");
                    return;
                }
                Err(error) => {
                    tracing::error!(error = %error, delivery_id = %late.delivery_id, retry_in_millis = wait.as_millis() as u64, "could not queue escalation notices; will retry");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(60));
                }
            }
        }
    }

    /// Makes the commit durable, then hands its copies to their recipients' actors, in a task of its own: a caller
    /// that goes away meanwhile (the client cancels the call, or its deadline passes) cannot stop the copies of a
    /// durable commit from reaching their actors (they would wait for a restart, some recorded as delivered).
    /// `idempotency` (the send's idempotency key's lock) is held by that task until the commit is applied, so a retry
    /// with the same key finds it.
    async fn commit_and_enqueue(
        &self,
        commit: Commit,
        enqueued: Vec<Enqueued>,
        idempotency: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<(), ExchangeError> {
        let (store, deliveries) = (self.store.clone(), self.deliveries.clone());
        let committed = tokio::spawn(async move {
            let committed = store.commit(commit).await;
            drop(idempotency);
            committed?;
            for entry in enqueued {
                deliveries.enqueued(entry);
            }
            Ok::<_, StoreError>(())
        });
        match committed.await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Stopped.into()),
        }
    }

    /// Adds a queued copy's record, content and queue entry to `commit`. While the recipient's agent is connected
    /// and its queue idle, the copy's first delivery attempt (its record and audit entry) goes in the same commit, and
    /// the copy to the agent as soon as the commit is durable ([`crate::delivery::Deliveries::reserve_direct`]).
    fn queue_copy(&self, commit: &mut Commit, copy: NewCopy, now_micros: i64) -> Result<Enqueued, ExchangeError> {
        let delivery_id = copy.delivery.delivery_id.clone();
        let seq = self.deliveries.next_seq();
        let mut record = DeliveryRecord {
            delivery_id: delivery_id.clone(),
            message_id: copy.delivery.message_id.clone(),
            recipient: copy.recipient.clone(),
            sender: copy.sender,
            seq,
            state: DeliveryState::Queued,
            attempts: 0,
            queued_at_micros: now_micros,
            last_delivered_at_micros: None,
            acknowledged_at_micros: None,
            acknowledge_by_micros: copy.acknowledge_by,
            escalated: false,
            escalate_to: copy.escalate_to,
            subject: copy.subject,
            rule_ids: copy.rule_ids,
            policy_set_hash: copy.policy_set_hash,
            events: vec![records::TrackEvent {
                at_micros: now_micros,
                event: "queued".to_owned(),
                attempt: 0,
                detail: String::new(),
            }],
        };
        let encoded = encode_delivery(copy.delivery, &copy.envelope);
        let recorded = if self.deliveries.reserve_direct(&copy.recipient) {
            commit.audit.push(crate::delivery::record_attempt(&mut record, now_micros));
            Some(encoded.clone())
        } else {
            None
        };
        commit.writes.push(Write::PutBlob(records::delivery_key(&delivery_id), records::encode(&record)?));
        // The queue entry holds the copy as its attachment: one key in the index for both.
        commit.writes.push(Write::PutAttached(
            records::queue_key(&copy.recipient, seq),
            records::queue_value(&delivery_id, copy.acknowledge_by),
            encoded,
        ));
        Ok(Enqueued {
            recipient: copy.recipient,
            seq,
            delivery_id,
            acknowledge_by_micros: copy.acknowledge_by,
            recorded,
        })
    }

    fn message_record(&self, message_id: &str) -> Result<Option<MessageRecord>, ExchangeError> {
        match self.store.get(&records::message_key(message_id))? {
            Some(bytes) => Ok(Some(records::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

/// A recipient's copy about to be queued.
struct NewCopy {
    recipient: String,
    sender: String,
    /// The delivery without its envelope, which is `envelope`.
    delivery: pb::Delivery,
    /// The recipient's copy of the envelope, encoded.
    envelope: Vec<u8>,
    acknowledge_by: Option<i64>,
    escalate_to: Option<String>,
    subject: Option<crate::audit::Pseudonym>,
    rule_ids: Vec<String>,
    policy_set_hash: String,
}

/// Encodes `delivery` with `envelope` (an encoded `pb::Envelope`) as its envelope field, without decoding it: the
/// bytes prost gives for `delivery` with the decoded envelope set (fields in number order), so a copy is built once,
/// as bytes, and stored as it is. `delivery.envelope` is ignored.
fn encode_delivery(mut delivery: pb::Delivery, envelope: &[u8]) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    const ENVELOPE_FIELD: u32 = 7;
    delivery.envelope = None;
    // Fields 1-6 from `delivery`, 8-13 from `after`.
    let after = pb::Delivery {
        rule_ids: std::mem::take(&mut delivery.rule_ids),
        lawful_basis: std::mem::take(&mut delivery.lawful_basis),
        fields_withheld: std::mem::take(&mut delivery.fields_withheld),
        obligations: delivery.obligations.take(),
        accepted_at: delivery.accepted_at.take(),
        policy_set_hash: std::mem::take(&mut delivery.policy_set_hash),
        ..Default::default()
    };
    let mut bytes = Vec::with_capacity(
        delivery.encoded_len() + 1 + encoded_len_varint(envelope.len() as u64) + envelope.len() + after.encoded_len(),
    );
    delivery.encode_raw(&mut bytes);
    encode_key(ENVELOPE_FIELD, WireType::LengthDelimited, &mut bytes);
    encode_varint(envelope.len() as u64, &mut bytes);
    bytes.extend_from_slice(envelope);
    after.encode_raw(&mut bytes);
    bytes
}

#[allow(clippy::too_many_arguments)]
fn decision_entry(
    actor: &Actor,
    subject: &Option<crate::audit::Pseudonym>,
    message_id: &str,
    recipient: &str,
    decision: &Decision,
    reason_code: &str,
    shared: bool,
    now_micros: i64,
) -> AuditEntry {
    AuditEntry {
        time_micros: now_micros,
        event: Some(if shared { EventType::DecisionToShare } else { EventType::DecisionNotToShare }),
        actor: actor.clone(),
        subject: subject.clone(),
        message_id: message_id.to_owned(),
        recipient: recipient.to_owned(),
        rule_ids: decision.rule_ids.clone(),
        lawful_basis: decision.lawful_basis.clone(),
        reason_code: reason_code.to_owned(),
        fields_shared: if shared { decision.fields_shared.clone() } else { Vec::new() },
        fields_withheld: decision.fields_withheld.clone(),
        policy_set_hash: decision.policy_set_hash.clone(),
        ..AuditEntry::default()
    }
}

/// The override's reason code and who authorised it; the free-text justification stays in the message.
fn override_detail(envelope: &pb::Envelope) -> String {
    let Some(agreement) = &envelope.agreement else { return String::new() };
    let reason = pb::OverrideReason::try_from(agreement.override_reason)
        .map(|reason| reason.as_str_name().to_owned())
        .unwrap_or_default();
    let state =
        pb::AgreementState::try_from(agreement.state).map(|state| state.as_str_name().to_owned()).unwrap_or_default();
    format!("state={state} reason={reason} authorised_by={}", agreement.authorised_by)
}

pub(crate) fn refusal_or(receipt: pb::SendResponse) -> Result<pb::SendResponse, ExchangeError> {
    let any_accepted = receipt.recipients.iter().any(|r| r.outcome == pb::RecipientOutcome::Accepted as i32);
    if any_accepted {
        return Ok(receipt);
    }
    // The first few in the message (a header); the error's metadata and `track` say more.
    const SUMMARISED: usize = 8;
    let mut summary = receipt
        .recipients
        .iter()
        .take(SUMMARISED)
        .map(|r| format!("{}: {}", r.recipient, r.reason_code))
        .collect::<Vec<_>>()
        .join("; ");
    if receipt.recipients.len() > SUMMARISED {
        summary.push_str(&format!("; and {} more", receipt.recipients.len() - SUMMARISED));
    }
    Err(ExchangeError::Refused { receipt: Box::new(receipt), summary })
}

fn receipt_of(record: &MessageRecord) -> pb::SendResponse {
    pb::SendResponse {
        message_id: record.message_id.clone(),
        duplicate: false,
        recipients: record
            .recipients
            .iter()
            .map(|decision| pb::RecipientReceipt {
                recipient: decision.recipient.clone(),
                outcome: if decision.accepted { pb::RecipientOutcome::Accepted } else { pb::RecipientOutcome::Refused }
                    as i32,
                reason_code: decision.reason_code.clone(),
                explanation: decision.explanation.clone(),
                rule_ids: decision.rule_ids.clone(),
                fields_shared: decision.fields_shared.clone(),
                fields_withheld: decision.fields_withheld.clone(),
                acknowledge_by: decision.acknowledge_by_micros.map(timestamp_micros),
            })
            .collect(),
        policy_set_hash: record.policy_set_hash.clone(),
        accepted_at: Some(timestamp_micros(record.accepted_at_micros)),
    }
}

/// The body each kind must carry.
pub fn kind_matches_body(kind: pb::MessageKind, body: &Body) -> bool {
    use pb::MessageKind as K;
    matches!(
        (kind, body),
        (K::Referral, Body::Referral(_))
            | (K::DomesticAbuseNotification, Body::DomesticAbuseIncident(_))
            | (K::PublicProtectionNotice, Body::PublicProtectionNotice(_))
            | (K::ReferralAcknowledgement | K::OutcomeFeedback, Body::ReferralOutcome(_))
            | (K::InformationRequest, Body::InformationRequest(_))
            | (K::InformationResponse, Body::InformationResponse(_))
            | (K::StrategyDiscussion | K::Conference | K::FamilyNetworkMeeting, Body::Meeting(_))
            | (K::PlanStatusNotification, Body::PlanStatus(_))
            | (K::UnscheduledCareAttendance | K::EmergencyAttendance, Body::CareAttendance(_))
            | (K::FamilyHelpRequest, Body::FamilyHelpRequest(_))
            | (K::MissingEpisode, Body::MissingEpisode(_))
            | (K::RecordTransfer, Body::RecordTransfer(_))
            | (K::CaseClosure, Body::CaseClosure(_))
    )
}

/// Checks what the broker itself needs of an envelope; the policy decides the rest.
pub fn validate(envelope: &pb::Envelope) -> Result<(), ExchangeError> {
    let invalid = |field: &'static str, description: &str| ExchangeError::InvalidArgument {
        field,
        description: description.to_owned(),
    };
    let kind = pb::MessageKind::try_from(envelope.kind)
        .map_err(|_| invalid("envelope.kind", "is not a known message kind"))?;
    if kind == pb::MessageKind::Unspecified {
        return Err(invalid("envelope.kind", "is required"));
    }
    if kind == pb::MessageKind::EscalationNotice {
        return Err(invalid("envelope.kind", "escalation notices are written by the broker only"));
    }
    let body =
        envelope.body.as_ref().ok_or_else(|| invalid("envelope.body", "is required: set the body for the kind"))?;
    if !kind_matches_body(kind, body) {
        return Err(invalid("envelope.body", &format!("does not match kind `{}`", kind.as_str_name())));
    }
    if envelope.purpose.trim().is_empty() {
        return Err(invalid("envelope.purpose", "is required: name a purpose declared in the policy set"));
    }
    if pb::Urgency::try_from(envelope.urgency).is_err() {
        return Err(invalid("envelope.urgency", "is not a known urgency"));
    }
    if envelope.recipients.is_empty() {
        return Err(invalid("envelope.recipients", "name at least one recipient agency"));
    }
    if envelope.recipients.len() > MAX_RECIPIENTS {
        return Err(invalid("envelope.recipients", &format!("name at most {MAX_RECIPIENTS} recipients")));
    }
    let mut seen = HashSet::new();
    for recipient in &envelope.recipients {
        if !crate::pki::is_valid_agency_id(recipient) {
            return Err(invalid("envelope.recipients", &format!("`{}` is not an agency id", truncate(recipient))));
        }
        if !seen.insert(recipient) {
            return Err(invalid("envelope.recipients", &format!("`{recipient}` is named twice")));
        }
    }
    if envelope.idempotency_key.len() > 200 || envelope.idempotency_key.chars().any(|c| c.is_control()) {
        return Err(invalid("envelope.idempotency_key", "must be at most 200 printable characters"));
    }
    // Codes reach every recipient whatever the policy withholds, and are quoted in decisions' explanations: codes,
    // not free text (a name or a case note written here would pass every field mask).
    // (`purpose` is required above; the roles may be empty.)
    for (field, value) in [
        ("envelope.purpose", &envelope.purpose),
        ("envelope.sender_role", &envelope.sender_role),
        ("envelope.recipient_role", &envelope.recipient_role),
    ] {
        if value.len() > 64 || !value.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte)) {
            return Err(invalid(field, "must be a code of 1 to 64 letters, digits, `.`, `_`, `:` or `-`"));
        }
    }
    for (field, value) in
        [("envelope.correlation_id", &envelope.correlation_id), ("envelope.corrects", &envelope.corrects)]
    {
        if !value.is_empty() && uuid::Uuid::try_parse(value).is_err() {
            return Err(invalid(field, "must be a message id the broker gave (a UUID)"));
        }
    }
    if let Some(agreement) = &envelope.agreement {
        if pb::AgreementState::try_from(agreement.state).is_err() {
            return Err(invalid("envelope.agreement.state", "is not a known agreement state"));
        }
        if pb::OverrideReason::try_from(agreement.override_reason).is_err() {
            return Err(invalid("envelope.agreement.override_reason", "is not a known override reason"));
        }
        // Recorded in the audit log when an override is used: an identifier, never a name or free text.
        let authorised_by = &agreement.authorised_by;
        if authorised_by.len() > 128 || authorised_by.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(invalid(
                "envelope.agreement.authorised_by",
                "must be the practitioner's identifier (their token's subject): at most 128 characters, no spaces",
            ));
        }
    }
    if let Some(date) = envelope.subject.as_ref().and_then(|child| child.date_of_birth.as_ref()) {
        let month = u8::try_from(date.month).ok().and_then(|month| time::Month::try_from(month).ok());
        let day = u8::try_from(date.day).ok();
        let valid = matches!((month, day), (Some(month), Some(day))
            if time::Date::from_calendar_date(date.year, month, day).is_ok());
        if !valid {
            return Err(invalid("envelope.subject.date_of_birth", "is not a valid calendar date"));
        }
        // A typing slip such as year 0 or 1 would otherwise give an age in the hundreds, which a rule with only a
        // minimum age would accept.
        if date.year < 1900 {
            return Err(invalid("envelope.subject.date_of_birth", "is before 1900"));
        }
    }
    check_timestamps(envelope)
}

/// Refuses a timestamp outside what protobuf's JSON mapping (RFC 3339, years 0001 to 9999) can write, or with
/// nanoseconds out of range. Such a message was accepted, and then every recipient's agent failed to write its copy
/// as JSON and negatively acknowledged it until it was dead-lettered (milliseconds put in `seconds`, say).
fn check_timestamps(envelope: &pb::Envelope) -> Result<(), ExchangeError> {
    use pb::envelope::Body;
    let mut found: Vec<(&'static str, Option<&prost_types::Timestamp>)> = vec![
        ("envelope.created_at", envelope.created_at.as_ref()),
        (
            "envelope.agreement.agreed_at",
            envelope.agreement.as_ref().and_then(|agreement| agreement.agreed_at.as_ref()),
        ),
    ];
    match &envelope.body {
        Some(Body::DomesticAbuseIncident(incident)) => {
            found.push(("envelope.domestic_abuse_incident.occurred_at", incident.occurred_at.as_ref()));
        }
        Some(Body::PublicProtectionNotice(notice)) => {
            found.push(("envelope.public_protection_notice.occurred_at", notice.occurred_at.as_ref()));
        }
        Some(Body::ReferralOutcome(outcome)) => {
            found.push(("envelope.referral_outcome.received_at", outcome.received_at.as_ref()));
        }
        Some(Body::InformationRequest(request)) => {
            found.push(("envelope.information_request.respond_by", request.respond_by.as_ref()));
        }
        Some(Body::Meeting(meeting)) => found.push(("envelope.meeting.starts_at", meeting.starts_at.as_ref())),
        Some(Body::CareAttendance(attendance)) => {
            found.push(("envelope.care_attendance.attended_at", attendance.attended_at.as_ref()));
        }
        Some(Body::MissingEpisode(episode)) => {
            found.push(("envelope.missing_episode.missing_since", episode.missing_since.as_ref()));
            found.push(("envelope.missing_episode.found_at", episode.found_at.as_ref()));
        }
        Some(Body::Escalation(escalation)) => {
            found.push(("envelope.escalation.deadline", escalation.deadline.as_ref()))
        }
        _ => {}
    }
    for (field, timestamp) in found {
        if let Some(timestamp) = timestamp
            && (!(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&timestamp.seconds)
                || !(0..1_000_000_000).contains(&timestamp.nanos))
        {
            return Err(ExchangeError::InvalidArgument {
                field,
                description: "is not a time between the years 1 and 9999 (seconds since 1970, and nanoseconds from 0 \
                              to 999,999,999)"
                    .to_owned(),
            });
        }
    }
    Ok(())
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of protobuf's `Timestamp` in JSON.
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// The most bytes the recipients' copies of one send may come to: a send is stored as one journal record
/// ([`crate::store::log::MAX_RECORD_BYTES`], 256 MiB), with its records and audit entries beside the copies.
const MAX_COPY_BYTES_PER_SEND: usize = 192 * 1024 * 1024;

/// What an idempotency key is checked against when used again: the SHA-256 of the envelope as sent, without its
/// `created_at` (a client may stamp each retry afresh) and `message_id` (the broker's).
/// The two are taken out for the encoding and put back (no copy of the envelope).
fn content_digest(envelope: &mut pb::Envelope) -> [u8; 32] {
    use sha2::Digest;
    let created_at = envelope.created_at.take();
    let message_id = std::mem::take(&mut envelope.message_id);
    let digest = sha2::Sha256::digest(envelope.encode_to_vec()).into();
    envelope.created_at = created_at;
    envelope.message_id = message_id;
    digest
}

fn truncate(text: &str) -> String {
    text.chars().take(40).collect()
}

pub fn micros(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1000) as i64
}

pub fn timestamp(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.unix_timestamp(), nanos: at.nanosecond() as i32 }
}

pub fn timestamp_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use tokio::sync::watch;

    use super::*;
    use crate::{audit::AuditLog, delivery::DeliveryConfig};

    fn example(name: &str) -> pb::Envelope {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(name);
        let bytes = std::fs::read(path).unwrap();
        let pool = proto::descriptor_pool().unwrap();
        let descriptor = pool.get_message_by_name(proto::ENVELOPE_MESSAGE).unwrap();
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let message = prost_reflect::DynamicMessage::deserialize(descriptor, &mut deserializer).unwrap();
        message.transcode_to::<pb::Envelope>().unwrap()
    }

    /// A store in a temporary folder, a delivery engine and an exchange over it with the sample policies.
    struct Area {
        dir: tempfile::TempDir,
        _stop: watch::Sender<bool>,
        store: Store,
        deliveries: Deliveries,
        exchange: Exchange,
    }

    fn area() -> Area {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, _) = Store::open(dir.path(), audit, crate::store::StoreOptions::for_tests()).unwrap();
        let policy_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let policy = Arc::new(RwLock::new(Arc::new(PolicySet::load_dir(&policy_dir).unwrap())));
        let (stop, stopping) = watch::channel(false);
        let deliveries = Deliveries::start(store.clone(), DeliveryConfig::default(), stopping).unwrap();
        let pseudonymiser = Pseudonymiser::load_or_create(&dir.path().join("keys")).unwrap();
        let exchange = Exchange::new(store.clone(), deliveries.clone(), policy, pseudonymiser);
        Area { dir, _stop: stop, store, deliveries, exchange }
    }

    /// An unacknowledged Operation Encompass notification escalates when its deadline passes: the escalation is
    /// recorded, and the sender and the rule's escalation agency each get a notice. The policy's real deadline
    /// ("before the next school day") is hours away, so the test brings the stored deadline forward to 300 ms.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unacknowledged_copy_escalates_to_the_sender_and_the_named_agency() {
        let Area { dir, _stop, store, deliveries, exchange } = area();
        let (late_sender, mut late) = tokio::sync::mpsc::unbounded_channel();
        deliveries.set_escalation_hook(Arc::new(move |record| {
            let _ = late_sender.send(record);
        }));

        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let receipt = exchange.send(&police, example("operation-encompass-notification.json")).await.unwrap();
        assert!(receipt.recipients[0].acknowledge_by.is_some(), "F1 carries an acknowledgement deadline");
        let delivery_id = records::delivery_id(&receipt.message_id, "luton-oakwood-primary");
        let mut stored: DeliveryRecord =
            records::decode(&store.get(&records::delivery_key(&delivery_id)).unwrap().unwrap()).unwrap();
        let soon = AuditEntry::now_micros() + 300_000;
        stored.acknowledge_by_micros = Some(soon);
        let write = Write::PutBlob(records::delivery_key(&delivery_id), records::encode(&stored).unwrap());
        store.commit(Commit { audit: Vec::new(), writes: vec![write] }).await.unwrap();
        deliveries.enqueued(Enqueued {
            recipient: stored.recipient.clone(),
            seq: stored.seq,
            delivery_id: delivery_id.clone(),
            acknowledge_by_micros: Some(soon),
            recorded: None,
        });

        let record = tokio::time::timeout(Duration::from_secs(10), late.recv()).await.unwrap().unwrap();
        assert_eq!(record.message_id, receipt.message_id);
        assert!(record.escalated);
        assert_eq!(record.escalate_to.as_deref(), Some("luton-csc"));
        assert!(store.get(&records::notice_key(&delivery_id)).unwrap().is_some(), "notices owed with the escalation");
        exchange.send_escalation_notices(record).await.unwrap();
        assert!(store.get(&records::notice_key(&delivery_id)).unwrap().is_none(), "and not once they are stored");

        for agency in ["beds-police", "luton-csc"] {
            let mut stream = deliveries.subscribe(agency);
            let notice = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
            let envelope = notice.envelope.unwrap();
            assert_eq!(envelope.kind, pb::MessageKind::EscalationNotice as i32);
            assert_eq!(envelope.correlation_id, receipt.message_id);
            assert!(envelope.subject.is_none(), "an escalation notice never names the child");
        }
        let track = exchange.track(&police, &receipt.message_id).unwrap();
        assert!(track.recipients[0].escalated);
        assert!(track.recipients[0].events.iter().any(|event| event.event == "escalated"));
        // The queue entry forgets the deadline, so rebuilding the queues after a restart does not escalate again.
        let queued = store
            .scan_prefix(records::QUEUE_PREFIX)
            .map(|item| records::parse_queue_value(&item.unwrap().1).unwrap())
            .find(|(id, _)| *id == delivery_id)
            .unwrap();
        assert_eq!(queued.1, Some(None));
        // And keeps its copy, for when the school's agent connects.
        let copy = store.get_attachment(&records::queue_key("luton-oakwood-primary", stored.seq)).unwrap().unwrap();
        assert_eq!(pb::Delivery::decode(copy.as_slice()).unwrap().delivery_id, delivery_id);
        deliveries.shutdown().await;
        store.close();
        let mut escalations = 0;
        crate::store::log::read_all(&AuditLog::path(&dir.path().join("audit")), |_, bytes| {
            if AuditEntry::decode(bytes).unwrap().event == Some(EventType::Escalation) {
                escalations += 1;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(escalations, 1);
    }

    /// A send whose caller goes away while its commit waits (a stalled disk; the client's deadline passed) keeps its
    /// idempotency key's lock until that commit is applied: the client's retry with the same key waits for it and
    /// is answered with the first message's receipt, so the message is stored, and delivered, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    // The guard is held across awaits on purpose: it is what holds the committer thread (a std thread) back.
    #[allow(clippy::await_holding_lock)]
    async fn a_retry_while_a_cancelled_send_still_commits_gets_its_receipt() {
        let Area { dir: _dir, _stop, store, deliveries: _deliveries, exchange } = area();
        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let mut envelope = example("operation-encompass-notification.json");
        envelope.idempotency_key = "stalled-disk".into();
        let send = |exchange: &Exchange| {
            let (exchange, police, envelope) = (exchange.clone(), police.clone(), envelope.clone());
            tokio::spawn(async move { exchange.send(&police, envelope).await })
        };
        let paused = store.pause_commits();
        let first = send(&exchange);
        tokio::time::sleep(Duration::from_millis(300)).await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled(), "the caller went away while the commit waited");
        let retry = send(&exchange);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!retry.is_finished(), "the retry waits for the first send's commit");
        drop(paused);
        let receipt = tokio::time::timeout(Duration::from_secs(10), retry).await.unwrap().unwrap().unwrap();
        assert!(receipt.duplicate, "answered with the first message's receipt");
        assert_eq!(store.scan_prefix(b"m/").count(), 1, "one message stored");
    }

    /// The police's Operation Encompass notification sent, and its school copy's record as it would be dead-lettered.
    async fn dead_lettered_send(exchange: &Exchange, store: &Store) -> (pb::SendResponse, String, DeliveryRecord) {
        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let receipt = exchange.send(&police, example("operation-encompass-notification.json")).await.unwrap();
        let delivery_id = records::delivery_id(&receipt.message_id, "luton-oakwood-primary");
        let mut late: DeliveryRecord =
            records::decode(&store.get(&records::delivery_key(&delivery_id)).unwrap().unwrap()).unwrap();
        late.state = DeliveryState::DeadLettered;
        (receipt, delivery_id, late)
    }

    /// A notice owed (its dead letter recorded, the broker stopped before storing the notice) is found and sent, and
    /// is owed no more once the notice is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notices_owed_from_before_a_restart_are_sent_once() {
        let Area { dir: _dir, _stop, store, deliveries, exchange } = area();
        let (receipt, delivery_id, late) = dead_lettered_send(&exchange, &store).await;
        let writes = vec![
            Write::PutBlob(records::delivery_key(&delivery_id), records::encode(&late).unwrap()),
            Write::Put(records::notice_key(&delivery_id), Vec::new()),
        ];
        store.commit(Commit { audit: Vec::new(), writes }).await.unwrap();
        let owed = exchange.notices_owed().unwrap();
        assert_eq!(owed.iter().map(|record| record.delivery_id.as_str()).collect::<Vec<_>>(), [delivery_id.as_str()]);
        exchange.notify_until_stored(owed[0].clone(), Duration::from_millis(50)).await;
        assert!(exchange.notices_owed().unwrap().is_empty(), "owed no more");
        let mut stream = deliveries.subscribe("beds-police");
        let notice = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(notice.envelope.unwrap().correlation_id, receipt.message_id);
    }

    /// Escalation notices whose commit fails (a full disk) are tried again until they are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn escalation_notices_are_retried_until_stored() {
        let Area { dir: _dir, _stop, store, deliveries, exchange } = area();
        let (_, _, late) = dead_lettered_send(&exchange, &store).await;
        store.fail_next_journal_write();
        exchange.notify_until_stored(late, Duration::from_millis(50)).await;
        let mut stream = deliveries.subscribe("beds-police");
        let notice = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
        let Some(pb::envelope::Body::Escalation(escalation)) = notice.envelope.unwrap().body else {
            panic!("a notice")
        };
        assert_eq!(escalation.reason, pb::EscalationReason::DeadLettered as i32);
    }

    /// A send to a recipient whose agent is connected and idle records the copy's first delivery in the send's own
    /// commit: the copy reaches the stream as attempt 1, the record says delivered, and one delivery entry is
    /// audited, in the same commit as the decision.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_to_an_idle_connected_recipient_records_its_delivery() {
        let Area { dir, _stop, store, deliveries, exchange } = area();
        let mut stream = deliveries.subscribe("luton-oakwood-primary");
        let started = std::time::Instant::now();
        while deliveries.direct_room("luton-oakwood-primary") == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "the school's actor did not publish its room");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let receipt = exchange.send(&police, example("operation-encompass-notification.json")).await.unwrap();
        let copy = tokio::time::timeout(Duration::from_secs(10), stream.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(copy.message_id, receipt.message_id);
        assert_eq!(copy.attempt, 1);
        let track = exchange.track(&police, &receipt.message_id).unwrap();
        assert_eq!(track.recipients[0].state, pb::DeliveryState::Delivered as i32);
        assert_eq!(track.recipients[0].attempts, 1);
        let events: Vec<&str> = track.recipients[0].events.iter().map(|event| event.event.as_str()).collect();
        assert_eq!(events, ["queued", "delivered"]);
        deliveries.shutdown().await;
        store.close();
        let mut entries = Vec::new();
        crate::store::log::read_all(&AuditLog::path(&dir.path().join("audit")), |_, bytes| {
            entries.push(AuditEntry::decode(bytes).unwrap());
            Ok(())
        })
        .unwrap();
        let events: Vec<_> = entries.iter().map(|entry| entry.event).collect();
        assert_eq!(events, [Some(EventType::DecisionToShare), Some(EventType::Delivery)]);
        // Written by the send (at its decision's time), not by the school's actor afterwards.
        assert_eq!(entries[1].time_micros, entries[0].time_micros);
    }

    /// The message's record, the copy's record and the copy itself stay in the journal, where the commit wrote them
    /// anyway; the index holds only where they are, the copy's place attached to its queue entry (so sled writes,
    /// and replays on its first open after a long run, a fraction of the bytes). Reads see them whole, before and
    /// after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_keeps_its_records_in_the_journal_and_only_their_places_in_the_index() {
        let Area { dir, _stop, store, deliveries, exchange } = area();
        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let receipt = exchange.send(&police, example("operation-encompass-notification.json")).await.unwrap();
        let policy = exchange.policy();
        let delivery_id = records::delivery_id(&receipt.message_id, "luton-oakwood-primary");
        let kept_in_journal = [records::message_key(&receipt.message_id), records::delivery_key(&delivery_id)];
        for key in &kept_in_journal {
            let held = store.index_value(key).unwrap();
            assert!(Store::is_journal_reference(&held), "{} is in the index whole", String::from_utf8_lossy(key));
        }
        let queue_key = records::queue_key("luton-oakwood-primary", 1);
        assert!(
            store.index_value(&queue_key).unwrap().len() < 200,
            "the queue entry holds the copy's place, not the copy"
        );
        assert_eq!(store.index_value(&records::copy_key(&delivery_id)), None, "no key of its own for the copy");
        let record: MessageRecord =
            records::decode(&store.get(&records::message_key(&receipt.message_id)).unwrap().unwrap()).unwrap();
        assert_eq!((record.message_id.as_str(), record.sender.as_str()), (receipt.message_id.as_str(), "beds-police"));
        let track = exchange.track(&police, &receipt.message_id).unwrap();
        assert_eq!(track.recipients[0].state, pb::DeliveryState::Queued as i32);
        deliveries.shutdown().await;
        store.close();
        drop((store, exchange, deliveries, _stop));

        let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
        let (store, _) = Store::open(dir.path(), audit, crate::store::StoreOptions::for_tests()).unwrap();
        for key in &kept_in_journal {
            assert!(Store::is_journal_reference(&store.index_value(key).unwrap()));
        }
        let stored: DeliveryRecord =
            records::decode(&store.get(&records::delivery_key(&delivery_id)).unwrap().unwrap()).unwrap();
        assert_eq!((stored.state, stored.recipient.as_str()), (DeliveryState::Queued, "luton-oakwood-primary"));
        let copy = pb::Delivery::decode(store.get_attachment(&queue_key).unwrap().unwrap().as_slice()).unwrap();
        assert_eq!(copy.message_id, receipt.message_id);
        // The copy built from the encoded envelope is the one the reference builder makes from the decoded one.
        let mut sent = example("operation-encompass-notification.json");
        sent.message_id = receipt.message_id.clone();
        let decision = policy.decide(&DecisionRequest {
            sender: "beds-police",
            sender_practitioner: "pc-1",
            sender_roles: &["spoc".to_owned()],
            recipient: "luton-oakwood-primary",
            envelope: &sent,
            encoded_envelope: None,
            now: OffsetDateTime::now_utc(),
        });
        assert_eq!(copy.envelope, Some(policy.build_copy_dynamic(&sent, &decision).unwrap()));
        assert!(copy.envelope.as_ref().unwrap().subject.is_some(), "the school's copy names the child");
        let (queued, _) = records::parse_queue_value(&store.get(&queue_key).unwrap().unwrap()).unwrap();
        assert_eq!(queued, delivery_id, "a read of the queue entry sees its head");
        store.close();
    }

    /// A copy goes into its delivery as it was built, encoded; the delivery's bytes are exactly prost's for the same
    /// delivery with the copy decoded and set, so agents, tools and older brokers read what they always read.
    #[test]
    fn a_delivery_spliced_around_an_encoded_copy_is_what_prost_encodes() {
        let pool = proto::descriptor_pool().unwrap();
        let numbers: Vec<u32> = pool
            .get_message_by_name("safeguarding.v1.Delivery")
            .unwrap()
            .fields()
            .map(|field| field.number())
            .collect();
        assert_eq!(numbers, (1..=13).collect::<Vec<_>>(), "a field was added to Delivery: place it in encode_delivery");
        let envelope = example("operation-encompass-notification.json");
        let full = pb::Delivery {
            delivery_id: "m1:luton-oakwood-primary".into(),
            message_id: "m1".into(),
            attempt: 3,
            sender_agency: "beds-police".into(),
            sender_practitioner: "pc-1".into(),
            sender_role: "spoc".into(),
            envelope: Some(envelope.clone()),
            rule_ids: vec!["f1-encompass".into(), "f1-other".into()],
            lawful_basis: "uk-gdpr-6-1-e".into(),
            fields_withheld: vec!["subject.address".into()],
            obligations: Some(pb::Obligations {
                acknowledge_within_seconds: 3600,
                retention_class: "child-record-25".into(),
                onward_disclosure_allowed: true,
            }),
            accepted_at: Some(timestamp(OffsetDateTime::now_utc())),
            policy_set_hash: "abc".into(),
        };
        let spliced = encode_delivery(full.clone(), &envelope.encode_to_vec());
        assert_eq!(spliced, full.encode_to_vec());
        assert_eq!(pb::Delivery::decode(spliced.as_slice()).unwrap(), full);
        // An empty copy is still a copy: the field is present, as prost writes `Some` of an empty message.
        let bare =
            pb::Delivery { delivery_id: "d".into(), envelope: Some(pb::Envelope::default()), ..Default::default() };
        assert_eq!(encode_delivery(bare.clone(), &[]), bare.encode_to_vec());
    }

    /// Every timestamp an envelope can hold (found from the descriptors, so a new field is not missed) is checked:
    /// out of protobuf JSON's range, or with nanoseconds out of range, it is refused naming its field; in range it
    /// passes.
    #[test]
    fn every_timestamp_out_of_range_is_refused_naming_its_field() {
        use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, ReflectMessage, Value};
        fn paths(message: &MessageDescriptor, prefix: &str, depth: usize, out: &mut Vec<String>) {
            for field in message.fields() {
                let Kind::Message(inner) = field.kind() else { continue };
                let path = format!("{prefix}.{}", field.name());
                if inner.full_name() == "google.protobuf.Timestamp" {
                    assert!(!field.is_list(), "{path}: a repeated timestamp needs its own check");
                    out.push(path);
                } else if depth < 8 && !field.is_list() && !field.is_map() {
                    paths(&inner, &path, depth + 1, out);
                }
            }
        }
        fn set(message: &mut DynamicMessage, path: &[&str], timestamp: &prost_types::Timestamp) {
            let field = message.descriptor().get_field_by_name(path[0]).unwrap();
            if path.len() == 1 {
                let mut value = DynamicMessage::new(field.kind().as_message().unwrap().clone());
                value.transcode_from(timestamp).unwrap();
                message.set_field(&field, Value::Message(value));
            } else {
                let mut inner = match message.get_field(&field).as_message() {
                    Some(inner) => inner.clone(),
                    None => DynamicMessage::new(field.kind().as_message().unwrap().clone()),
                };
                set(&mut inner, &path[1..], timestamp);
                message.set_field(&field, Value::Message(inner));
            }
        }
        let pool = proto::descriptor_pool().unwrap();
        let descriptor = pool.get_message_by_name(proto::ENVELOPE_MESSAGE).unwrap();
        let mut found = Vec::new();
        paths(&descriptor, "envelope", 0, &mut found);
        assert_eq!(found.len(), 11, "{found:?}");
        let year_10000 = prost_types::Timestamp { seconds: MAX_TIMESTAMP_SECONDS + 1, nanos: 0 };
        let bad_nanos = prost_types::Timestamp { seconds: 1_700_000_000, nanos: -1 };
        let fine = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 999_999_999 };
        for path in &found {
            let segments: Vec<&str> = path.split('.').skip(1).collect();
            for (timestamp, refused) in [(&year_10000, true), (&bad_nanos, true), (&fine, false)] {
                let mut message = DynamicMessage::new(descriptor.clone());
                set(&mut message, &segments, timestamp);
                let envelope: pb::Envelope = message.transcode_to().unwrap();
                match check_timestamps(&envelope) {
                    Err(ExchangeError::InvalidArgument { field, .. }) if refused => assert_eq!(field, path),
                    Ok(()) if !refused => {}
                    other => panic!("{path} = {timestamp:?}: {other:?}"),
                }
            }
        }
    }

    /// A send refused for every recipient does not use up its idempotency key: the same request is decided again
    /// (refused again, as a new message), and once mended it is accepted under that key, after which the key
    /// answers with that receipt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_refused_for_every_recipient_does_not_use_up_its_key() {
        let Area { dir: _dir, _stop, store, deliveries: _deliveries, exchange } = area();
        let school =
            Caller { agency: "luton-oakwood-primary".into(), practitioner: "dsl-1".into(), roles: vec!["dsl".into()] };
        let mut refused = example("operation-encompass-notification.json");
        refused.idempotency_key = "k-1".into();
        refused.recipients = vec!["luton-csc".into()];
        let first = match exchange.send(&school, refused.clone()).await {
            Err(ExchangeError::Refused { receipt, .. }) => receipt,
            other => panic!("expected a refusal: {other:?}"),
        };
        let again = match exchange.send(&school, refused.clone()).await {
            Err(ExchangeError::Refused { receipt, .. }) => receipt,
            other => panic!("expected a refusal: {other:?}"),
        };
        assert!(!again.duplicate, "decided again");
        assert_ne!(again.message_id, first.message_id);
        // A key an older broker kept for the refusal is not answered with it either.
        let write =
            Write::Put(records::idempotency_key("luton-oakwood-primary", "k-1"), first.message_id.clone().into_bytes());
        store.commit(Commit { audit: Vec::new(), writes: vec![write] }).await.unwrap();
        match exchange.send(&school, refused.clone()).await {
            Err(ExchangeError::Refused { receipt, .. }) => assert!(!receipt.duplicate, "decided again"),
            other => panic!("expected a refusal: {other:?}"),
        }

        let mut mended = example("school-referral-to-front-door.json");
        mended.idempotency_key = "k-1".into();
        let accepted = exchange.send(&school, mended.clone()).await.unwrap();
        assert!(!accepted.duplicate);
        let repeated = exchange.send(&school, mended).await.unwrap();
        assert!(repeated.duplicate);
        assert_eq!(repeated.message_id, accepted.message_id);
    }

    /// A correction must go to every agency the original reached (they all hold what is being corrected), and may
    /// correct only a message of the sender's own agency.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_correction_goes_to_every_recipient_of_the_original() {
        let Area { dir: _dir, _stop, store: _store, deliveries: _deliveries, exchange } = area();
        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let original = exchange.send(&police, example("operation-encompass-notification.json")).await.unwrap();
        let mut correction = example("operation-encompass-notification.json");
        correction.corrects = original.message_id.clone();
        correction.recipients = vec!["luton-csc".into()];
        match exchange.send(&police, correction.clone()).await {
            Err(ExchangeError::CorrectionMissesRecipients { original: named, missing }) => {
                assert_eq!(named, original.message_id);
                assert_eq!(missing, "`luton-oakwood-primary`");
            }
            answer => panic!("expected the correction to be refused: {answer:?}"),
        }
        correction.recipients = vec!["luton-oakwood-primary".into()];
        exchange.send(&police, correction.clone()).await.unwrap();
        let school =
            Caller { agency: "luton-oakwood-primary".into(), practitioner: "dsl-1".into(), roles: vec!["dsl".into()] };
        let mut foreign = example("school-referral-to-front-door.json");
        foreign.corrects = original.message_id.clone();
        let refused = exchange.send(&school, foreign).await.unwrap_err();
        assert!(matches!(refused, ExchangeError::NotFound(_)), "another agency's message: {refused:?}");
    }

    /// A send whose recipients' copies come to more than one commit may hold is refused with OUT_OF_RANGE before
    /// anything is stored (before, the commit failed as "unavailable, retry", and the client retried for ever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_send_whose_copies_are_too_large_together_stores_nothing() {
        let Area { dir: _dir, _stop, store, deliveries: _deliveries, mut exchange } = area();
        let council =
            Caller { agency: "luton-csc".into(), practitioner: "sw-1".into(), roles: vec!["social-worker".into()] };
        let envelope = example("child-protection-plan-notification.json");
        let one_copy = exchange.send(&council, envelope.clone()).await.unwrap();
        assert_eq!(one_copy.recipients.len(), 2);
        let stored = store.scan_prefix(b"m/").count();
        // Each copy is smaller than the envelope, two together larger.
        exchange.max_copy_bytes = envelope.encoded_len();
        let refused = exchange.send(&council, envelope).await.unwrap_err();
        assert!(matches!(refused, ExchangeError::TooLarge { .. }), "{refused:?}");
        assert_eq!(tonic::Status::from(refused).code(), tonic::Code::OutOfRange);
        assert_eq!(store.scan_prefix(b"m/").count(), stored, "nothing stored");
    }

    /// A key used again with other content is refused (the second message was not sent, and the caller is told
    /// rather than handed the first message's receipt as if it were its own); the same content with a fresh
    /// `created_at` is the same message. A key an older broker stored (no digest) answers as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_used_again_for_other_content_is_refused() {
        let Area { dir: _dir, _stop, store, deliveries: _deliveries, exchange } = area();
        let police = Caller { agency: "beds-police".into(), practitioner: "pc-1".into(), roles: vec!["spoc".into()] };
        let mut first = example("operation-encompass-notification.json");
        first.idempotency_key = "incident-7".into();
        let receipt = exchange.send(&police, first.clone()).await.unwrap();

        let mut retried = first.clone();
        retried.created_at = Some(prost_types::Timestamp { seconds: 1_800_000_000, nanos: 0 });
        let again = exchange.send(&police, retried).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message_id, receipt.message_id);

        let mut other = first.clone();
        if let Some(pb::envelope::Body::DomesticAbuseIncident(incident)) = &mut other.body {
            incident.location = "another address".into();
        }
        match exchange.send(&police, other.clone()).await {
            Err(ExchangeError::KeyReused { message_id }) => assert_eq!(message_id, receipt.message_id),
            answer => panic!("expected the key's reuse to be refused: {answer:?}"),
        }

        // Stored by an older broker: the message id alone.
        other.idempotency_key = "older".into();
        let older = exchange.send(&police, other.clone()).await.unwrap();
        let write = Write::Put(records::idempotency_key("beds-police", "older"), older.message_id.clone().into_bytes());
        store.commit(Commit { audit: Vec::new(), writes: vec![write] }).await.unwrap();
        let mut changed = other;
        changed.purpose = "something-else".into();
        assert!(exchange.send(&police, changed).await.unwrap().duplicate, "no digest to compare: as before");
    }

    #[test]
    fn validation_names_the_field() {
        let mut envelope = example("operation-encompass-notification.json");
        envelope.recipients.push(envelope.recipients[0].clone());
        let Err(ExchangeError::InvalidArgument { field, .. }) = validate(&envelope) else { panic!("accepted") };
        assert_eq!(field, "envelope.recipients");
        let mut envelope = example("operation-encompass-notification.json");
        envelope.subject.as_mut().unwrap().date_of_birth = Some(pb::Date { year: 2018, month: 2, day: 30 });
        let Err(ExchangeError::InvalidArgument { field, .. }) = validate(&envelope) else { panic!("accepted") };
        assert_eq!(field, "envelope.subject.date_of_birth");
        let mut envelope = example("operation-encompass-notification.json");
        envelope.subject.as_mut().unwrap().date_of_birth = Some(pb::Date { year: 1, month: 1, day: 1 });
        let Err(ExchangeError::InvalidArgument { field, .. }) = validate(&envelope) else { panic!("accepted") };
        assert_eq!(field, "envelope.subject.date_of_birth");
        let mut envelope = example("operation-encompass-notification.json");
        envelope.purpose.clear();
        assert!(validate(&envelope).is_err());
        assert!(validate(&example("school-referral-to-front-door.json")).is_ok());

        // Codes and identifiers that reach every recipient, or the audit log, are not free text.
        type Mend = fn(&mut pb::Envelope);
        let cases: [(&str, Mend); 6] = [
            ("envelope.purpose", |envelope| envelope.purpose = "operation encompass for Amelia".into()),
            ("envelope.sender_role", |envelope| envelope.sender_role = "x".repeat(65)),
            ("envelope.recipient_role", |envelope| envelope.recipient_role = "dsl (Mrs Jones)".into()),
            ("envelope.correlation_id", |envelope| envelope.correlation_id = "SMITH-J-150312".into()),
            ("envelope.corrects", |envelope| envelope.corrects = "the one from Tuesday".into()),
            ("envelope.agreement.authorised_by", |envelope| {
                envelope.agreement.get_or_insert_default().authorised_by = "Inspector Jane Smith".into()
            }),
        ];
        for (expected, mend) in cases {
            let mut envelope = example("operation-encompass-notification.json");
            mend(&mut envelope);
            let Err(ExchangeError::InvalidArgument { field, .. }) = validate(&envelope) else { panic!("{expected}") };
            assert_eq!(field, expected);
        }
        let mut fine = example("operation-encompass-notification.json");
        fine.correlation_id = "0195a3c2-7d10-7b2e-9c41-000000000001".into();
        fine.agreement.get_or_insert_default().authorised_by = "inspector.smith@beds.police.example".into();
        validate(&fine).unwrap();
    }
}
