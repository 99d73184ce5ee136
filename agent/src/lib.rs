//! The agency agent: the program each agency runs beside its case system to exchange safeguarding messages through
//! the broker.
//!
//! - [`config`]: [`AgentConfig`], loaded from TOML with `AGENT_*` environment overrides, every problem reported at
//!   once.
//! - [`client`]: [`connect`] opens a mutual-TLS channel with the agency's certificate; [`BrokerClient`] is the tonic
//!   client with the [`token::BearerInterceptor`], which adds the practitioner's `authorization: Bearer` token.
//! - [`json`]: the proto3 JSON mapping (prost-reflect) for the envelopes agencies write and the deliveries and
//!   receipts the agent writes.
//! - [`inbox`]: [`write_delivery_durably`], the write-fsync-rename-fsync sequence that must finish before a delivery
//!   is acknowledged.
//! - [`run()`]: the long-running agent: the delivery stream into the inbox, and the optional outbox folder.
//! - [`send`]: one message sent from a JSON file, and the text shown for receipts, tracking and refusals.
//!
//! The binary (`src/main.rs`) is a thin command line over these: `agent run`, `agent send`, `agent track`.
//!
//! Logging never includes message content or child identifiers; delivery ids and message ids are logged.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod client;
pub mod config;
pub mod inbox;
pub mod json;
pub mod outbox;
mod run;
pub mod send;
pub mod token;

use std::path::PathBuf;

pub use client::{BrokerClient, connect, connect_lazily};
pub use config::{AgentConfig, ConfigProblems, DeliverySettings, TokenSetting};
pub use inbox::{WriteOutcome, write_delivery_durably};
pub use json::{JsonError, envelope_to_json, read_envelope_json};
pub use run::run;

/// Everything that can stop an agent command.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigProblems),
    /// The I/O error is said in the message and not returned as the source, so a report of the chain (`{:#}`) says
    /// it once.
    #[error("`{path}`: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("cannot use broker url `{url}`: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("cannot connect to the broker at `{url}`: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Json(#[from] JsonError),
    /// The broker (or the local channel) answered a call with an error status.
    #[error("{}", send::describe_status(.0))]
    Rpc(Box<tonic::Status>),
}

impl From<tonic::Status> for AgentError {
    fn from(status: tonic::Status) -> AgentError {
        AgentError::Rpc(Box::new(status))
    }
}
