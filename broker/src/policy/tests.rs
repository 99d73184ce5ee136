//! Unit tests of the policy module: loading and validation, the decision semantics, the recipient copy, and the
//! sample Luton policy set in `policies/` with its own YAML test cases.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use prost::Message;
use proto::pb;
use time::macros::datetime;

use super::*;

fn policies_dir() -> PathBuf {
    // The module is built inside the broker crate (`broker/`, beside `policies/`) and, during development, through a
    // scratch crate two levels below the repository's parent; find `policies/` relative to either.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [manifest.join("../policies"), manifest.join("../../main/policies")];
    candidates.iter().find(|dir| dir.join("registry.yaml").exists()).cloned().unwrap_or_else(|| candidates[0].clone())
}

fn sample() -> PolicySet {
    match PolicySet::load_dir(&policies_dir()) {
        Ok(set) => set,
        Err(errors) => panic!("the sample policy set does not load:\n{errors}"),
    }
}

const REGISTRY: &str = r#"
agencies:
  - { id: police-a, name: Police A, kind: police }
  - { id: school-a, name: School A, kind: education, groups: [schools] }
  - { id: school-b, name: School B, kind: education, groups: [schools] }
  - { id: la-a, name: LA A, kind: local-authority }
  - { id: charity-a, name: Charity A, kind: voluntary-sector }
groups:
  - { id: schools, name: Schools }
purposes:
  - { id: notify, description: Notify }
  - { id: refer, description: Refer }
roles:
  - { id: dsl, description: DSL }
  - { id: spoc, description: SPOC }
  - { id: manager, description: Manager }
  - { id: practitioner, description: Practitioner }
retention_classes:
  - { id: short, description: Short }
"#;

fn load(files: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
    let mut all = vec![(PathBuf::from("registry.yaml"), REGISTRY.to_owned())];
    all.extend(files.iter().map(|(name, text)| (PathBuf::from(name), (*text).to_owned())));
    PolicySet::load_files(&all, Path::new("."))
}

fn must_load(files: &[(&str, &str)]) -> PolicySet {
    match load(files) {
        Ok(set) => set,
        Err(errors) => panic!("policy did not load:\n{errors}"),
    }
}

fn errors_of(files: &[(&str, &str)]) -> String {
    match load(files) {
        Ok(_) => panic!("policy loaded but should not have"),
        Err(errors) => errors.to_string(),
    }
}

fn referral_envelope(recipient: &str) -> pb::Envelope {
    pb::Envelope {
        kind: pb::MessageKind::Referral as i32,
        purpose: "refer".to_owned(),
        urgency: pb::Urgency::Priority as i32,
        recipients: vec![recipient.to_owned()],
        idempotency_key: "key-1".to_owned(),
        subject: Some(pb::Child {
            nhs_number: "9434765919".to_owned(),
            given_name: "Amira".to_owned(),
            family_name: "Example".to_owned(),
            date_of_birth: Some(pb::Date { year: 2015, month: 6, day: 1 }),
            address: "1 Example Road".to_owned(),
            ..Default::default()
        }),
        agreement: Some(pb::FamilyAgreement {
            state: pb::AgreementState::Agreed as i32,
            agreed_by: "mother".to_owned(),
            ..Default::default()
        }),
        body: Some(pb::envelope::Body::Referral(pb::Referral {
            referrer: Some(pb::Referrer {
                name: "A Neighbour".to_owned(),
                member_of_public: true,
                ..Default::default()
            }),
            concern: Some(pb::Concern {
                facts: "facts".to_owned(),
                opinion: "opinion".to_owned(),
                ..Default::default()
            }),
            immediate_risk: true,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn request<'a>(
    sender: &'a str,
    roles: &'a [String],
    recipient: &'a str,
    envelope: &'a pb::Envelope,
) -> DecisionRequest<'a> {
    DecisionRequest {
        sender,
        sender_practitioner: "practitioner-1",
        sender_roles: roles,
        recipient,
        envelope,
        encoded_envelope: None,
        now: datetime!(2026-03-04 10:00 UTC),
    }
}

const PERMIT_REFER: &str = r#"
rules:
  - id: permit-refer
    explanation: Schools refer to the LA.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    share: [subject.given_name, referral.concern.facts]
"#;

const FORBID_SCHOOL_B: &str = r#"
rules:
  - id: forbid-school-b
    effect: forbid
    explanation: School B is suspended from referring.
    from: [school-b]
    to: [la-a]
    kinds: [referral]
"#;

#[test]
fn default_deny_when_no_rule_matches() {
    let set = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("police-a");
    let decision = set.decide(&request("school-a", &roles, "police-a", &envelope));
    assert!(!decision.permitted);
    assert_eq!(decision.reason_code, ReasonCode::NoMatchingRule);
    assert!(decision.fields_shared.is_empty());
    assert!(matches!(set.build_copy(&envelope, &decision), Err(CopyError::NotPermitted)));
}

#[test]
fn a_forbid_beats_a_permit_and_rule_order_does_not_matter() {
    let forward = must_load(&[("permit.yaml", PERMIT_REFER), ("forbid.yaml", FORBID_SCHOOL_B)]);
    let backward = must_load(&[("forbid.yaml", FORBID_SCHOOL_B), ("permit.yaml", PERMIT_REFER)]);
    assert_eq!(forward.hash(), backward.hash());
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("la-a");
    for set in [&forward, &backward] {
        let refused = set.decide(&request("school-b", &roles, "la-a", &envelope));
        assert!(!refused.permitted);
        assert_eq!(refused.reason_code, ReasonCode::Forbidden);
        assert_eq!(refused.rule_ids, vec!["forbid-school-b".to_owned()]);
        let allowed = set.decide(&request("school-a", &roles, "la-a", &envelope));
        assert!(allowed.permitted, "{}", allowed.explanation);
        assert_eq!(allowed.rule_ids, vec!["permit-refer".to_owned()]);
    }
    // The same rules within one file, in the other order, also give the same hash.
    let together_a = format!("{PERMIT_REFER}{}", FORBID_SCHOOL_B.replace("rules:\n", ""));
    let together_b = format!("{FORBID_SCHOOL_B}{}", PERMIT_REFER.replace("rules:\n", ""));
    assert_eq!(must_load(&[("a.yaml", &together_a)]).hash(), must_load(&[("a.yaml", &together_b)]).hash());
}

/// Agencies named by the same rules share one route-table entry (the table must not grow with the square of the
/// registry); listing routes still gives every agency's own, and decisions still tell the two schools apart once a
/// rule names one of them.
#[test]
fn routes_are_kept_per_class_of_agencies_and_list_every_agency() {
    let index = |set: &PolicySet, id: &str| set.agency_index[id];
    let referral = |set: &PolicySet, from: &str| (index(set, from), index(set, "la-a"), KindName::Referral);

    let together = must_load(&[("permit.yaml", PERMIT_REFER)]);
    assert_eq!(together.routes.len(), 1, "both schools are one class");
    let listed: std::collections::BTreeSet<_> = together.routes.iter().map(|(s, r, k, _)| (s, r, k)).collect();
    assert_eq!(listed, [referral(&together, "school-a"), referral(&together, "school-b")].into_iter().collect());

    let apart = must_load(&[("permit.yaml", PERMIT_REFER), ("forbid.yaml", FORBID_SCHOOL_B)]);
    assert_eq!(apart.routes.len(), 2, "school B is named by one more rule, so it is a class of its own");
    let listed: std::collections::BTreeSet<_> = apart.routes.iter().map(|(s, r, k, _)| (s, r, k)).collect();
    assert_eq!(listed, [referral(&apart, "school-a"), referral(&apart, "school-b")].into_iter().collect());
    let (a, la, kind) = referral(&apart, "school-a");
    let (b, _, _) = referral(&apart, "school-b");
    assert!(apart.routes.get(a, la, kind).is_some_and(|entry| entry.forbids.is_empty()));
    assert!(apart.routes.get(b, la, kind).is_some_and(|entry| entry.forbids.len() == 1));
    assert!(apart.routes.get(la, a, kind).is_none(), "no rule runs the other way");
    assert!(apart.routes.get(u16::MAX, la, kind).is_none(), "an index outside the registry has no route");
}

#[test]
fn the_hash_changes_when_a_rule_changes() {
    let before = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let after = must_load(&[("permit.yaml", &PERMIT_REFER.replace("subject.given_name, ", ""))]);
    assert_ne!(before.hash(), after.hash());
    assert_eq!(before.hash().len(), 64);
}

#[test]
fn the_copy_holds_only_shared_fields_and_routing_facts() {
    let set = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let roles = vec!["dsl".to_owned()];
    let mut envelope = referral_envelope("la-a");
    envelope.message_id = "0195f0c2-7a1e-7000-8000-000000000001".to_owned();
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert!(decision.permitted, "{}", decision.explanation);
    let copy = match set.build_copy(&envelope, &decision) {
        Ok(copy) => copy,
        Err(error) => panic!("{error}"),
    };
    assert_eq!(copy.message_id, envelope.message_id);
    assert_eq!(copy.kind, envelope.kind);
    assert_eq!(copy.purpose, "refer");
    assert_eq!(copy.urgency, envelope.urgency);
    assert!(copy.recipients.is_empty(), "recipients are not a routing fact");
    assert!(copy.idempotency_key.is_empty());
    assert!(copy.agreement.is_none());
    let subject = copy.subject.clone().unwrap_or_default();
    assert_eq!(subject.given_name, "Amira");
    assert!(subject.family_name.is_empty() && subject.nhs_number.is_empty() && subject.date_of_birth.is_none());
    let Some(pb::envelope::Body::Referral(referral)) = copy.body else { panic!("the copy lost its body") };
    assert!(referral.referrer.is_none());
    assert!(!referral.immediate_risk);
    let concern = referral.concern.unwrap_or_default();
    assert_eq!(concern.facts, "facts");
    assert!(concern.opinion.is_empty());
    assert!(decision.fields_shared.contains(&"referral.concern.facts".to_owned()));
    assert!(decision.fields_shared.contains(&"message_id".to_owned()));
    for withheld in [
        "referral.referrer",
        "referral.concern.opinion",
        "referral.immediate_risk",
        "subject.nhs_number",
        "subject.address",
        "agreement",
        "recipients",
        "idempotency_key",
    ] {
        assert!(
            decision.fields_withheld.contains(&withheld.to_owned()),
            "{withheld} missing from {:?}",
            decision.fields_withheld
        );
    }
}

#[test]
fn an_unknown_field_in_the_message_never_reaches_the_copy() {
    let set = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("la-a");
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    let Some(mask) = decision.mask.clone() else { panic!("permitted decision without a mask") };
    // Append unknown fields at the top level and inside the shared concern (field 99, a string "LEAK").
    let mut bytes = envelope.encode_to_vec();
    bytes.extend_from_slice(&[0x9a, 0x06, 4, b'L', b'E', b'A', b'K']);
    let descriptor = set.envelope.clone();
    let source = match prost_reflect::DynamicMessage::decode(descriptor, bytes.as_slice()) {
        Ok(source) => source,
        Err(error) => panic!("{error}"),
    };
    assert!(source.unknown_fields().count() > 0, "the source keeps the unknown field");
    let copy = copy::copy_dynamic(&source, &mask);
    let encoded = copy.encode_to_vec();
    assert!(!encoded.windows(4).any(|window| window == b"LEAK"));
    // And the decision lists it as withheld.
    let mut withheld = Vec::new();
    fields::withheld_paths(&bytes, &mask, &mut withheld);
    assert!(withheld.contains(&"#99".to_owned()), "{withheld:?}");
}

#[test]
fn an_unknown_field_nested_in_a_whole_shared_message_never_reaches_the_copy() {
    let whole = PERMIT_REFER.replace("referral.concern.facts", "referral.concern");
    let set = must_load(&[("permit.yaml", &whole)]);
    let roles = vec!["dsl".to_owned()];
    let envelope =
        pb::Envelope { body: Some(pb::envelope::Body::Referral(pb::Referral::default())), ..referral_envelope("la-a") };
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    let Some(mask) = decision.mask.clone() else { panic!("permitted decision without a mask") };
    // Envelope field 20 (referral) holding field 2 (concern) holding facts "ok" and unknown field 99 "LEAK".
    let concern: Vec<u8> = [vec![0x0a, 2, b'o', b'k'], vec![0x9a, 0x06, 4, b'L', b'E', b'A', b'K']].concat();
    let referral: Vec<u8> = [vec![0x12, u8::try_from(concern.len()).unwrap_or(0)], concern].concat();
    let mut bytes = envelope.encode_to_vec();
    bytes.extend_from_slice(&[0xa2, 0x01, u8::try_from(referral.len()).unwrap_or(0)]);
    bytes.extend_from_slice(&referral);
    let source = match prost_reflect::DynamicMessage::decode(set.envelope.clone(), bytes.as_slice()) {
        Ok(source) => source,
        Err(error) => panic!("{error}"),
    };
    let encoded = copy::copy_dynamic(&source, &mask).encode_to_vec();
    assert!(encoded.windows(2).any(|window| window == b"ok"));
    assert!(!encoded.windows(4).any(|window| window == b"LEAK"));
}

#[test]
fn withheld_fields_win_over_shared_fields() {
    let shares_whole = r#"
rules:
  - id: permit-whole-referral
    explanation: Whole referral.
    from: [schools]
    to: [charity-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    share: [referral]
  - id: hide-referrer
    effect: withhold
    explanation: Protect the referrer.
    from: [any]
    to: [any]
    except_to: [local-authority]
    kinds: [referral]
    withhold: [referral.referrer, referral.concern.opinion]
"#;
    let set = must_load(&[("rules.yaml", shares_whole)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("charity-a");
    let decision = set.decide(&request("school-a", &roles, "charity-a", &envelope));
    assert!(decision.permitted, "{}", decision.explanation);
    assert!(!decision.is_visible("referral.referrer"));
    assert!(decision.is_visible("referral.concern.facts"));
    assert!(decision.fields_withheld.contains(&"referral.referrer".to_owned()));
    let copy = set.build_copy(&envelope, &decision).unwrap_or_default();
    let Some(pb::envelope::Body::Referral(referral)) = copy.body else { panic!("the copy lost its body") };
    assert!(referral.referrer.is_none());
    assert!(referral.immediate_risk);
    let concern = referral.concern.unwrap_or_default();
    assert_eq!(concern.facts, "facts");
    assert!(concern.opinion.is_empty());
}

#[test]
fn sharing_a_field_another_rule_withholds_is_a_load_error() {
    let contradiction = r#"
rules:
  - id: permit-referrer
    explanation: Shares the referrer.
    from: [schools]
    to: [charity-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    share: [referral.referrer.name]
  - id: hide-referrer
    effect: withhold
    explanation: Protect the referrer.
    from: [any]
    to: [any]
    kinds: [referral]
    withhold: [referral.referrer]
"#;
    let errors = errors_of(&[("rules.yaml", contradiction)]);
    assert!(errors.contains("rules.yaml:3:"), "{errors}");
    assert!(errors.contains("rule `hide-referrer` withholds `referral.referrer`"), "{errors}");
}

#[test]
fn an_unknown_field_path_is_rejected_at_load_with_its_position_and_a_suggestion() {
    let misspelt = r#"
rules:
  - id: permit-refer
    explanation: Schools refer to the LA.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    share:
      - subject.given_nam
      - referral.concern.facts.text
"#;
    let errors = errors_of(&[("rules.yaml", misspelt)]);
    assert!(errors.contains("rules.yaml:11:9: `given_nam` is not a field of `subject`"), "{errors}");
    assert!(errors.contains("did you mean `given_name`?"), "{errors}");
    assert!(errors.contains("rules.yaml:12:9:"), "{errors}");
    assert!(errors.contains("has no fields inside it"), "{errors}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let broken = r#"
rules:
  - id: bad-one
    explanation: Several problems.
    from: [scools]
    to: [la-b]
    kinds: [referral]
    purposes: [refer-x]
    lawful_basis: [uk-gdpr-6-1-e]
    conditions:
      sender_role: [dls]
      child_age: { min: 12, max: 5 }
    valid: { from: 2026-05-01, until: 2026-04-01 }
    share: [domestic_abuse_incident.location, kind]
    obligations:
      retention_class: forever
      escalate_to: nobody
"#;
    let errors = errors_of(&[("rules.yaml", broken)]);
    for expected in [
        "unknown agency, group or agency kind `scools`; did you mean `schools`?",
        "unknown agency, group or agency kind `la-b`",
        "unknown purpose `refer-x`",
        "unknown role `dls`; did you mean `dsl`?",
        "minimum 12 is above its maximum 5",
        "valid until 2026-04-01, before it starts on 2026-05-01",
        "is never present in a message of kind referral",
        "`kind` is a routing fact",
        "unknown retention class `forever`",
        "unknown agency `nobody`",
        "names `escalate_to` but no `acknowledge_within`",
    ] {
        assert!(errors.contains(expected), "missing `{expected}` in:\n{errors}");
    }
}

#[test]
fn duplicate_keys_and_unknown_fields_are_rejected_with_positions() {
    let duplicate =
        "rules:\n  - id: a\n    id: b\n    explanation: x\n    from: [any]\n    to: [any]\n    kinds: [referral]\n";
    let errors = errors_of(&[("dup.yaml", duplicate)]);
    assert!(errors.contains("dup.yaml:3:"), "{errors}");
    let unknown = "rules:\n  - id: a\n    explanaton: x\n";
    let errors = errors_of(&[("unknown.yaml", unknown)]);
    assert!(errors.contains("unknown.yaml:3:"), "{errors}");
    assert!(errors.contains("explanaton"), "{errors}");
}

#[test]
fn overlapping_validity_windows_and_unreachable_permits_are_errors() {
    let versions = r#"
rules:
  - id: refer-v1
    explanation: Version 1.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    valid: { from: 2025-01-01, until: 2026-04-30 }
    share: [subject.given_name]
  - id: refer-v2
    explanation: Version 2.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    valid: { from: 2026-04-01 }
    share: [subject.given_name]
  - id: charity-permit
    explanation: Never reachable.
    from: [charity-a]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-f]
    share: [subject.given_name]
  - id: charity-forbid
    effect: forbid
    explanation: Blocks the charity.
    from: [charity-a]
    to: [la-a]
    kinds: [referral]
"#;
    let errors = errors_of(&[("rules.yaml", versions)]);
    assert!(errors.contains("overlaps that of rule `refer-v1`"), "{errors}");
    assert!(errors.contains("rule `charity-permit` can never match: forbid `charity-forbid`"), "{errors}");
}

#[test]
fn legitimate_interests_is_for_the_voluntary_sector_only() {
    let wrong = PERMIT_REFER.replace("uk-gdpr-6-1-e", "uk-gdpr-6-1-f");
    let errors = errors_of(&[("permit.yaml", &wrong)]);
    assert!(errors.contains("is for voluntary-sector senders only"), "{errors}");
    assert!(errors.contains("school-a"), "{errors}");
}

const AGE_AND_AGREEMENT: &str = r#"
rules:
  - id: refer-under-16
    explanation: Under-16s with agreement, or override by a manager.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    conditions:
      child_age: { max: 15 }
      urgency: [priority, immediate]
    agreement:
      required: true
      override_reasons: [risk-of-significant-harm]
      override_roles: [manager]
    valid: { from: 2026-01-01, until: 2026-12-31 }
    share: [subject.given_name]
    obligations:
      acknowledge_within: { working_days: 1 }
      escalate_to: police-a
"#;

#[test]
fn a_missing_date_of_birth_when_a_rule_needs_the_age_means_deny() {
    let set = must_load(&[("rules.yaml", AGE_AND_AGREEMENT)]);
    let roles = vec!["dsl".to_owned()];
    let mut envelope = referral_envelope("la-a");
    if let Some(subject) = envelope.subject.as_mut() {
        subject.date_of_birth = None;
    }
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert!(!decision.permitted);
    assert_eq!(decision.reason_code, ReasonCode::MissingFact);
    assert!(decision.explanation.contains("subject.date_of_birth"));

    // A date of birth that is not a date is an evaluation error: deny.
    if let Some(subject) = envelope.subject.as_mut() {
        subject.date_of_birth = Some(pb::Date { year: 2015, month: 2, day: 30 });
    }
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert_eq!(decision.reason_code, ReasonCode::InvalidFact);
}

#[test]
fn the_age_is_computed_at_now_and_split_exactly_at_the_birthday() {
    let set = must_load(&[("rules.yaml", AGE_AND_AGREEMENT)]);
    let roles = vec!["dsl".to_owned()];
    let mut envelope = referral_envelope("la-a");
    if let Some(subject) = envelope.subject.as_mut() {
        subject.date_of_birth = Some(pb::Date { year: 2010, month: 3, day: 5 });
    }
    let mut day_before = request("school-a", &roles, "la-a", &envelope);
    day_before.now = datetime!(2026-03-04 23:00 UTC);
    assert!(set.decide(&day_before).permitted, "15 the day before the 16th birthday");
    let mut birthday = day_before;
    birthday.now = datetime!(2026-03-05 00:30 UTC);
    let decision = set.decide(&birthday);
    assert!(!decision.permitted);
    assert_eq!(decision.reason_code, ReasonCode::ConditionFailed);
}

#[test]
fn agreement_required_without_agreement_or_override_means_deny() {
    let set = must_load(&[("rules.yaml", AGE_AND_AGREEMENT)]);
    let roles = vec!["dsl".to_owned()];
    let mut envelope = referral_envelope("la-a");
    envelope.agreement = None;
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert!(!decision.permitted);
    assert_eq!(decision.reason_code, ReasonCode::AgreementRequired);
    assert_eq!(decision.rule_ids, vec!["refer-under-16".to_owned()]);
    envelope.agreement =
        Some(pb::FamilyAgreement { state: pb::AgreementState::InformedNotAsked as i32, ..Default::default() });
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert_eq!(decision.reason_code, ReasonCode::AgreementRequired);
}

#[test]
fn an_override_by_a_role_not_allowed_means_deny_and_by_a_manager_is_recorded() {
    let set = must_load(&[("rules.yaml", AGE_AND_AGREEMENT)]);
    let mut envelope = referral_envelope("la-a");
    envelope.agreement = Some(pb::FamilyAgreement {
        state: pb::AgreementState::RefusedOverridden as i32,
        override_reason: pb::OverrideReason::RiskOfSignificantHarm as i32,
        justification: "Risk of significant harm.".to_owned(),
        authorised_by: "manager-1".to_owned(),
        ..Default::default()
    });
    let not_manager = vec!["dsl".to_owned()];
    let decision = set.decide(&request("school-a", &not_manager, "la-a", &envelope));
    assert!(!decision.permitted);
    assert_eq!(decision.reason_code, ReasonCode::OverrideNotAuthorised);
    assert!(decision.override_used.is_none());

    let manager = vec!["dsl".to_owned(), "manager".to_owned()];
    let decision = set.decide(&request("school-a", &manager, "la-a", &envelope));
    assert!(decision.permitted, "{}", decision.explanation);
    let used = decision.override_used.clone().unwrap_or_else(|| panic!("override not recorded"));
    assert_eq!(used.reason, "risk-of-significant-harm");
    assert_eq!(used.authorised_by, "manager-1");
    assert_eq!(used.sent_by, "practitioner-1");

    // A reason the rule does not allow is refused even for a manager.
    if let Some(agreement) = envelope.agreement.as_mut() {
        agreement.override_reason = pb::OverrideReason::Emergency as i32;
    }
    let decision = set.decide(&request("school-a", &manager, "la-a", &envelope));
    assert_eq!(decision.reason_code, ReasonCode::OverrideNotAllowed);
}

#[test]
fn validity_window_urgency_and_obligations() {
    let set = must_load(&[("rules.yaml", AGE_AND_AGREEMENT)]);
    let roles = vec!["dsl".to_owned()];
    let mut envelope = referral_envelope("la-a");
    let mut late = request("school-a", &roles, "la-a", &envelope);
    late.now = datetime!(2027-01-01 12:00 UTC);
    assert_eq!(set.decide(&late).reason_code, ReasonCode::OutsideValidityWindow);

    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert!(decision.permitted, "{}", decision.explanation);
    assert_eq!(decision.obligations.acknowledge_within, Some(Deadline::WorkingDays(1)));
    assert_eq!(decision.obligations.escalate_to.as_deref(), Some("police-a"));
    assert!(!decision.obligations.onward_disclosure);
    assert_eq!(
        set.deadline_at(&Deadline::WorkingDays(1), datetime!(2026-03-06 10:00 UTC)),
        datetime!(2026-03-09 10:00 UTC)
    );

    envelope.urgency = pb::Urgency::Routine as i32;
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert_eq!(decision.reason_code, ReasonCode::ConditionFailed);
    envelope.urgency = pb::Urgency::Unspecified as i32;
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert_eq!(decision.reason_code, ReasonCode::MissingFact);
}

#[test]
fn prechecks_refuse_unknown_agencies_kinds_purposes_and_claimed_roles() {
    let set = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("la-a");
    let code = |sender: &str, recipient: &str, envelope: &pb::Envelope| {
        set.decide(&request(sender, &roles, recipient, envelope)).reason_code
    };
    assert_eq!(code("nobody", "la-a", &envelope), ReasonCode::UnknownSender);
    assert_eq!(code("school-a", "nobody", &envelope), ReasonCode::UnknownRecipient);
    assert_eq!(code("school-a", "police-a", &envelope), ReasonCode::RecipientNotNamed);
    let mut wrong = envelope.clone();
    wrong.kind = 0;
    assert_eq!(code("school-a", "la-a", &wrong), ReasonCode::UnknownKind);
    let mut wrong = envelope.clone();
    wrong.kind = pb::MessageKind::DomesticAbuseNotification as i32;
    assert_eq!(code("school-a", "la-a", &wrong), ReasonCode::KindBodyMismatch);
    let mut wrong = envelope.clone();
    wrong.purpose = "gossip".to_owned();
    assert_eq!(code("school-a", "la-a", &wrong), ReasonCode::UnknownPurpose);
    let mut wrong = envelope.clone();
    wrong.sender_role = "manager".to_owned();
    assert_eq!(code("school-a", "la-a", &wrong), ReasonCode::RoleNotAllowed);
    let mut wrong = envelope;
    wrong.purpose = "notify".to_owned();
    assert_eq!(code("school-a", "la-a", &wrong), ReasonCode::NoMatchingRule);
}

#[test]
fn several_permits_combine_fields_bases_and_the_earliest_deadline() {
    let two = r#"
rules:
  - id: permit-a
    explanation: A.
    from: [schools]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e]
    share: [subject.given_name]
    obligations: { acknowledge_within: { working_days: 1 }, onward_disclosure: true }
  - id: permit-b
    explanation: B.
    from: [school-a]
    to: [la-a]
    kinds: [referral]
    purposes: [refer]
    lawful_basis: [uk-gdpr-6-1-e, dpa-2018-sch1-pt2-para18, uk-gdpr-9-2-g]
    share: [subject.family_name]
    obligations: { acknowledge_within: { hours: 2 }, onward_disclosure: false, escalate_to: police-a }
"#;
    let set = must_load(&[("rules.yaml", two)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("la-a");
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    assert!(decision.permitted);
    assert_eq!(decision.rule_ids, vec!["permit-a".to_owned(), "permit-b".to_owned()]);
    assert!(decision.is_visible("subject.given_name") && decision.is_visible("subject.family_name"));
    assert_eq!(decision.lawful_basis, vec!["dpa-2018-sch1-pt2-para18", "uk-gdpr-6-1-e", "uk-gdpr-9-2-g"]);
    assert_eq!(decision.obligations.acknowledge_within, Some(Deadline::Within(std::time::Duration::from_secs(7200))));
    assert_eq!(decision.obligations.escalate_to.as_deref(), Some("police-a"));
    assert!(!decision.obligations.onward_disclosure);
}

#[test]
fn the_sample_policy_set_loads_and_its_own_tests_pass() {
    let set = sample();
    for id in ["luton-csc", "beds-police", "luton-oakwood-primary", "ldh-hospital", "luton-family-hub-north"] {
        assert!(set.agency(id).is_some(), "{id} missing from the sample registry");
    }
    assert!(!set.tests().is_empty());
    let report = set.run_tests();
    let failures: Vec<String> = report
        .results
        .iter()
        .filter(|result| !result.passed())
        .map(|result| {
            format!("{}:{}: {}: {}", result.file.display(), result.line, result.name, result.failures.join("; "))
        })
        .collect();
    assert!(failures.is_empty(), "failing policy tests:\n{}", failures.join("\n"));
    assert!(report.unexercised_rules.is_empty(), "sample rules no test exercises: {:?}", report.unexercised_rules);
}

#[test]
fn the_sample_f1_copy_holds_the_encompass_minimum_only() {
    let set = sample();
    let Some(test) = set.tests().iter().find(|test| test.name.starts_with("police SPOC tells the school DSL")) else {
        panic!("the F1 sample case is missing")
    };
    let request = DecisionRequest {
        sender: &test.sender,
        sender_practitioner: &test.practitioner,
        sender_roles: &test.roles,
        recipient: &test.recipient,
        envelope: &test.envelope,
        encoded_envelope: None,
        now: test.now,
    };
    let decision = set.decide(&request);
    assert!(decision.permitted, "{}", decision.explanation);
    assert_eq!(decision.policy_set_hash, set.hash());
    let copy = set.build_copy(&test.envelope, &decision).unwrap_or_default();
    let Some(pb::envelope::Body::DomesticAbuseIncident(incident)) = copy.body else { panic!("the copy lost its body") };
    assert!(incident.crime_report.is_empty());
    assert!(incident.criminal_history.is_empty());
    assert!(incident.victim_health.is_empty());
    assert_eq!(incident.police_reference, "BP-2026-004711");
    assert_eq!(incident.involved_adults.len(), 2);
    assert!(incident.involved_adults.iter().all(|adult| adult.address.is_empty() && adult.phone.is_empty()));
    assert_eq!(incident.involved_adults[0].relationship, "mother");
    assert!(incident.child_voice.is_some_and(|voice| voice.spoken_to));
    let subject = copy.subject.unwrap_or_default();
    assert!(subject.address.is_empty());
    assert_eq!(subject.school_urn, "109876");
    assert!(decision.fields_withheld.contains(&"domestic_abuse_incident.crime_report".to_owned()));
    assert!(decision.fields_withheld.contains(&"domestic_abuse_incident.involved_adults.address".to_owned()));
}

#[test]
fn the_committed_json_schema_matches_the_rust_types() {
    let committed = std::fs::read_to_string(policies_dir().join("policy.schema.json")).unwrap_or_default();
    let generated = model::policy_file_schema_json();
    assert!(
        committed == generated,
        "policies/policy.schema.json is out of date: regenerate it with `broker policy schema > policies/policy.schema.json`"
    );
}

#[test]
fn every_sample_file_points_at_the_schema() {
    let mut stack = vec![policies_dir()];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|ext| ext == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(
                    text.starts_with("# yaml-language-server: $schema=")
                        && text.lines().next().is_some_and(|line| line.ends_with("policy.schema.json")),
                    "{} does not point at the schema",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5);
}

fn run_cli(command: cli::PolicyCommand) -> (i32, String) {
    let mut out = Vec::new();
    let code = cli::run_to(&command, &mut out).unwrap_or(2);
    (code, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn diff_reports_new_access_hidden_fields_and_refusals_exactly() {
    let old = sample();
    let scratch = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    crate::test_support::copy_dir(&policies_dir(), scratch.path());
    let f1 = scratch.path().join("rules/f01-operation-encompass.yaml");
    let text = std::fs::read_to_string(&f1).unwrap_or_default();
    let changed = text
        .replace(
            "      - domestic_abuse_incident.spoc\n",
            "      - domestic_abuse_incident.spoc\n      - subject.nhs_number\n",
        )
        .replace("      - subject.school_urn\n", "")
        .replace("child_age: { min: 2, max: 18 }", "child_age: { min: 2, max: 16 }");
    assert_ne!(text, changed);
    std::fs::write(&f1, changed).unwrap_or_default();
    let _ = std::fs::remove_dir_all(scratch.path().join("tests"));
    let new = match PolicySet::load_dir(scratch.path()) {
        Ok(set) => set,
        Err(errors) => panic!("{errors}"),
    };
    let report = diff::diff(&old, &new);
    assert!(report.grants_new_access());
    let oakwood: Vec<&diff::Change> =
        report.changes.iter().filter(|change| change.route.recipient == "luton-oakwood-primary").collect();
    let kinds: Vec<&diff::ChangeKind> = oakwood.iter().map(|change| &change.kind).collect();
    assert!(kinds.contains(&&diff::ChangeKind::NewlyRefused), "{}", report.to_text());
    assert!(kinds.contains(&&diff::ChangeKind::FieldsNewlyVisible(vec!["subject.nhs_number".to_owned()])));
    assert!(kinds.contains(&&diff::ChangeKind::FieldsNewlyHidden(vec!["subject.school_urn".to_owned()])));
    // Ages 17 and 18 are newly refused: exactly two points on the split either side of the old and new maxima.
    let refused =
        oakwood.iter().find(|change| change.kind == diff::ChangeKind::NewlyRefused).map(|change| change.points);
    assert_eq!(refused, Some(2));
    // Nothing else changed anywhere.
    assert!(report.changes.iter().all(|change| change.route.kind == KindName::DomesticAbuseNotification));
    // The same set against itself: no changes.
    assert!(diff::diff(&old, &old).changes.is_empty());
}

#[test]
fn the_matrix_marks_always_conditional_and_never() {
    let set = sample();
    let html = matrix::render_html(&set);
    assert!(html.contains("<h2>domestic-abuse-notification</h2>"));
    let route = |sender: &str, recipient: &str, kind| diff::Route {
        sender: sender.to_owned(),
        recipient: recipient.to_owned(),
        kind,
    };
    let f4 = matrix::cell(&set, &route("luton-csc", "luton-oakwood-primary", KindName::OutcomeFeedback));
    assert_eq!(f4.availability, matrix::Availability::Always);
    assert!(f4.fields.contains("referral_outcome.reason"));
    assert!(!f4.fields.contains("referral_outcome.assessment_notes"));
    assert!(f4.lawful_basis.contains("uk-gdpr-6-1-e"));
    let f1 = matrix::cell(&set, &route("beds-police", "luton-oakwood-primary", KindName::DomesticAbuseNotification));
    assert_eq!(f1.availability, matrix::Availability::Conditional);
    let never = matrix::cell(&set, &route("luton-oakwood-primary", "beds-police", KindName::Referral));
    assert_eq!(never.availability, matrix::Availability::Never);
}

#[test]
fn explain_names_failed_conditions_with_values_and_missing_facts() {
    let set = sample();
    let roles = vec!["spoc".to_owned()];
    let envelope = pb::Envelope {
        kind: pb::MessageKind::DomesticAbuseNotification as i32,
        purpose: "operation-encompass".to_owned(),
        recipients: vec!["luton-oakwood-primary".to_owned()],
        recipient_role: "practitioner".to_owned(),
        body: Some(pb::envelope::Body::DomesticAbuseIncident(Default::default())),
        ..Default::default()
    };
    let explanation = set.explain(&request("beds-police", &roles, "luton-oakwood-primary", &envelope));
    assert!(!explanation.decision.permitted);
    let rule = explanation
        .rules
        .iter()
        .find(|rule| rule.rule_id == "f1-encompass-police-to-school-dsl")
        .unwrap_or_else(|| panic!("the F1 rule is not reported"));
    let details: Vec<&str> = rule.failures.iter().map(|failure| failure.detail.as_str()).collect();
    assert!(details.iter().any(|detail| detail.contains("`dsl`") && detail.contains("`practitioner`")), "{details:?}");
    assert_eq!(explanation.missing_facts, vec!["subject.date_of_birth".to_owned()]);
    let text = explanation.to_text();
    assert!(text.starts_with("DENY (role-not-allowed)"), "{text}");
    assert!(text.contains("missing facts: subject.date_of_birth"));
}

#[test]
fn the_cli_validates_tests_explains_and_writes_the_schema_and_matrix() {
    let dir = policies_dir();
    let (code, out) = run_cli(cli::PolicyCommand::Validate { dir: dir.clone() });
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");
    let (code, out) = run_cli(cli::PolicyCommand::Test { dir: dir.clone(), require_coverage: true });
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" passed, 0 failed"), "{out}");

    let scratch = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    let broken = scratch.path().join("broken.yaml");
    std::fs::write(&broken, format!("{REGISTRY}\nrules:\n  - id: x\n    explanation: x\n    from: [nobody]\n    to: [la-a]\n    kinds: [referral]\n    purposes: [refer]\n    lawful_basis: [uk-gdpr-6-1-e]\n    share: [subject.nhs]\n")).unwrap_or_default();
    let (code, out) = run_cli(cli::PolicyCommand::Validate { dir: scratch.path().to_path_buf() });
    assert_eq!(code, 1);
    assert!(out.contains("the policy set has 2 errors"), "{out}");
    assert!(out.contains("broken.yaml:24:12: unknown agency, group or agency kind `nobody`"), "{out}");
    assert!(out.contains("broken.yaml:29:13: `nhs` is not a field of `subject`"), "{out}");

    let (code, out) = run_cli(cli::PolicyCommand::Explain(Box::new(cli::ExplainArgs {
        dir: dir.clone(),
        from: "luton-oakwood-primary".to_owned(),
        to: "luton-csc".to_owned(),
        kind: Some("referral".to_owned()),
        purpose: Some("safeguarding-referral".to_owned()),
        roles: vec!["dsl".to_owned()],
        sender_role: None,
        recipient_role: None,
        urgency: None,
        date_of_birth: None,
        agreement: Some("agreed".to_owned()),
        override_reason: None,
        justification: None,
        authorised_by: None,
        at: Some("2026-03-04T10:00:00Z".to_owned()),
        envelope: None,
    })));
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("PERMIT (permitted)"), "{out}");
    assert!(out.contains("acknowledge: within 1 working days (due 2026-03-05T10:00:00Z"), "{out}");

    let schema = scratch.path().join("schema.json");
    let (code, _) = run_cli(cli::PolicyCommand::Schema { out: Some(schema.clone()) });
    assert_eq!(code, 0);
    assert_eq!(std::fs::read_to_string(&schema).unwrap_or_default(), model::policy_file_schema_json());

    let html = scratch.path().join("matrix.html");
    let (code, _) = run_cli(cli::PolicyCommand::Matrix { dir, out: html.clone() });
    assert_eq!(code, 0);
    assert!(std::fs::read_to_string(&html).unwrap_or_default().contains("<table>"));
}

#[test]
fn the_wire_builder_and_the_dynamic_builder_make_the_same_copy() {
    let set = sample();
    let mut compared = 0;
    for test in set.tests() {
        let decision = set.decide(&DecisionRequest {
            sender: &test.sender,
            sender_practitioner: &test.practitioner,
            sender_roles: &test.roles,
            recipient: &test.recipient,
            envelope: &test.envelope,
            encoded_envelope: None,
            now: test.now,
        });
        // A send decides on the bytes it encoded once: the same decision, the same fields listed as withheld.
        let encoded = test.envelope.encode_to_vec();
        let on_bytes = set.decide(&DecisionRequest {
            sender: &test.sender,
            sender_practitioner: &test.practitioner,
            sender_roles: &test.roles,
            recipient: &test.recipient,
            envelope: &test.envelope,
            encoded_envelope: Some(&encoded),
            now: test.now,
        });
        assert_eq!(
            (on_bytes.permitted, &on_bytes.rule_ids, &on_bytes.fields_shared, &on_bytes.fields_withheld),
            (decision.permitted, &decision.rule_ids, &decision.fields_shared, &decision.fields_withheld),
            "{}",
            test.name
        );
        if !decision.permitted {
            continue;
        }
        let fast = set.build_copy(&test.envelope, &decision);
        let reference = set.build_copy_dynamic(&test.envelope, &decision);
        assert_eq!(fast, reference, "{}", test.name);
        // The copy a send stores, as it comes out of the builder, decodes to the reference copy and is exactly
        // prost's encoding of it (so stored copies are what they were when the copy was decoded and encoded again).
        let stored = set.build_copy_encoded(&encoded, &on_bytes).unwrap_or_default();
        let decoded = pb::Envelope::decode(stored.as_slice()).unwrap_or_default();
        assert_eq!(Ok(decoded.clone()), reference, "{}", test.name);
        assert_eq!(decoded.encode_to_vec(), stored, "{}", test.name);
        compared += 1;
    }
    assert!(compared >= 20, "only {compared} permitted sample cases");
}

#[test]
fn the_wire_builder_never_writes_unknown_fields_even_inside_whole_shared_messages() {
    let whole = PERMIT_REFER.replace("referral.concern.facts", "referral.concern");
    let set = must_load(&[("permit.yaml", &whole)]);
    let roles = vec!["dsl".to_owned()];
    let envelope = referral_envelope("la-a");
    let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
    let Some(mask) = decision.mask.clone() else { panic!("permitted decision without a mask") };
    let concern: Vec<u8> = [vec![0x0a, 2, b'o', b'k'], vec![0x9a, 0x06, 4, b'L', b'E', b'A', b'K']].concat();
    let referral: Vec<u8> = [vec![0x12, u8::try_from(concern.len()).unwrap_or(0)], concern].concat();
    let mut bytes = vec![0x9a, 0x06, 4, b'L', b'E', b'A', b'K'];
    bytes.extend_from_slice(&envelope.encode_to_vec());
    bytes.extend_from_slice(&[0xa2, 0x01, u8::try_from(referral.len()).unwrap_or(0)]);
    bytes.extend_from_slice(&referral);
    let mut out = Vec::new();
    assert!(fields::copy_wire(&bytes, &set.wire, Some(&mask), &mut out).is_ok());
    assert!(out.windows(2).any(|window| window == b"ok"));
    assert!(!out.windows(4).any(|window| window == b"LEAK"));
    // Truncated input is refused rather than half-copied.
    let mut out = Vec::new();
    assert!(fields::copy_wire(&bytes[..bytes.len() - 2], &set.wire, Some(&mask), &mut out).is_err());
}

#[test]
fn a_policy_set_and_its_decisions_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicySet>();
    assert_send_sync::<Decision>();
    let set = std::sync::Arc::new(sample());
    let worker = {
        let set = set.clone();
        std::thread::spawn(move || set.hash().to_owned())
    };
    assert_eq!(worker.join().unwrap_or_default(), set.hash());
}

#[test]
fn load_dir_reports_problems_in_several_files_at_once() {
    let scratch = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    std::fs::write(scratch.path().join("registry.yaml"), REGISTRY).unwrap_or_default();
    std::fs::write(scratch.path().join("a.yaml"), "rules:\n  - id: a\n    effect: permitt\n").unwrap_or_default();
    std::fs::create_dir_all(scratch.path().join("more")).unwrap_or_default();
    std::fs::write(
        scratch.path().join("more/b.yaml"),
        PERMIT_REFER.replace("[schools]", "[school-z]").replace("permit-refer", "permit-b"),
    )
    .unwrap_or_default();
    let errors = match PolicySet::load_dir(scratch.path()) {
        Ok(_) => panic!("loaded a broken directory"),
        Err(errors) => errors,
    };
    let text = errors.to_string();
    assert_eq!(errors.errors().count(), 2, "{text}");
    assert!(text.contains("a.yaml:3:13: unknown variant `permitt`"), "{text}");
    assert!(text.contains("b.yaml:5:12: unknown agency, group or agency kind `school-z`"), "{text}");
}

#[test]
fn the_wire_builder_handles_sub_messages_that_shrink_below_a_length_boundary() {
    let set = must_load(&[("permit.yaml", PERMIT_REFER)]);
    let roles = vec!["dsl".to_owned()];
    for opinion_length in [0, 100, 127, 128, 300, 20_000] {
        let mut envelope = referral_envelope("la-a");
        if let Some(pb::envelope::Body::Referral(referral)) = envelope.body.as_mut()
            && let Some(concern) = referral.concern.as_mut()
        {
            concern.opinion = "o".repeat(opinion_length);
        }
        let decision = set.decide(&request("school-a", &roles, "la-a", &envelope));
        let fast = set.build_copy(&envelope, &decision);
        assert_eq!(fast, set.build_copy_dynamic(&envelope, &decision), "opinion of {opinion_length} bytes");
        let Ok(copy) = fast else { panic!("no copy") };
        let Some(pb::envelope::Body::Referral(referral)) = copy.body else { panic!("the copy lost its body") };
        assert_eq!(referral.concern.unwrap_or_default().facts, "facts");
    }
}

/// A route whose rules name more sender roles than the diff combines is reported as not compared exactly, and counts
/// as possibly granting new access (so `--fail-on-new-access` stops it for a person to review).
#[test]
fn diff_says_where_it_is_not_exact() {
    let old = sample();
    let scratch = tempfile::tempdir().unwrap_or_else(|error| panic!("{error}"));
    crate::test_support::copy_dir(&policies_dir(), scratch.path());
    let _ = std::fs::remove_dir_all(scratch.path().join("tests"));
    let roles: Vec<String> = (1..=diff::MAX_COMBINED_ROLES + 1).map(|n| format!("test-role-{n}")).collect();
    let declared: String =
        roles.iter().map(|role| format!("  - id: {role}\n    description: A role for a test.\n")).collect();
    let f1 = scratch.path().join("rules/f01-operation-encompass.yaml");
    let text = std::fs::read_to_string(&f1).unwrap_or_default();
    let changed = text.replace("sender_role: [spoc]", &format!("sender_role: [spoc, {}]", roles.join(", ")));
    assert_ne!(text, changed);
    std::fs::write(&f1, changed).unwrap_or_default();
    std::fs::write(scratch.path().join("zz-test-roles.yaml"), format!("roles:\n{declared}")).unwrap_or_default();
    let new = match PolicySet::load_dir(scratch.path()) {
        Ok(set) => set,
        Err(errors) => panic!("{errors}"),
    };
    let report = diff::diff(&old, &new);
    assert!(!report.not_exact.is_empty());
    assert!(report.not_exact.iter().all(|(route, _)| route.sender == "beds-police"), "{:?}", report.not_exact);
    assert!(report.grants_new_access());
    assert!(report.to_text().contains("NOT EXACT on beds-police -> "), "{}", report.to_text());
    assert!(diff::diff(&old, &old).not_exact.is_empty(), "the sample's routes are compared exactly");
}
