//! The area's information-sharing protocol: load, validate, compile, decide, build recipient copies, explain.
//!
//! Information-governance leads write YAML files in `policies/` ([`model`] is their shape, README there teaches it).
//! [`PolicySet::load_dir`] reads every file, checks everything at once (agencies, purposes, roles, field paths
//! against the proto descriptors, rules that can never match, contradictions) and compiles the rules into an index
//! keyed by route (sender, recipient, kind), so that [`PolicySet::decide`] is a hash lookup plus a few checks.
//! [`PolicySet::build_copy`] then builds the recipient's copy from the allowed fields only (DESIGN.md invariant 3).
//!
//! Semantics: default deny; a forbid overrides any permit; rule order never matters; any evaluation error, unknown
//! agency, unknown field or missing required fact means deny; withheld fields always win over shared fields.
//!
//! This module is pure: apart from the functions that read a policy directory (`load_dir`, `load_files`) it does
//! no I/O, and it never panics on input.

pub mod calendar;
pub mod cli;
mod compile;
mod copy;
mod decide;
pub mod diff;
pub mod explain;
pub mod fields;
mod load;
pub mod matrix;
pub mod model;
pub mod testing;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use calendar::Calendar;
pub use copy::CopyError;
pub use model::{AgencyKind, KindName, LawfulBasis};

use compile::CompiledRule;
use fields::MaskNode;

/// A compiled, validated policy set. Cheap to share behind an `Arc`; immutable once loaded.
pub struct PolicySet {
    hash: String,
    agencies: Vec<Agency>,
    agency_index: HashMap<String, u16>,
    groups: Vec<Group>,
    purposes: Vec<String>,
    roles: Vec<String>,
    rules: Vec<CompiledRule>,
    routes: compile::Routes,
    calendar: Calendar,
    envelope: prost_reflect::MessageDescriptor,
    /// The envelope's message types compiled for building copies.
    wire: fields::WirePlan,
    /// The mask of a refusal: routing facts only (used to list what a refused message held).
    routing_mask: Arc<MaskNode>,
    tests: Vec<testing::LoadedTest>,
    warnings: Vec<Diagnostic>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PolicySet")
            .field("hash", &self.hash)
            .field("agencies", &self.agencies.len())
            .field("rules", &self.rules.len())
            .field("routes", &self.routes.len())
            .finish()
    }
}

/// An agency in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agency {
    pub id: String,
    pub name: String,
    pub kind: AgencyKind,
    pub groups: Vec<String>,
    pub description: Option<String>,
}

/// A named group of agencies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub id: String,
    pub name: String,
}

/// One request for a decision: may `sender` send this envelope to `recipient`, and what may the recipient see?
#[derive(Clone, Copy, Debug)]
pub struct DecisionRequest<'a> {
    /// Agency id from the client certificate (never from the message).
    pub sender: &'a str,
    /// The sending practitioner (token subject).
    pub sender_practitioner: &'a str,
    /// Roles from the practitioner's token.
    pub sender_roles: &'a [String],
    /// One recipient agency id named in the envelope.
    pub recipient: &'a str,
    pub envelope: &'a proto::pb::Envelope,
    /// `envelope` encoded, when the caller has it (a send encodes its envelope once for all its recipients); the
    /// decision lists the withheld fields from these bytes, so they must be `envelope`'s. `None`: encoded here.
    pub encoded_envelope: Option<&'a [u8]>,
    pub now: time::OffsetDateTime,
}

/// Why a decision came out as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    Permitted,
    NoMatchingRule,
    Forbidden,
    UnknownSender,
    UnknownRecipient,
    UnknownKind,
    UnknownPurpose,
    RecipientNotNamed,
    KindBodyMismatch,
    AgreementRequired,
    OverrideNotAllowed,
    OverrideIncomplete,
    OverrideNotAuthorised,
    MissingFact,
    InvalidFact,
    RoleNotAllowed,
    ConditionFailed,
    OutsideValidityWindow,
    EvaluationError,
}

impl ReasonCode {
    /// Every code, in a fixed order.
    pub const ALL: [ReasonCode; 19] = [
        ReasonCode::Permitted,
        ReasonCode::NoMatchingRule,
        ReasonCode::Forbidden,
        ReasonCode::UnknownSender,
        ReasonCode::UnknownRecipient,
        ReasonCode::UnknownKind,
        ReasonCode::UnknownPurpose,
        ReasonCode::RecipientNotNamed,
        ReasonCode::KindBodyMismatch,
        ReasonCode::AgreementRequired,
        ReasonCode::OverrideNotAllowed,
        ReasonCode::OverrideIncomplete,
        ReasonCode::OverrideNotAuthorised,
        ReasonCode::MissingFact,
        ReasonCode::InvalidFact,
        ReasonCode::RoleNotAllowed,
        ReasonCode::ConditionFailed,
        ReasonCode::OutsideValidityWindow,
        ReasonCode::EvaluationError,
    ];

    /// The machine-readable code carried in receipts, gRPC error details and audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::Permitted => "permitted",
            ReasonCode::NoMatchingRule => "no-matching-rule",
            ReasonCode::Forbidden => "forbidden",
            ReasonCode::UnknownSender => "unknown-sender",
            ReasonCode::UnknownRecipient => "unknown-recipient",
            ReasonCode::UnknownKind => "unknown-kind",
            ReasonCode::UnknownPurpose => "unknown-purpose",
            ReasonCode::RecipientNotNamed => "recipient-not-named",
            ReasonCode::KindBodyMismatch => "kind-body-mismatch",
            ReasonCode::AgreementRequired => "agreement-required",
            ReasonCode::OverrideNotAllowed => "override-not-allowed",
            ReasonCode::OverrideIncomplete => "override-incomplete",
            ReasonCode::OverrideNotAuthorised => "override-not-authorised",
            ReasonCode::MissingFact => "missing-fact",
            ReasonCode::InvalidFact => "invalid-fact",
            ReasonCode::RoleNotAllowed => "role-not-allowed",
            ReasonCode::ConditionFailed => "condition-failed",
            ReasonCode::OutsideValidityWindow => "outside-validity-window",
            ReasonCode::EvaluationError => "evaluation-error",
        }
    }

    /// The code for a machine-readable string.
    pub fn parse(text: &str) -> Option<ReasonCode> {
        ReasonCode::ALL.into_iter().find(|code| code.as_str() == text)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// An acknowledgement deadline, measured from delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Deadline {
    Within(std::time::Duration),
    WorkingDays(u32),
    SchoolDays(u32),
    BeforeNextSchoolDay,
}

impl fmt::Display for Deadline {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Deadline::Within(duration) => {
                let minutes = duration.as_secs() / 60;
                if minutes % 60 == 0 {
                    write!(formatter, "within {} hours", minutes / 60)
                } else {
                    write!(formatter, "within {minutes} minutes")
                }
            }
            Deadline::WorkingDays(days) => write!(formatter, "within {days} working days"),
            Deadline::SchoolDays(days) => write!(formatter, "within {days} school days"),
            Deadline::BeforeNextSchoolDay => formatter.write_str("before the next school day"),
        }
    }
}

/// What the recipient and the broker must do with a permitted message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Obligations {
    pub acknowledge_within: Option<Deadline>,
    pub retention_class: Option<String>,
    /// Whether the recipient may pass the information on.
    pub onward_disclosure: bool,
    /// Agency id that receives an escalation notice when the acknowledgement deadline passes.
    pub escalate_to: Option<String>,
    /// The rule whose deadline this is (named in escalations).
    pub deadline_rule: Option<String>,
}

/// A family-agreement override (break-glass) that a permitted decision relied on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverrideUsed {
    /// `not-sought` or `refused-overridden`.
    pub agreement_state: String,
    /// The override reason code (for example `risk-of-significant-harm`).
    pub reason: String,
    /// The practitioner's justification, as given in the envelope.
    pub justification: String,
    /// The practitioner (token subject) who authorised the override.
    pub authorised_by: String,
    /// The practitioner who sent the message.
    pub sent_by: String,
}

/// The outcome of [`PolicySet::decide`]: a value, never an error.
#[derive(Clone, Debug)]
pub struct Decision {
    pub permitted: bool,
    pub reason_code: ReasonCode,
    /// Plain English, with no personal data.
    pub explanation: String,
    /// The deciding rules: the permits that applied, or the forbids, or the nearest rule of a refusal.
    pub rule_ids: Vec<String>,
    pub lawful_basis: Vec<String>,
    /// Field paths the copy will hold (including the routing facts).
    pub fields_shared: Vec<String>,
    /// Field paths present in the message that the copy will not hold.
    pub fields_withheld: Vec<String>,
    pub obligations: Obligations,
    pub override_used: Option<OverrideUsed>,
    pub policy_set_hash: String,
    /// The compiled mask that [`PolicySet::build_copy`] builds the copy from; `None` on a refusal.
    pub(crate) mask: Option<Arc<MaskNode>>,
}

impl Decision {
    /// Whether the recipient's copy would hold the field at `path` (itself or through a parent shared whole).
    pub fn is_visible(&self, path: &str) -> bool {
        let Some(mask) = &self.mask else {
            return false;
        };
        match fields::resolve_path(&mask.message, path) {
            Ok(resolved) => mask.covers(&resolved),
            Err(_) => false,
        }
    }
}

/// Severity of a diagnostic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a policy directory, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(formatter, "{}:{}:{}: {severity}{}", self.file.display(), self.line, self.column, self.message)
    }
}

/// Every problem that stopped a policy directory from loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyErrors {
    /// Errors first, then warnings, each sorted by file and position.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyErrors {
    /// The errors only.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|diagnostic| diagnostic.severity == Severity::Error)
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.errors().count();
        writeln!(formatter, "the policy set has {count} error{}", if count == 1 { "" } else { "s" })?;
        for diagnostic in &self.diagnostics {
            writeln!(formatter, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl PolicySet {
    /// Reads, validates and compiles every policy file (`*.yaml`, `*.yml`, in `dir` and its subdirectories);
    /// reports every problem at once.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
        load::load_dir(dir)
    }

    /// Validates and compiles policy files already read: `(file name, text)` pairs. Does no I/O (test cases that
    /// name an `envelope_file` are resolved against `base_dir` by reading it).
    pub fn load_files(files: &[(PathBuf, String)], base_dir: &Path) -> Result<PolicySet, PolicyErrors> {
        load::load_files(files, base_dir)
    }

    /// Hex SHA-256 of the canonical compiled set (test cases excluded); audit entries name it.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn agencies(&self) -> impl Iterator<Item = &Agency> {
        self.agencies.iter()
    }

    pub fn agency(&self, id: &str) -> Option<&Agency> {
        self.agency_index.get(id).and_then(|index| self.agencies.get(usize::from(*index)))
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    /// The declared purpose codes, sorted.
    pub fn purposes(&self) -> &[String] {
        &self.purposes
    }

    /// The declared roles, sorted.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    /// The ids of every rule, sorted.
    pub fn rule_ids(&self) -> Vec<&str> {
        self.rules.iter().map(|rule| rule.id.as_str()).collect()
    }

    pub fn calendar(&self) -> &Calendar {
        &self.calendar
    }

    /// Warnings found while loading (the set loaded; they did not stop it).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }

    /// The ids of the rules that withhold fields on the route of `request` (empty if the route is unknown).
    pub fn withholders_for(&self, request: &DecisionRequest<'_>) -> Vec<&str> {
        let (Some(sender), Some(recipient), Some(kind)) = (
            self.agency_index.get(request.sender),
            self.agency_index.get(request.recipient),
            KindName::from_proto(request.envelope.kind),
        ) else {
            return Vec::new();
        };
        self.routes
            .get(*sender, *recipient, kind)
            .map(|entry| entry.withholders.iter().map(|index| self.rules[*index].id.as_str()).collect())
            .unwrap_or_default()
    }

    /// Decides one request. Never panics and never errors: any problem becomes a refusal with a reason code.
    pub fn decide(&self, request: &DecisionRequest<'_>) -> Decision {
        decide::decide(self, request)
    }

    /// Builds the recipient's copy from the allowed field paths of `decision` only, recursively, driven by the
    /// prost-reflect descriptors: fields not allowed, and fields the descriptors do not know, can never reach it.
    /// Nothing is copied and then cleared: the copy starts empty and only allowed fields are written.
    pub fn build_copy(
        &self,
        envelope: &proto::pb::Envelope,
        decision: &Decision,
    ) -> Result<proto::pb::Envelope, CopyError> {
        copy::build_copy(&self.wire, envelope, decision)
    }

    /// [`PolicySet::build_copy`] on an encoded envelope, giving the encoded copy: what a send does, having encoded
    /// its envelope once for all its recipients. `encoded` must be the envelope the decision was made on.
    pub fn build_copy_encoded(&self, encoded: &[u8], decision: &Decision) -> Result<Vec<u8>, CopyError> {
        copy::build_copy_encoded(&self.wire, encoded, decision)
    }

    /// The same copy built over prost-reflect `DynamicMessage`s (the reference implementation; slower).
    pub fn build_copy_dynamic(
        &self,
        envelope: &proto::pb::Envelope,
        decision: &Decision,
    ) -> Result<proto::pb::Envelope, CopyError> {
        copy::build_copy_dynamic(&self.envelope, envelope, decision)
    }

    /// When an acknowledgement deadline expires, given the delivery time.
    pub fn deadline_at(&self, deadline: &Deadline, from: time::OffsetDateTime) -> time::OffsetDateTime {
        self.calendar.deadline_at(deadline, from)
    }
}

#[cfg(test)]
mod tests;
