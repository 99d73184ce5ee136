//! The one place where errors become gRPC statuses.
//!
//! Every status carries a `google.rpc.ErrorInfo` detail with a machine-readable reason (domain `safeguarding.v1`);
//! invalid input also carries a `google.rpc.BadRequest` naming the field. Messages say what is wrong without personal
//! data or key material.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::{AuthError, token::TokenError},
    delivery::DeliveryError,
    exchange::ExchangeError,
    store::StoreError,
};

pub const ERROR_DOMAIN: &str = "safeguarding.v1";

/// The most bytes of per-recipient entries a refusal's error metadata carries (see its `From<ExchangeError>`).
const METADATA_BYTES: usize = 3072;

pub fn status(code: Code, reason: &str, message: impl Into<String>, metadata: HashMap<String, String>) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata))
}

impl From<ExchangeError> for Status {
    fn from(error: ExchangeError) -> Self {
        match error {
            ExchangeError::InvalidArgument { field, description } => {
                let mut details = ErrorDetails::with_bad_request_violation(field, description.clone());
                details.set_error_info(
                    "invalid-argument",
                    ERROR_DOMAIN,
                    HashMap::from([("field".to_owned(), field.to_owned())]),
                );
                Status::with_error_details(Code::InvalidArgument, format!("`{field}`: {description}"), details)
            }
            ExchangeError::Refused { receipt, summary } => {
                let mut metadata = HashMap::new();
                metadata.insert("message_id".to_owned(), receipt.message_id.clone());
                metadata.insert("policy_set_hash".to_owned(), receipt.policy_set_hash.clone());
                // Each recipient's reason code, rule ids and explanation while the metadata stays small: it travels in
                // the response headers (base64 in `grpc-status-details-bin`, beside the message), and some clients
                // refuse headers over 8 KiB (grpc-java's default). `Track` of the message id gives every recipient.
                let mut used = 0;
                for recipient in &receipt.recipients {
                    let entries = [
                        (format!("reason_code.{}", recipient.recipient), recipient.reason_code.clone()),
                        (format!("rule_ids.{}", recipient.recipient), recipient.rule_ids.join(",")),
                        (format!("explanation.{}", recipient.recipient), recipient.explanation.clone()),
                    ];
                    for (key, value) in entries {
                        if used + key.len() + value.len() <= METADATA_BYTES {
                            used += key.len() + value.len();
                            metadata.insert(key, value);
                        }
                    }
                }
                let reason = receipt.recipients.first().map_or("refused", |r| r.reason_code.as_str()).to_owned();
                status(
                    Code::PermissionDenied,
                    &reason,
                    format!("the information-sharing policy permits none of the recipients: {summary}"),
                    metadata,
                )
            }
            ExchangeError::NotFound(message_id) => status(
                Code::NotFound,
                "unknown-message",
                format!("no message `{message_id}` sent by this agency"),
                HashMap::new(),
            ),
            ExchangeError::CorrectionMissesRecipients { original, missing } => {
                let text =
                    ExchangeError::CorrectionMissesRecipients { original: original.clone(), missing: missing.clone() }
                        .to_string();
                status(
                    Code::FailedPrecondition,
                    "correction-misses-recipients",
                    text,
                    HashMap::from([("corrects".to_owned(), original), ("missing".to_owned(), missing)]),
                )
            }
            ExchangeError::TooLarge { limit } => status(
                Code::OutOfRange,
                "message-too-large",
                ExchangeError::TooLarge { limit }.to_string(),
                HashMap::new(),
            ),
            ExchangeError::KeyReused { message_id } => {
                let text = ExchangeError::KeyReused { message_id: message_id.clone() }.to_string();
                status(
                    Code::FailedPrecondition,
                    "idempotency-key-reused",
                    text,
                    HashMap::from([("message_id".to_owned(), message_id)]),
                )
            }
            ExchangeError::Store(error) => store_status(&error),
        }
    }
}

impl From<DeliveryError> for Status {
    fn from(error: DeliveryError) -> Self {
        match error {
            DeliveryError::UnknownDelivery(id) => status(
                Code::NotFound,
                "unknown-delivery",
                format!("no delivery `{id}` is waiting for this agency"),
                HashMap::new(),
            ),
            DeliveryError::Store(error) => store_status(&error),
            DeliveryError::ShuttingDown => {
                status(Code::Unavailable, "shutting-down", "the broker is shutting down: retry", HashMap::new())
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        let reason = match error {
            AuthError::NoCertificate => "no-client-certificate",
            AuthError::BadCertificate => "bad-client-certificate",
            AuthError::NoAgency | AuthError::SeveralAgencies => "certificate-names-no-agency",
            AuthError::UnknownAgency(_) => "unknown-agency",
            AuthError::Revoked(_) => "certificate-revoked",
            AuthError::StreamTokenExpired(_) => "token-expired",
        };
        status(Code::Unauthenticated, reason, error.to_string(), HashMap::new())
    }
}

impl From<TokenError> for Status {
    fn from(error: TokenError) -> Self {
        let code = if error.is_permission() { Code::PermissionDenied } else { Code::Unauthenticated };
        status(code, error.reason(), error.to_string(), HashMap::new())
    }
}

/// Storage failures: nothing was acknowledged, so the caller may retry. A full disk is `RESOURCE_EXHAUSTED`.
pub fn store_status(error: &StoreError) -> Status {
    tracing::error!(error = %error, "storage failure");
    if error.is_disk_full() {
        status(
            Code::ResourceExhausted,
            "disk-full",
            "the broker's disk is full: nothing was stored, retry later",
            HashMap::new(),
        )
    } else if matches!(error, StoreError::Stopped) {
        // The change may have reached the committer before it stopped: whether it was stored is not known here.
        status(
            Code::Unavailable,
            "shutting-down",
            "the broker is stopping: this change may or may not have been stored; retry (a send with the same \
             idempotency key is answered with its first receipt if it was)",
            HashMap::new(),
        )
    } else {
        status(
            Code::Unavailable,
            "storage-unavailable",
            "the broker could not store this durably: nothing was stored, retry",
            HashMap::new(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::pb;

    /// A send to many recipients, all refused with long explanations, still answers with headers a client with an
    /// 8 KiB limit accepts: the message summarises the first few, the metadata holds what fits and the message id.
    #[test]
    fn a_refusal_of_many_recipients_keeps_its_headers_small() {
        let recipients: Vec<pb::RecipientReceipt> = (0..64)
            .map(|index| pb::RecipientReceipt {
                recipient: format!("luton-family-hub-{index:02}"),
                outcome: pb::RecipientOutcome::Refused as i32,
                reason_code: "no-rule-permits".to_owned(),
                explanation: "no rule permits sharing this kind of message with this agency for this purpose; "
                    .repeat(3),
                rule_ids: vec!["f11-family-help-request".to_owned()],
                ..Default::default()
            })
            .collect();
        let receipt = pb::SendResponse { message_id: "m-1".to_owned(), recipients, ..Default::default() };
        let Err(refused) = crate::exchange::refusal_or(receipt) else { panic!("refused") };
        let status = Status::from(refused);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().len() < 1024, "{}", status.message().len());
        assert!(status.message().ends_with("and 56 more"), "{}", status.message());
        let details = status.details().len();
        assert!(details < 4096, "details of {details} bytes, base64 in a header");
        let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
        assert_eq!(info.metadata.get("message_id").map(String::as_str), Some("m-1"));
        assert_eq!(info.metadata.get("reason_code.luton-family-hub-00").map(String::as_str), Some("no-rule-permits"));
    }
}
