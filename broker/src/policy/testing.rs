//! Policy test cases: YAML cases kept beside the policies (`tests:` sections), run against the compiled set.
//!
//! A case pins the time and gives the sender, its practitioner's roles, the recipient, and a message: a sample
//! envelope in the proto3 JSON mapping, facts (kind, purpose, urgency, date of birth, roles, agreement), or both
//! (facts override the envelope). It expects a decision, and optionally the reason code, the deciding rules, the
//! fields shared, fields that must be visible or hidden, the lawful bases, the obligations and the deadline. The
//! report lists every failed expectation and the rules that no case exercised.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use prost::Message;
use prost_reflect::{DynamicMessage, MessageDescriptor};
use proto::pb;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::compile::SourceFile;
use super::fields::{self, ROUTING_FACTS};
use super::model::{AgreementStateName, ExpectedDecision, KindName, Located, TestCase, TestExpectation};
use super::{DecisionRequest, Diagnostic, PolicySet, ReasonCode, Severity, calendar};

/// A test case ready to run.
#[derive(Clone, Debug)]
pub struct LoadedTest {
    pub name: String,
    pub file: PathBuf,
    pub line: u64,
    pub now: OffsetDateTime,
    pub sender: String,
    pub practitioner: String,
    pub roles: Vec<String>,
    pub recipient: String,
    pub envelope: pb::Envelope,
    pub expect: TestExpectation,
}

/// The result of one case.
#[derive(Clone, Debug)]
pub struct TestResult {
    pub name: String,
    pub file: PathBuf,
    pub line: u64,
    /// Every expectation that did not hold; empty when the case passed.
    pub failures: Vec<String>,
}

impl TestResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The result of running every case of a policy set.
#[derive(Clone, Debug)]
pub struct TestReport {
    pub results: Vec<TestResult>,
    /// Rules that no case named among its deciding rules, sorted.
    pub unexercised_rules: Vec<String>,
}

impl TestReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|result| result.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
}

/// Builds the body a kind carries, empty.
pub fn empty_body(kind: KindName) -> pb::envelope::Body {
    use pb::envelope::Body;
    match kind {
        KindName::Referral => Body::Referral(Default::default()),
        KindName::DomesticAbuseNotification => Body::DomesticAbuseIncident(Default::default()),
        KindName::PublicProtectionNotice => Body::PublicProtectionNotice(Default::default()),
        KindName::ReferralAcknowledgement | KindName::OutcomeFeedback => Body::ReferralOutcome(Default::default()),
        KindName::InformationRequest => Body::InformationRequest(Default::default()),
        KindName::InformationResponse => Body::InformationResponse(Default::default()),
        KindName::StrategyDiscussion | KindName::Conference | KindName::FamilyNetworkMeeting => {
            Body::Meeting(Default::default())
        }
        KindName::PlanStatusNotification => Body::PlanStatus(Default::default()),
        KindName::UnscheduledCareAttendance | KindName::EmergencyAttendance => Body::CareAttendance(Default::default()),
        KindName::FamilyHelpRequest => Body::FamilyHelpRequest(Default::default()),
        KindName::MissingEpisode => Body::MissingEpisode(Default::default()),
        KindName::RecordTransfer => Body::RecordTransfer(Default::default()),
        KindName::CaseClosure => Body::CaseClosure(Default::default()),
        KindName::EscalationNotice => Body::Escalation(Default::default()),
    }
}

/// Reads an envelope written in the proto3 JSON mapping.
pub fn envelope_from_json(descriptor: &MessageDescriptor, value: serde_json::Value) -> Result<pb::Envelope, String> {
    let dynamic = DynamicMessage::deserialize(descriptor.clone(), value).map_err(|error| error.to_string())?;
    pb::Envelope::decode(dynamic.encode_to_vec().as_slice()).map_err(|error| error.to_string())
}

pub fn prepare_tests(
    sources: &[SourceFile],
    base_dir: &Path,
    agency_index: &HashMap<String, u16>,
    rule_ids: &BTreeSet<String>,
    descriptor: &MessageDescriptor,
) -> Result<Vec<LoadedTest>, Vec<Diagnostic>> {
    let _ = (base_dir, agency_index);
    let mut problems = Vec::new();
    let mut tests = Vec::new();
    for source in sources {
        for case in &source.file.tests {
            match prepare_test(&source.path, case, rule_ids, descriptor) {
                Ok(test) => tests.push(test),
                Err(mut found) => problems.append(&mut found),
            }
        }
    }
    if problems.is_empty() { Ok(tests) } else { Err(problems) }
}

fn problem<T>(file: &Path, at: &Located<T>, message: String) -> Diagnostic {
    Diagnostic { file: file.to_path_buf(), line: at.line, column: at.column, severity: Severity::Error, message }
}

fn prepare_test(
    file: &Path,
    case: &Located<TestCase>,
    rule_ids: &BTreeSet<String>,
    descriptor: &MessageDescriptor,
) -> Result<LoadedTest, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let test = &case.value;
    let now = OffsetDateTime::parse(&test.now.value, &Rfc3339).map_err(|_| {
        vec![problem(
            file,
            &test.now,
            format!("`{}` is not an RFC 3339 time (for example `2026-03-02T21:15:00Z`)", test.now.value),
        )]
    });
    let mut envelope = pb::Envelope::default();
    if let Some(json) = &test.envelope {
        match envelope_from_json(descriptor, json.clone()) {
            Ok(read) => envelope = read,
            Err(error) => problems.push(problem(file, case, format!("test `{}`: bad `envelope`: {error}", test.name))),
        }
    }
    if let Some(relative) = &test.envelope_file {
        let path = file.parent().unwrap_or(Path::new(".")).join(&relative.value);
        let read = std::fs::read_to_string(&path)
            .map_err(|error| error.to_string())
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).map_err(|error| error.to_string()))
            .and_then(|value| envelope_from_json(descriptor, value));
        match read {
            Ok(read) => envelope = read,
            Err(error) => problems.push(problem(
                file,
                relative,
                format!("cannot read envelope file `{}`: {error}", relative.value),
            )),
        }
    }
    if let Some(kind) = test.kind {
        envelope.kind = kind.proto_value();
        if envelope.body.is_none() {
            envelope.body = Some(empty_body(kind));
        }
    }
    if let Some(purpose) = &test.purpose {
        envelope.purpose = purpose.clone();
    }
    if envelope.recipients.is_empty() {
        envelope.recipients.push(test.recipient.value.clone());
    }
    if let Some(facts) = &test.facts {
        if let Some(urgency) = facts.urgency {
            envelope.urgency = urgency.proto_value();
        }
        if let Some(role) = &facts.sender_role {
            envelope.sender_role = role.clone();
        }
        if let Some(role) = &facts.recipient_role {
            envelope.recipient_role = role.clone();
        }
        if let Some(text) = &facts.date_of_birth {
            match calendar::parse_date(text) {
                Some(date) => {
                    envelope.subject.get_or_insert_with(Default::default).date_of_birth = Some(pb::Date {
                        year: date.year(),
                        month: i32::from(date.month() as u8),
                        day: i32::from(date.day()),
                    });
                }
                None => problems.push(problem(
                    file,
                    case,
                    format!("test `{}`: `date_of_birth` `{text}` is not a date (`YYYY-MM-DD`)", test.name),
                )),
            }
        }
        if let Some(agreement) = &facts.agreement {
            let target = envelope.agreement.get_or_insert_with(Default::default);
            target.state = agreement.state.proto_value();
            if agreement.state == AgreementStateName::Agreed && target.agreed_by.is_empty() {
                target.agreed_by = "family".to_owned();
            }
            if let Some(reason) = agreement.override_reason {
                target.override_reason = reason.proto_value();
            }
            if let Some(text) = &agreement.justification {
                target.justification = text.clone();
            }
            if let Some(who) = &agreement.authorised_by {
                target.authorised_by = who.clone();
            }
        }
    }
    let expect = &test.expect.value;
    if let Some(reason) = &expect.reason
        && ReasonCode::parse(reason).is_none()
    {
        let known: Vec<String> = ReasonCode::ALL.iter().map(|code| code.as_str().to_owned()).collect();
        let hint =
            fields::nearest_name(reason, &known).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default();
        problems.push(problem(file, &test.expect, format!("unknown reason code `{reason}`{hint}")));
    }
    for rule in expect.rules.iter().flatten() {
        if !rule_ids.contains(rule) {
            let known: Vec<String> = rule_ids.iter().cloned().collect();
            let hint =
                fields::nearest_name(rule, &known).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default();
            problems.push(problem(
                file,
                &test.expect,
                format!("test `{}` expects unknown rule `{rule}`{hint}", test.name),
            ));
        }
    }
    for path in expect.visible.iter().chain(&expect.hidden).chain(expect.fields_shared.iter().flatten()) {
        if let Err(error) = fields::resolve_path(descriptor, path) {
            problems.push(problem(file, &test.expect, error.message));
        }
    }
    if let Some(deadline) = &expect.deadline
        && OffsetDateTime::parse(deadline, &Rfc3339).is_err()
    {
        problems.push(problem(file, &test.expect, format!("expected deadline `{deadline}` is not an RFC 3339 time")));
    }
    let now = match now {
        Ok(now) => now,
        Err(mut found) => {
            problems.append(&mut found);
            return Err(problems);
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(LoadedTest {
        name: test.name.clone(),
        file: file.to_path_buf(),
        line: case.line,
        now,
        sender: test.sender.value.clone(),
        practitioner: test.practitioner.clone(),
        roles: test.roles.clone(),
        recipient: test.recipient.value.clone(),
        envelope,
        expect: expect.clone(),
    })
}

impl PolicySet {
    /// The test cases loaded with the set.
    pub fn tests(&self) -> &[LoadedTest] {
        &self.tests
    }

    /// Runs every test case loaded with the set.
    pub fn run_tests(&self) -> TestReport {
        let mut exercised: BTreeSet<String> = BTreeSet::new();
        let mut results = Vec::new();
        for test in &self.tests {
            let request = DecisionRequest {
                sender: &test.sender,
                sender_practitioner: &test.practitioner,
                sender_roles: &test.roles,
                recipient: &test.recipient,
                envelope: &test.envelope,
                encoded_envelope: None,
                now: test.now,
            };
            let decision = self.decide(&request);
            exercised.extend(decision.rule_ids.iter().cloned());
            // Withhold rules never decide, but they were in force on this route: count them as exercised.
            exercised.extend(self.withholders_for(&request).into_iter().map(str::to_owned));
            let failures = check_expectation(self, test, &decision);
            results.push(TestResult { name: test.name.clone(), file: test.file.clone(), line: test.line, failures });
        }
        let unexercised_rules =
            self.rules.iter().filter(|rule| !exercised.contains(&rule.id)).map(|rule| rule.id.clone()).collect();
        TestReport { results, unexercised_rules }
    }
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().collect();
    items.sort();
    items.dedup();
    items
}

fn check_expectation(set: &PolicySet, test: &LoadedTest, decision: &super::Decision) -> Vec<String> {
    let expect = &test.expect;
    let mut failures = Vec::new();
    let permitted = expect.decision == ExpectedDecision::Permit;
    if decision.permitted != permitted {
        failures.push(format!(
            "expected {}, got {} (`{}`: {})",
            if permitted { "permit" } else { "deny" },
            if decision.permitted { "permit" } else { "deny" },
            decision.reason_code,
            decision.explanation
        ));
    }
    if let Some(reason) = &expect.reason
        && decision.reason_code.as_str() != reason
    {
        failures.push(format!("expected reason `{reason}`, got `{}` ({})", decision.reason_code, decision.explanation));
    }
    if let Some(rules) = &expect.rules {
        let wanted = sorted(rules.iter().cloned());
        let got = sorted(decision.rule_ids.iter().cloned());
        if wanted != got {
            failures.push(format!("expected deciding rules [{}], got [{}]", wanted.join(", "), got.join(", ")));
        }
    }
    if let Some(shared) = &expect.fields_shared {
        let not_routing = |path: &String| !ROUTING_FACTS.contains(&path.as_str());
        let wanted = sorted(shared.iter().filter(|path| not_routing(path)).cloned());
        let got = sorted(decision.fields_shared.iter().filter(|path| not_routing(path)).cloned());
        if wanted != got {
            let missing: Vec<&String> = wanted.iter().filter(|path| !got.contains(path)).collect();
            let extra: Vec<&String> = got.iter().filter(|path| !wanted.contains(path)).collect();
            failures.push(format!(
                "fields shared differ: expected but not shared [{}], shared but not expected [{}]",
                missing.iter().map(|path| path.as_str()).collect::<Vec<_>>().join(", "),
                extra.iter().map(|path| path.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for path in &expect.visible {
        if !decision.is_visible(path) {
            failures.push(format!("expected `{path}` to be visible to the recipient, and it is not"));
        }
    }
    for path in &expect.hidden {
        let touched = decision.mask.as_ref().is_some_and(|mask| {
            fields::resolve_path(&mask.message, path).is_ok_and(|resolved| mask.touches(&resolved))
        });
        if touched {
            failures.push(format!("expected `{path}` to be hidden from the recipient, and it is (partly) visible"));
        }
    }
    if let Some(bases) = &expect.lawful_basis {
        let wanted = sorted(bases.iter().map(|basis| basis.as_str().to_owned()));
        let got = sorted(decision.lawful_basis.iter().cloned());
        if wanted != got {
            failures.push(format!("expected lawful basis [{}], got [{}]", wanted.join(", "), got.join(", ")));
        }
    }
    if let Some(wanted) = &expect.obligations {
        let got = &decision.obligations;
        if let Some(within) = wanted.acknowledge_within {
            let expected = super::compile::deadline_of(within);
            if got.acknowledge_within != Some(expected) {
                failures.push(format!(
                    "expected acknowledgement {expected}, got {}",
                    got.acknowledge_within.map(|deadline| deadline.to_string()).unwrap_or_else(|| "none".to_owned())
                ));
            }
        }
        if let Some(class) = &wanted.retention_class
            && got.retention_class.as_ref() != Some(class)
        {
            failures.push(format!(
                "expected retention class `{class}`, got `{}`",
                got.retention_class.clone().unwrap_or_default()
            ));
        }
        if let Some(onward) = wanted.onward_disclosure
            && got.onward_disclosure != onward
        {
            failures.push(format!("expected onward disclosure {onward}, got {}", got.onward_disclosure));
        }
        if let Some(target) = &wanted.escalate_to
            && got.escalate_to.as_ref() != Some(target)
        {
            failures.push(format!(
                "expected escalation to `{target}`, got `{}`",
                got.escalate_to.clone().unwrap_or_default()
            ));
        }
    }
    if let Some(deadline) = &expect.deadline {
        let wanted = OffsetDateTime::parse(deadline, &Rfc3339).ok();
        let got = decision.obligations.acknowledge_within.map(|within| set.deadline_at(&within, test.now));
        if wanted != got {
            failures.push(format!(
                "expected deadline {deadline}, got {}",
                got.and_then(|at| at.format(&Rfc3339).ok()).unwrap_or_else(|| "none".to_owned())
            ));
        }
    }
    if let Some(expected) = expect.override_used
        && decision.override_used.is_some() != expected
    {
        failures.push(format!(
            "expected an override {}, and there was {}",
            if expected { "to be used" } else { "not to be used" },
            if decision.override_used.is_some() { "one" } else { "none" }
        ));
    }
    failures
}
