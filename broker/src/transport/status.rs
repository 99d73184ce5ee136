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
                for recipient in &receipt.recipients {
                    metadata.insert(format!("reason_code.{}", recipient.recipient), recipient.reason_code.clone());
                    metadata.insert(format!("rule_ids.{}", recipient.recipient), recipient.rule_ids.join(","));
                    metadata.insert(format!("explanation.{}", recipient.recipient), recipient.explanation.clone());
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
    } else {
        status(
            Code::Unavailable,
            "storage-unavailable",
            "the broker could not store this durably: nothing was stored, retry",
            HashMap::new(),
        )
    }
}
