//! The `safeguarding.v1.Audit` service: auditors query the audit log and fetch checkpoints and proofs.
//!
//! Every call authenticates like the `Broker` service ([`super::service::Authenticator`]) and then requires a caller
//! from an agency trusted to audit (`audit.auditor_agencies`: a token's roles come from its own agency's identity
//! provider, so the role alone would let any agency make itself an auditor) with the `auditor` role; anyone else
//! gets `PERMISSION_DENIED` and the refusal is audited. `Query` and `RecipientsOfChild`
//! are recorded as `AuditorQuery` entries (the filter summary in `detail`, the child only as its pseudonym) durably
//! *before* they run, so an auditor's query cannot go unrecorded. Their results carry inclusion proofs in the tree
//! of a checkpoint signed after that entry, which the response includes.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use tonic::{Code, Request, Response, Status};

use crate::{
    audit::{
        Actor, AuditEntry, EventType, Pseudonym, Pseudonymiser, SharedTree,
        checkpoints::{Checkpointer, SignedCheckpoint},
        merkle::{Hash, ProofError, leaf_hash},
        query::{self, AuditFilter, Found, QueryError},
    },
    auth::Caller,
    store::{Commit, Store},
    transport::{
        service::{Authenticator, actor_of},
        status::{status, store_status},
    },
};
use proto::pb::{self, audit_server::Audit};

/// The role every audit call needs.
pub const AUDITOR_ROLE: &str = "auditor";

/// Default number of entries a query returns.
const DEFAULT_LIMIT: usize = 1000;

pub struct AuditService {
    authenticator: Authenticator,
    /// The agencies trusted to audit (`audit.auditor_agencies`).
    auditor_agencies: Vec<String>,
    store: Store,
    pseudonymiser: Pseudonymiser,
    checkpointer: Arc<Checkpointer>,
    tree: SharedTree,
    audit_dir: PathBuf,
}

/// The tonic server of the audit service.
pub fn server(
    authenticator: Authenticator,
    auditor_agencies: Vec<String>,
    store: Store,
    pseudonymiser: Pseudonymiser,
    checkpointer: Arc<Checkpointer>,
) -> pb::audit_server::AuditServer<AuditService> {
    let tree = checkpointer.tree();
    let audit_dir = store.data_dir().join("audit");
    pb::audit_server::AuditServer::new(AuditService {
        authenticator,
        auditor_agencies,
        store,
        pseudonymiser,
        checkpointer,
        tree,
        audit_dir,
    })
    .max_encoding_message_size(256 * 1024 * 1024)
}

fn invalid(field: &str, description: &str) -> Status {
    status(
        Code::InvalidArgument,
        "invalid-argument",
        format!("`{field}`: {description}"),
        HashMap::from([("field".to_owned(), field.to_owned())]),
    )
}

fn internal(reason: &str, message: String) -> Status {
    tracing::error!(reason, error = %message, "audit service failure");
    status(Code::Internal, reason, message, HashMap::new())
}

fn query_status(error: QueryError) -> Status {
    match error {
        QueryError::Store(error) => store_status(&error),
        other => internal("audit-log-unreadable", other.to_string()),
    }
}

fn proof_status(error: ProofError) -> Status {
    status(Code::OutOfRange, "proof-out-of-range", error.to_string(), HashMap::new())
}

pub fn micros_of(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp.seconds.saturating_mul(1_000_000).saturating_add(i64::from(timestamp.nanos) / 1000)
}

pub fn timestamp_of(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub fn entry_view(encoded: &[u8], entry: &AuditEntry) -> pb::AuditEntryView {
    pb::AuditEntryView {
        sequence: entry.sequence,
        time: Some(timestamp_of(entry.time_micros)),
        event_type: entry.event.map(|event| event.as_str().to_owned()).unwrap_or_default(),
        actor_agency: entry.actor.agency.clone(),
        actor_practitioner: entry.actor.practitioner.clone(),
        actor_role: entry.actor.role.clone(),
        subject_pseudonym: entry.subject.as_ref().map(Pseudonym::to_hex).unwrap_or_default(),
        message_id: entry.message_id.clone(),
        recipient: entry.recipient.clone(),
        rule_ids: entry.rule_ids.clone(),
        lawful_basis: entry.lawful_basis.clone(),
        reason_code: entry.reason_code.clone(),
        fields_shared: entry.fields_shared.clone(),
        fields_withheld: entry.fields_withheld.clone(),
        policy_set_hash: entry.policy_set_hash.clone(),
        attempt: entry.attempt,
        detail: entry.detail.clone(),
        encoded: encoded.to_vec(),
    }
}

fn checkpoint_view(signed: &SignedCheckpoint) -> pb::SignedCheckpoint {
    pb::SignedCheckpoint {
        note: signed.note.clone(),
        origin: signed.checkpoint.origin.clone(),
        tree_size: signed.size(),
        root_hash: signed.root().to_vec(),
    }
}

fn hashes(proof: Vec<Hash>) -> Vec<Vec<u8>> {
    proof.into_iter().map(|hash| hash.to_vec()).collect()
}

impl AuditService {
    /// Authenticates and requires the auditor role, from an agency trusted to audit (a refusal is audited).
    async fn auditor<T>(&self, request: &Request<T>, operation: &str) -> Result<Caller, Status> {
        let caller = self.authenticator.caller(request, operation).await?;
        if !caller.roles.iter().any(|role| role == AUDITOR_ROLE) {
            tracing::warn!(agency = %caller.agency, operation, "refused an audit call without the auditor role");
            self.authenticator.audit_refusal(&actor_of(&caller), operation, "auditor-role-required").await?;
            return Err(status(
                Code::PermissionDenied,
                "auditor-role-required",
                "only a practitioner with the `auditor` role may use the audit service",
                HashMap::new(),
            ));
        }
        if !self.auditor_agencies.contains(&caller.agency) {
            tracing::warn!(agency = %caller.agency, operation, "refused an audit call from an agency not trusted to audit");
            self.authenticator.audit_refusal(&actor_of(&caller), operation, "auditor-agency-not-trusted").await?;
            return Err(status(
                Code::PermissionDenied,
                "auditor-agency-not-trusted",
                format!(
                    "agency `{}` is not trusted to audit: the broker's operator lists the agencies whose \
                     practitioners may (`audit.auditor_agencies`)",
                    caller.agency
                ),
                HashMap::new(),
            ));
        }
        Ok(caller)
    }

    fn child_pseudonym(&self, nhs_number: &str) -> Result<Option<Pseudonym>, Status> {
        let digits: String = nhs_number.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
        if digits.is_empty() {
            return Ok(None);
        }
        if digits.len() != 10 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid("child_nhs_number", "must be 10 digits"));
        }
        Ok(Some(self.pseudonymiser.nhs_number(&digits)))
    }

    fn filter_from(&self, filter: pb::AuditFilter) -> Result<AuditFilter, Status> {
        let non_empty = |value: String| (!value.trim().is_empty()).then(|| value.trim().to_owned());
        let mut events = Vec::new();
        for name in &filter.event_types {
            events.push(
                EventType::parse(name).ok_or_else(|| invalid("filter.event_types", "names an unknown event type"))?,
            );
        }
        let decision = match pb::AuditDecision::try_from(filter.decision) {
            Ok(pb::AuditDecision::Share) => Some(EventType::DecisionToShare),
            Ok(pb::AuditDecision::NotShare) => Some(EventType::DecisionNotToShare),
            Ok(pb::AuditDecision::Unspecified) => None,
            Err(_) => return Err(invalid("filter.decision", "is not a known decision")),
        };
        if let Some(decision) = decision {
            if events.is_empty() {
                events.push(decision);
            } else if events.contains(&decision) {
                events = vec![decision];
            } else {
                return Err(invalid("filter.decision", "excludes every event type in `event_types`"));
            }
        }
        Ok(AuditFilter {
            child: self.child_pseudonym(&filter.child_nhs_number)?,
            agency: non_empty(filter.agency),
            practitioner: non_empty(filter.practitioner),
            rule_id: non_empty(filter.rule_id),
            message_id: non_empty(filter.message_id),
            events,
            from_micros: filter.from.as_ref().map(micros_of),
            to_micros: filter.to.as_ref().map(micros_of),
        })
    }

    /// Records the auditor's query durably, then signs a checkpoint that covers it (and so every result).
    async fn record_query(
        &self,
        caller: &Caller,
        child: Option<Pseudonym>,
        detail: String,
    ) -> Result<(u64, SignedCheckpoint), Status> {
        let entry = AuditEntry {
            time_micros: AuditEntry::now_micros(),
            event: Some(EventType::AuditorQuery),
            // The role the query is made in, whatever else the token grants.
            actor: Actor { role: AUDITOR_ROLE.to_owned(), ..actor_of(caller) },
            subject: child,
            detail,
            ..AuditEntry::default()
        };
        let sequences = self
            .store
            .commit(Commit { audit: vec![entry], writes: Vec::new() })
            .await
            .map_err(|error| store_status(&error))?;
        let sequence = sequences.first().copied().ok_or_else(|| internal("audit-failed", "no sequence".to_owned()))?;
        let checkpoint = self.checkpoint_now().await?;
        match checkpoint {
            Some(checkpoint) if checkpoint.size() > sequence => Ok((sequence, checkpoint)),
            _ => Err(internal("checkpoint-failed", "no checkpoint covers the query".to_owned())),
        }
    }

    async fn checkpoint_now(&self) -> Result<Option<SignedCheckpoint>, Status> {
        let checkpointer = self.checkpointer.clone();
        tokio::task::spawn_blocking(move || checkpointer.checkpoint_now())
            .await
            .map_err(|error| internal("checkpoint-failed", error.to_string()))?
            .map_err(|error| internal("checkpoint-failed", error.to_string()))
    }

    fn record(&self, found: &Found, size: u64) -> Result<pb::AuditRecord, Status> {
        let proof = {
            let tree = self.tree.read().map_err(|_| internal("tree-unavailable", "tree lock poisoned".to_owned()))?;
            tree.inclusion_proof(found.entry.sequence, size).map_err(proof_status)?
        };
        Ok(pb::AuditRecord {
            entry: Some(entry_view(&found.encoded, &found.entry)),
            proof: Some(pb::InclusionProof {
                leaf_index: found.entry.sequence,
                tree_size: size,
                leaf_hash: leaf_hash(&found.encoded).to_vec(),
                hashes: hashes(proof),
            }),
        })
    }

    fn latest_or_fail(&self) -> Result<SignedCheckpoint, Status> {
        self.checkpointer.latest().ok_or_else(|| {
            status(Code::FailedPrecondition, "no-checkpoint", "the log has no checkpoint yet", HashMap::new())
        })
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    async fn query(&self, request: Request<pb::AuditQueryRequest>) -> Result<Response<pb::AuditQueryResponse>, Status> {
        let caller = self.auditor(&request, "audit-query").await?;
        let request = request.into_inner();
        let filter = self.filter_from(request.filter.unwrap_or_default())?;
        let limit = if request.limit == 0 { DEFAULT_LIMIT } else { request.limit as usize };
        let page = match request.after_sequence {
            Some(after) => format!("after sequence {after}, limit {limit}"),
            None => format!("limit {limit}"),
        };
        let detail = format!("query {}; {page}", filter.summary());
        let (query_sequence, checkpoint) = self.record_query(&caller, filter.child.clone(), detail).await?;
        let (store, audit_dir, size) = (self.store.clone(), self.audit_dir.clone(), checkpoint.size());
        let after = request.after_sequence;
        let page = tokio::task::spawn_blocking(move || query::search(&store, &audit_dir, &filter, after, limit, size))
            .await
            .map_err(|error| internal("query-failed", error.to_string()))?
            .map_err(query_status)?;
        let records = page.found.iter().map(|found| self.record(found, size)).collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::AuditQueryResponse {
            records,
            checkpoint: Some(checkpoint_view(&checkpoint)),
            next_after_sequence: page.next_after_sequence,
            query_sequence,
        }))
    }

    async fn recipients_of_child(
        &self,
        request: Request<pb::RecipientsOfChildRequest>,
    ) -> Result<Response<pb::RecipientsOfChildResponse>, Status> {
        let caller = self.auditor(&request, "audit-recipients-of-child").await?;
        let request = request.into_inner();
        let child = self
            .child_pseudonym(&request.child_nhs_number)?
            .ok_or_else(|| invalid("child_nhs_number", "is required"))?;
        let from = request.from.as_ref().map(micros_of);
        let to = request.to.as_ref().map(micros_of);
        let summary =
            AuditFilter { child: Some(child.clone()), from_micros: from, to_micros: to, ..AuditFilter::default() }
                .summary();
        let (query_sequence, checkpoint) =
            self.record_query(&caller, Some(child.clone()), format!("recipients-of-child {summary}")).await?;
        let (store, audit_dir, size) = (self.store.clone(), self.audit_dir.clone(), checkpoint.size());
        let receipts =
            tokio::task::spawn_blocking(move || query::recipients_of_child(&store, &audit_dir, &child, from, to, size))
                .await
                .map_err(|error| internal("query-failed", error.to_string()))?
                .map_err(query_status)?;
        let mut recipients = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            let entry = &receipt.decision.entry;
            recipients.push(pb::ChildDataRecipient {
                recipient: entry.recipient.clone(),
                sender_agency: entry.actor.agency.clone(),
                sender_practitioner: entry.actor.practitioner.clone(),
                message_id: entry.message_id.clone(),
                decided_at: Some(timestamp_of(entry.time_micros)),
                first_delivered_at: receipt.first_delivered_micros.map(timestamp_of),
                acknowledged_at: receipt.acknowledged_micros.map(timestamp_of),
                rule_ids: entry.rule_ids.clone(),
                lawful_basis: entry.lawful_basis.clone(),
                fields_shared: entry.fields_shared.clone(),
                policy_set_hash: entry.policy_set_hash.clone(),
                decision: Some(self.record(&receipt.decision, size)?),
            });
        }
        Ok(Response::new(pb::RecipientsOfChildResponse {
            recipients,
            checkpoint: Some(checkpoint_view(&checkpoint)),
            query_sequence,
        }))
    }

    async fn latest_checkpoint(
        &self,
        request: Request<pb::LatestCheckpointRequest>,
    ) -> Result<Response<pb::LatestCheckpointResponse>, Status> {
        self.auditor(&request, "audit-latest-checkpoint").await?;
        Ok(Response::new(pb::LatestCheckpointResponse {
            checkpoint: self.checkpointer.latest().as_ref().map(checkpoint_view),
            verifier_key: self.checkpointer.verifier_key(),
            key_handovers: self.checkpointer.handovers().to_vec(),
        }))
    }

    async fn inclusion_proof(
        &self,
        request: Request<pb::InclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProofResponse>, Status> {
        self.auditor(&request, "audit-inclusion-proof").await?;
        let request = request.into_inner();
        let latest = if request.tree_size == 0 { Some(self.latest_or_fail()?) } else { None };
        let size = latest.as_ref().map_or(request.tree_size, SignedCheckpoint::size);
        let tree = self.tree.read().map_err(|_| internal("tree-unavailable", "tree lock poisoned".to_owned()))?;
        let proof = tree.inclusion_proof(request.leaf_index, size).map_err(proof_status)?;
        let leaf = tree.leaf_hash_at(request.leaf_index).ok_or_else(|| {
            proof_status(ProofError::IndexOutOfRange { index: request.leaf_index, size: tree.size() })
        })?;
        Ok(Response::new(pb::InclusionProofResponse {
            proof: Some(pb::InclusionProof {
                leaf_index: request.leaf_index,
                tree_size: size,
                leaf_hash: leaf.to_vec(),
                hashes: hashes(proof),
            }),
            checkpoint: latest.as_ref().map(checkpoint_view),
        }))
    }

    async fn consistency_proof(
        &self,
        request: Request<pb::ConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProofResponse>, Status> {
        self.auditor(&request, "audit-consistency-proof").await?;
        let request = request.into_inner();
        let latest = if request.new_size == 0 { Some(self.latest_or_fail()?) } else { None };
        let new_size = latest.as_ref().map_or(request.new_size, SignedCheckpoint::size);
        let tree = self.tree.read().map_err(|_| internal("tree-unavailable", "tree lock poisoned".to_owned()))?;
        let proof = tree.consistency_proof(request.old_size, new_size).map_err(proof_status)?;
        Ok(Response::new(pb::ConsistencyProofResponse {
            old_size: request.old_size,
            new_size,
            hashes: hashes(proof),
            old_root: tree.root_at(request.old_size).map_err(proof_status)?.to_vec(),
            new_root: tree.root_at(new_size).map_err(proof_status)?.to_vec(),
            checkpoint: latest.as_ref().map(checkpoint_view),
        }))
    }
}
