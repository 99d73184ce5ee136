//! The `broker policy ...` subcommands for information-governance leads: validate, test, explain, diff, matrix and
//! schema. Each prints plain text for people and returns the process exit code; `anyhow` is used here only.
//!
//! Exit codes: 0 success (explain: permitted); 1 policy problems, failing tests, or (explain) refused; 2 bad
//! command-line input or unreadable files; 3 (`diff --fail-on-new-access`) the new set grants new access.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::model::{AgreementStateName, KindName, OverrideReasonName, UrgencyName};
use super::{DecisionRequest, PolicySet, Severity, calendar, diff, matrix, model, testing};

/// `broker policy ...`
#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Check every policy file in DIR and report every problem at once (file:line:column)
    Validate {
        /// The policy directory (for example `policies/`)
        dir: PathBuf,
    },
    /// Run the YAML test cases kept beside the policies and list rules no test exercises
    Test {
        dir: PathBuf,
        /// Also fail when some rule is exercised by no test
        #[arg(long)]
        require_coverage: bool,
    },
    /// May A send K to B for P, with these facts, at this time, and what would B see?
    Explain(Box<ExplainArgs>),
    /// Say exactly what a change does: routes newly allowed or refused, fields newly visible or hidden, obligations
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Exit with code 3 if the new set allows anything the old did not
        #[arg(long)]
        fail_on_new_access: bool,
    },
    /// Write the data-flow matrix (senders x recipients per kind) as an HTML page
    Matrix {
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the JSON Schema of policy files (policies/policy.schema.json)
    Schema {
        /// Write it to this file instead of standard output
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The facts of an `explain` question.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The policy directory
    pub dir: PathBuf,
    /// The sending agency id
    #[arg(long)]
    pub from: String,
    /// The recipient agency id
    #[arg(long)]
    pub to: String,
    /// The message kind (for example `referral`, `domestic-abuse-notification`)
    #[arg(long)]
    pub kind: Option<String>,
    /// The purpose code
    #[arg(long)]
    pub purpose: Option<String>,
    /// A role in the sending practitioner's token (repeatable)
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// The role the sender acts in (`Envelope.sender_role`)
    #[arg(long)]
    pub sender_role: Option<String>,
    /// The role the message is addressed to (`Envelope.recipient_role`)
    #[arg(long)]
    pub recipient_role: Option<String>,
    /// `routine`, `priority` or `immediate`
    #[arg(long)]
    pub urgency: Option<String>,
    /// The child's date of birth, YYYY-MM-DD
    #[arg(long)]
    pub date_of_birth: Option<String>,
    /// `agreed`, `informed-not-asked`, `not-sought` or `refused-overridden`
    #[arg(long)]
    pub agreement: Option<String>,
    /// For an override: `risk-of-significant-harm`, `seeking-would-increase-risk`,
    /// `would-prejudice-criminal-investigation` or `emergency`
    #[arg(long)]
    pub override_reason: Option<String>,
    #[arg(long)]
    pub justification: Option<String>,
    #[arg(long)]
    pub authorised_by: Option<String>,
    /// The decision time, RFC 3339 (default: now)
    #[arg(long)]
    pub at: Option<String>,
    /// A sample envelope in the proto3 JSON mapping; the options above override its facts
    #[arg(long)]
    pub envelope: Option<PathBuf>,
}

/// Runs a subcommand, printing to standard output; returns the process exit code.
pub fn run(command: &PolicyCommand) -> i32 {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match run_to(command, &mut out) {
        Ok(code) => code,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "error: {}", crate::error_report(&error));
            2
        }
    }
}

/// Runs a subcommand, writing its human output to `out`; returns the process exit code.
pub fn run_to(command: &PolicyCommand, out: &mut dyn Write) -> anyhow::Result<i32> {
    match command {
        PolicyCommand::Validate { dir } => validate(dir, out),
        PolicyCommand::Test { dir, require_coverage } => test(dir, *require_coverage, out),
        PolicyCommand::Explain(args) => explain(args, out),
        PolicyCommand::Diff { old, new, fail_on_new_access } => {
            let (Some(old_set), Some(new_set)) = (load_or_report(old, out)?, load_or_report(new, out)?) else {
                return Ok(1);
            };
            let report = diff::diff(&old_set, &new_set);
            write!(out, "{}", report.to_text())?;
            Ok(if *fail_on_new_access && report.grants_new_access() { 3 } else { 0 })
        }
        PolicyCommand::Matrix { dir, out: file } => {
            let Some(set) = load_or_report(dir, out)? else {
                return Ok(1);
            };
            std::fs::write(file, matrix::render_html(&set))
                .with_context(|| format!("cannot write `{}`", file.display()))?;
            writeln!(out, "wrote the data-flow matrix to {}", file.display())?;
            Ok(0)
        }
        PolicyCommand::Schema { out: file } => {
            let schema = model::policy_file_schema_json();
            match file {
                Some(file) => {
                    std::fs::write(file, schema).with_context(|| format!("cannot write `{}`", file.display()))?
                }
                None => write!(out, "{schema}")?,
            }
            Ok(0)
        }
    }
}

fn load_or_report(dir: &Path, out: &mut dyn Write) -> anyhow::Result<Option<PolicySet>> {
    match PolicySet::load_dir(dir) {
        Ok(set) => Ok(Some(set)),
        Err(errors) => {
            write!(out, "{errors}")?;
            Ok(None)
        }
    }
}

fn validate(dir: &Path, out: &mut dyn Write) -> anyhow::Result<i32> {
    match PolicySet::load_dir(dir) {
        Ok(set) => {
            for warning in set.warnings().iter().filter(|diagnostic| diagnostic.severity == Severity::Warning) {
                writeln!(out, "{warning}")?;
            }
            writeln!(
                out,
                "ok: {} agencies, {} rules, {} test cases; policy set {}",
                set.agencies().count(),
                set.rule_ids().len(),
                set.tests().len(),
                set.hash()
            )?;
            Ok(0)
        }
        Err(errors) => {
            write!(out, "{errors}")?;
            Ok(1)
        }
    }
}

fn test(dir: &Path, require_coverage: bool, out: &mut dyn Write) -> anyhow::Result<i32> {
    let Some(set) = load_or_report(dir, out)? else {
        return Ok(1);
    };
    let report: testing::TestReport = set.run_tests();
    for result in &report.results {
        if result.passed() {
            writeln!(out, "ok   {}", result.name)?;
        } else {
            writeln!(out, "FAIL {}:{}: {}", result.file.display(), result.line, result.name)?;
            for failure in &result.failures {
                writeln!(out, "       {failure}")?;
            }
        }
    }
    if !report.unexercised_rules.is_empty() {
        writeln!(out, "rules no test exercises: {}", report.unexercised_rules.join(", "))?;
    }
    writeln!(out, "{} passed, {} failed", report.passed(), report.failed())?;
    let uncovered = require_coverage && !report.unexercised_rules.is_empty();
    Ok(if report.failed() > 0 || uncovered { 1 } else { 0 })
}

fn parse_named<T: Copy>(what: &str, given: &str, all: &[T], name: fn(T) -> &'static str) -> anyhow::Result<T> {
    all.iter().copied().find(|item| name(*item) == given).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|item| name(*item)).collect();
        anyhow::anyhow!("unknown {what} `{given}`; expected one of: {}", names.join(", "))
    })
}

fn explain(args: &ExplainArgs, out: &mut dyn Write) -> anyhow::Result<i32> {
    let Some(set) = load_or_report(&args.dir, out)? else {
        return Ok(1);
    };
    let descriptor = proto::descriptor_pool()
        .ok()
        .and_then(|pool| pool.get_message_by_name(proto::ENVELOPE_MESSAGE))
        .context("the broker's message descriptors could not be read")?;
    let mut envelope = match &args.envelope {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read `{}`", file.display()))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", file.display()))?;
            testing::envelope_from_json(&descriptor, value)
                .map_err(|error| anyhow::anyhow!("`{}` is not an envelope: {error}", file.display()))?
        }
        None => proto::pb::Envelope::default(),
    };
    if let Some(kind) = &args.kind {
        let kind = parse_named("kind", kind, &KindName::ALL, KindName::as_str)?;
        envelope.kind = kind.proto_value();
        if envelope.body.is_none() {
            envelope.body = Some(testing::empty_body(kind));
        }
    }
    if let Some(purpose) = &args.purpose {
        envelope.purpose = purpose.clone();
    }
    if envelope.recipients.is_empty() {
        envelope.recipients.push(args.to.clone());
    }
    if let Some(role) = &args.sender_role {
        envelope.sender_role = role.clone();
    }
    if let Some(role) = &args.recipient_role {
        envelope.recipient_role = role.clone();
    }
    if let Some(urgency) = &args.urgency {
        envelope.urgency = parse_named("urgency", urgency, &UrgencyName::ALL, UrgencyName::as_str)?.proto_value();
    }
    if let Some(text) = &args.date_of_birth {
        let date = calendar::parse_date(text).with_context(|| format!("`{text}` is not a date (YYYY-MM-DD)"))?;
        envelope.subject.get_or_insert_with(Default::default).date_of_birth = Some(proto::pb::Date {
            year: date.year(),
            month: i32::from(date.month() as u8),
            day: i32::from(date.day()),
        });
    }
    if let Some(state) = &args.agreement {
        const STATES: [AgreementStateName; 4] = [
            AgreementStateName::Agreed,
            AgreementStateName::InformedNotAsked,
            AgreementStateName::NotSought,
            AgreementStateName::RefusedOverridden,
        ];
        let state = parse_named("agreement state", state, &STATES, AgreementStateName::as_str)?;
        envelope.agreement.get_or_insert_with(Default::default).state = state.proto_value();
    }
    if let Some(reason) = &args.override_reason {
        let reason = parse_named("override reason", reason, &OverrideReasonName::ALL, OverrideReasonName::as_str)?;
        envelope.agreement.get_or_insert_with(Default::default).override_reason = reason.proto_value();
    }
    if let Some(text) = &args.justification {
        envelope.agreement.get_or_insert_with(Default::default).justification = text.clone();
    }
    if let Some(who) = &args.authorised_by {
        envelope.agreement.get_or_insert_with(Default::default).authorised_by = who.clone();
    }
    let now = match &args.at {
        Some(text) => OffsetDateTime::parse(text, &Rfc3339)
            .with_context(|| format!("`{text}` is not an RFC 3339 time (for example 2026-03-02T21:15:00Z)"))?,
        None => OffsetDateTime::now_utc(),
    };
    let explanation = set.explain(&DecisionRequest {
        sender: &args.from,
        sender_practitioner: "policy-explain",
        sender_roles: &args.roles,
        recipient: &args.to,
        envelope: &envelope,
        encoded_envelope: None,
        now,
    });
    write!(out, "{}", explanation.to_text())?;
    Ok(if explanation.decision.permitted { 0 } else { 1 })
}
