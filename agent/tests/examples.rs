//! Every sample message in `examples/` parses as an envelope, is the flow the README says, and carries the fields
//! that show the policy's withholding.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use agent::{envelope_to_json, read_envelope_json};
use proto::pb::{self, envelope::Body};

fn examples_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn read_example(name: &str) -> pb::Envelope {
    let bytes = std::fs::read(examples_folder().join(name)).unwrap();
    read_envelope_json(&bytes).unwrap_or_else(|error| panic!("{name}: {error}"))
}

#[test]
fn every_example_parses_as_an_envelope_and_round_trips() {
    let mut count = 0;
    for entry in std::fs::read_dir(examples_folder()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|extension| extension.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let envelope = read_envelope_json(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        assert!(envelope.idempotency_key.is_empty(), "{}: leave idempotency_key out", path.display());
        assert!(envelope.body.is_some(), "{}: no body", path.display());
        assert!(!envelope.recipients.is_empty(), "{}: no recipients", path.display());
        let written = envelope_to_json(&envelope).unwrap();
        assert_eq!(read_envelope_json(&written).unwrap(), envelope, "{}", path.display());
        count += 1;
    }
    assert!(count >= 4, "expected at least four examples, found {count}");
}

#[test]
fn operation_encompass_example() {
    let envelope = read_example("operation-encompass-notification.json");
    assert_eq!(envelope.kind, pb::MessageKind::DomesticAbuseNotification as i32);
    assert_eq!(envelope.purpose, "operation-encompass");
    assert_eq!(envelope.recipients, ["luton-oakwood-primary"]);
    assert_eq!((envelope.sender_role.as_str(), envelope.recipient_role.as_str()), ("spoc", "dsl"));
    let Some(Body::DomesticAbuseIncident(incident)) = envelope.body else { panic!("wrong body") };
    assert!(!incident.crime_report.is_empty() && !incident.criminal_history.is_empty());
}

#[test]
fn school_referral_example() {
    let envelope = read_example("school-referral-to-front-door.json");
    assert_eq!(envelope.kind, pb::MessageKind::Referral as i32);
    assert_eq!(envelope.purpose, "safeguarding-referral");
    assert_eq!(envelope.recipients, ["luton-csc"]);
    let agreement = envelope.agreement.unwrap();
    assert_eq!(agreement.state, pb::AgreementState::NotSought as i32);
    assert_eq!(agreement.override_reason, pb::OverrideReason::RiskOfSignificantHarm as i32);
    assert!(!agreement.justification.is_empty());
    assert!(matches!(envelope.body, Some(Body::Referral(_))));
}

#[test]
fn outcome_feedback_example() {
    let envelope = read_example("referral-outcome-feedback.json");
    assert_eq!(envelope.kind, pb::MessageKind::OutcomeFeedback as i32);
    assert_eq!(envelope.purpose, "referral-feedback");
    assert_eq!(envelope.recipients, ["luton-oakwood-primary"]);
    let Some(Body::ReferralOutcome(outcome)) = envelope.body else { panic!("wrong body") };
    assert!(!outcome.assessment_notes.is_empty());
    assert_eq!(outcome.referral_message_id, envelope.correlation_id);
}

#[test]
fn plan_status_example() {
    let envelope = read_example("child-protection-plan-notification.json");
    assert_eq!(envelope.kind, pb::MessageKind::PlanStatusNotification as i32);
    assert_eq!(envelope.purpose, "child-protection-plan-notification");
    assert_eq!(envelope.recipients, ["ldh-hospital", "luton-oakwood-primary"]);
    let Some(Body::PlanStatus(plan)) = envelope.body else { panic!("wrong body") };
    assert!(!plan.placement_address.is_empty());
}
