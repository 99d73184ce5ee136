//! Sending one message from a JSON file, tracking a sent message, and the text the command line shows for receipts,
//! tracking answers and refusals.
//!
//! A message without an idempotency key gets the hex SHA-256 of the file's bytes as its key, so sending the same file
//! twice (by hand, or by the outbox after a crash) yields the broker's first receipt and one delivery.

use std::fmt::Write as _;

use proto::pb;
use sha2::{Digest, Sha256};
use tonic_types::StatusExt;

use crate::{AgentError, BrokerClient, json::read_envelope_json};

/// Reads an envelope from the bytes of a JSON file and gives it an idempotency key derived from those bytes when it
/// has none.
///
/// # Errors
/// Fails when the bytes are not a valid envelope in the proto3 JSON mapping.
pub fn prepare_envelope(file_bytes: &[u8]) -> Result<pb::Envelope, AgentError> {
    let mut envelope = read_envelope_json(file_bytes)?;
    if envelope.idempotency_key.is_empty() {
        envelope.idempotency_key = hex::encode(Sha256::digest(file_bytes));
    }
    Ok(envelope)
}

/// Sends a prepared envelope and returns the broker's receipt.
///
/// # Errors
/// The broker's status when it refuses the whole message (for example `INVALID_ARGUMENT` naming a field), or a
/// transport failure.
pub async fn send_envelope(client: &mut BrokerClient, envelope: pb::Envelope) -> Result<pb::SendResponse, AgentError> {
    let response = client.send(pb::SendRequest { envelope: Some(envelope) }).await?;
    Ok(response.into_inner())
}

/// Asks the broker for the state of a message this agency sent.
///
/// # Errors
/// The broker's status (for example `NOT_FOUND`), or a transport failure.
pub async fn track_message(client: &mut BrokerClient, message_id: &str) -> Result<pb::TrackResponse, AgentError> {
    let response = client.track(pb::TrackRequest { message_id: message_id.to_owned() }).await?;
    Ok(response.into_inner())
}

/// Formats a timestamp as RFC 3339 in UTC, or `-` when absent.
pub fn format_timestamp(timestamp: Option<&prost_types::Timestamp>) -> String {
    let Some(timestamp) = timestamp else { return "-".to_owned() };
    let nanos = i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|instant| instant.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{}s", timestamp.seconds))
}

fn outcome_name(outcome: i32) -> &'static str {
    match pb::RecipientOutcome::try_from(outcome) {
        Ok(pb::RecipientOutcome::Accepted) => "accepted",
        Ok(pb::RecipientOutcome::Refused) => "refused",
        Ok(pb::RecipientOutcome::Unspecified) | Err(_) => "unspecified",
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::DeliveryState::try_from(state) {
        Ok(pb::DeliveryState::Refused) => "refused",
        Ok(pb::DeliveryState::Queued) => "queued",
        Ok(pb::DeliveryState::Delivered) => "delivered",
        Ok(pb::DeliveryState::Acknowledged) => "acknowledged",
        Ok(pb::DeliveryState::DeadLettered) => "dead-lettered",
        Ok(pb::DeliveryState::Unspecified) | Err(_) => "unspecified",
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "-".to_owned() } else { items.join(", ") }
}

/// The receipt as a person reads it: message id, whether it repeats an earlier send, and per recipient the outcome,
/// the reason and the fields shared and withheld.
pub fn format_receipt(receipt: &pb::SendResponse) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "message id:  {}", receipt.message_id);
    if receipt.duplicate {
        let _ = writeln!(
            text,
            "duplicate:   yes (this repeats the receipt of an earlier send with the same idempotency key)"
        );
    } else {
        let _ = writeln!(text, "duplicate:   no");
    }
    let _ = writeln!(text, "accepted at: {}", format_timestamp(receipt.accepted_at.as_ref()));
    if !receipt.policy_set_hash.is_empty() {
        let _ = writeln!(text, "policy set:  {}", receipt.policy_set_hash);
    }
    for recipient in &receipt.recipients {
        let _ = writeln!(text, "\n{}: {}", recipient.recipient, outcome_name(recipient.outcome));
        if !recipient.reason_code.is_empty() {
            let _ = writeln!(text, "  reason:      {}", recipient.reason_code);
        }
        if !recipient.explanation.is_empty() {
            let _ = writeln!(text, "  explanation: {}", recipient.explanation);
        }
        if !recipient.rule_ids.is_empty() {
            let _ = writeln!(text, "  rules:       {}", list(&recipient.rule_ids));
        }
        if recipient.outcome == pb::RecipientOutcome::Accepted as i32 {
            let _ = writeln!(text, "  shared:      {}", list(&recipient.fields_shared));
            let _ = writeln!(text, "  withheld:    {}", list(&recipient.fields_withheld));
            if recipient.acknowledge_by.is_some() {
                let _ = writeln!(text, "  acknowledge by: {}", format_timestamp(recipient.acknowledge_by.as_ref()));
            }
        }
    }
    text
}

/// The tracking answer as a person reads it, one block per recipient with its events, like MESH tracking.
pub fn format_track(track: &pb::TrackResponse) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "message id:  {}", track.message_id);
    let _ = writeln!(text, "accepted at: {}", format_timestamp(track.accepted_at.as_ref()));
    for recipient in &track.recipients {
        let _ = writeln!(text, "\n{}: {}", recipient.recipient, state_name(recipient.state));
        if !recipient.reason_code.is_empty() {
            let _ = writeln!(text, "  reason:            {}", recipient.reason_code);
        }
        let _ = writeln!(text, "  attempts:          {}", recipient.attempts);
        let _ = writeln!(text, "  queued at:         {}", format_timestamp(recipient.queued_at.as_ref()));
        let _ = writeln!(text, "  last delivered at: {}", format_timestamp(recipient.last_delivered_at.as_ref()));
        let _ = writeln!(text, "  acknowledged at:   {}", format_timestamp(recipient.acknowledged_at.as_ref()));
        let _ = writeln!(text, "  acknowledge by:    {}", format_timestamp(recipient.acknowledge_by.as_ref()));
        let _ = writeln!(text, "  escalated:         {}", if recipient.escalated { "yes" } else { "no" });
        if !recipient.events.is_empty() {
            let _ = writeln!(text, "  events:");
            for event in &recipient.events {
                let _ = write!(
                    text,
                    "    {}  {}  attempt {}",
                    format_timestamp(event.at.as_ref()),
                    event.event,
                    event.attempt
                );
                if !event.detail.is_empty() {
                    let _ = write!(text, "  {}", event.detail);
                }
                text.push('\n');
            }
        }
    }
    text
}

/// A status as a person reads it: the code, the message and any structured details the broker attached
/// (`google.rpc.ErrorInfo`, `BadRequest` field violations, precondition failures, help links).
pub fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", code_name(status.code()), status.message());
    let details = status.get_error_details();
    if let Some(info) = details.error_info() {
        let _ = write!(text, "\n  reason: {}", info.reason);
        if !info.domain.is_empty() {
            let _ = write!(text, " ({})", info.domain);
        }
        let mut metadata: Vec<_> = info.metadata.iter().collect();
        metadata.sort();
        for (key, value) in metadata {
            let _ = write!(text, "\n  {key}: {value}");
        }
    }
    if let Some(bad_request) = details.bad_request() {
        for violation in &bad_request.field_violations {
            let _ = write!(text, "\n  field `{}`: {}", violation.field, violation.description);
        }
    }
    if let Some(failure) = details.precondition_failure() {
        for violation in &failure.violations {
            let _ = write!(text, "\n  {} `{}`: {}", violation.r#type, violation.subject, violation.description);
        }
    }
    if let Some(help) = details.help() {
        for link in &help.links {
            let _ = write!(text, "\n  see {}: {}", link.description, link.url);
        }
    }
    text
}

/// The canonical gRPC name of a status code (`INVALID_ARGUMENT`), as operators see it in the broker's documentation.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Whether the broker refused the agent's own credentials rather than the message: UNAUTHENTICATED (the token
/// expired or is not yet refreshed, the certificate revoked), or PERMISSION_DENIED for a token issued to another
/// agency (`agency-mismatch`, a misconfigured token). Every message would fail the same way until an operator mends
/// them.
pub fn is_credentials_refusal(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unauthenticated => true,
        tonic::Code::PermissionDenied => {
            status.get_error_details().error_info().is_some_and(|info| info.reason == "agency-mismatch")
        }
        _ => false,
    }
}

/// Whether a failed send should be given up (the same message would fail again) rather than retried later.
pub fn is_permanent_failure(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::NotFound
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_idempotency_key_is_the_hash_of_the_file() {
        let bytes = br#"{"kind": "MESSAGE_KIND_REFERRAL", "purpose": "safeguarding-referral"}"#;
        let envelope = prepare_envelope(bytes).unwrap();
        assert_eq!(envelope.idempotency_key, hex::encode(Sha256::digest(bytes)));
        assert_eq!(envelope.idempotency_key.len(), 64);

        let with_key = br#"{"idempotency_key": "case-123-referral-1"}"#;
        assert_eq!(prepare_envelope(with_key).unwrap().idempotency_key, "case-123-referral-1");
    }

    #[test]
    fn receipt_text_names_each_recipient_and_its_fields() {
        let receipt = pb::SendResponse {
            message_id: "0190f0aa-0000-7000-8000-000000000001".into(),
            duplicate: true,
            recipients: vec![
                pb::RecipientReceipt {
                    recipient: "luton-oakwood-primary".into(),
                    outcome: pb::RecipientOutcome::Accepted as i32,
                    fields_shared: vec!["domestic_abuse_incident.child_present".into()],
                    fields_withheld: vec!["domestic_abuse_incident.crime_report".into()],
                    ..Default::default()
                },
                pb::RecipientReceipt {
                    recipient: "luton-family-hub-north".into(),
                    outcome: pb::RecipientOutcome::Refused as i32,
                    reason_code: "no-matching-rule".into(),
                    explanation: "no rule permits this".into(),
                    ..Default::default()
                },
            ],
            accepted_at: Some(prost_types::Timestamp { seconds: 1_772_442_900, nanos: 0 }),
            ..Default::default()
        };
        let text = format_receipt(&receipt);
        assert!(text.contains("duplicate:   yes"), "{text}");
        assert!(text.contains("luton-oakwood-primary: accepted"), "{text}");
        assert!(text.contains("withheld:    domestic_abuse_incident.crime_report"), "{text}");
        assert!(text.contains("luton-family-hub-north: refused"), "{text}");
        assert!(text.contains("reason:      no-matching-rule"), "{text}");
        assert!(text.contains("2026-03-02T09:15:00Z"), "{text}");
    }

    #[test]
    fn status_description_includes_details() {
        let details = tonic_types::ErrorDetails::with_bad_request_violation("envelope.kind", "must be set");
        let status = tonic::Status::with_error_details(tonic::Code::InvalidArgument, "invalid envelope", details);
        let text = describe_status(&status);
        assert!(text.starts_with("INVALID_ARGUMENT: invalid envelope"), "{text}");
        assert!(text.contains("field `envelope.kind`: must be set"), "{text}");
    }

    #[test]
    fn the_agent_s_own_credentials_refused_are_told_apart_from_a_refused_message() {
        let refused = |code, reason: &str| {
            tonic::Status::with_error_details(
                code,
                "refused",
                tonic_types::ErrorDetails::with_error_info(reason, "safeguarding.v1", std::collections::HashMap::new()),
            )
        };
        assert!(is_credentials_refusal(&refused(tonic::Code::Unauthenticated, "token-expired")));
        assert!(is_credentials_refusal(&refused(tonic::Code::PermissionDenied, "agency-mismatch")));
        assert!(!is_credentials_refusal(&refused(tonic::Code::PermissionDenied, "no-rule-permits")));
        assert!(!is_credentials_refusal(&refused(tonic::Code::InvalidArgument, "invalid-argument")));
    }

    #[test]
    fn permanent_and_transient_codes() {
        assert!(is_permanent_failure(tonic::Code::PermissionDenied));
        // The broker's disk is full: the same envelope is accepted once there is space again. (An oversized
        // envelope is OUT_OF_RANGE, from tonic's size limit, and stays permanent.)
        assert!(!is_permanent_failure(tonic::Code::ResourceExhausted));
        assert!(is_permanent_failure(tonic::Code::OutOfRange));
        assert!(!is_permanent_failure(tonic::Code::Unavailable));
        assert!(!is_permanent_failure(tonic::Code::DeadlineExceeded));
    }
}
