//! The decision path: one hash lookup by route, then a few checks per rule on that route.
//!
//! Order of checks for a request: known sender and recipient, known kind whose body matches, declared purpose,
//! recipient named in the envelope, claimed sender role held in the token; then the route's forbids (any that
//! applies refuses; one that cannot be evaluated for want of a fact also refuses), then its permits. Each permit is
//! checked for purpose, validity window, sender role, recipient role, child's age, urgency and family agreement. If
//! several permits apply, the copy holds the union of their masks (each already without the route's withheld
//! fields), the lawful bases are combined, onward disclosure is allowed only if every permit allows it, and the
//! earliest acknowledgement deadline wins. If none applies, the refusal reports the rule that got furthest.

use std::sync::Arc;

use prost::Message;
use proto::pb::envelope::Body;
use time::{Date, OffsetDateTime};

use super::calendar;
use super::compile::CompiledRule;
use super::fields::{self, MaskNode};
use super::model::{KindName, OverrideReasonName, UrgencyName};
use super::{Decision, DecisionRequest, Obligations, OverrideUsed, PolicySet, ReasonCode};

/// Why one rule did not apply, and how far its checks got (higher is nearer to applying).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleFailure {
    pub stage: u8,
    pub code: ReasonCode,
    /// Plain English, naming the rule's requirement; includes the value seen only when it is not personal data.
    pub detail: String,
    /// The fact that was missing, if that was the reason.
    pub missing_fact: Option<&'static str>,
}

/// The facts of a request, derived once.
pub struct Facts<'a> {
    pub request: &'a DecisionRequest<'a>,
    pub local_date: Date,
}

/// The name of the `Envelope.body` field that is set.
pub fn body_field_name(body: Option<&Body>) -> Option<&'static str> {
    Some(match body? {
        Body::Referral(_) => "referral",
        Body::DomesticAbuseIncident(_) => "domestic_abuse_incident",
        Body::PublicProtectionNotice(_) => "public_protection_notice",
        Body::ReferralOutcome(_) => "referral_outcome",
        Body::InformationRequest(_) => "information_request",
        Body::InformationResponse(_) => "information_response",
        Body::Meeting(_) => "meeting",
        Body::PlanStatus(_) => "plan_status",
        Body::CareAttendance(_) => "care_attendance",
        Body::FamilyHelpRequest(_) => "family_help_request",
        Body::MissingEpisode(_) => "missing_episode",
        Body::RecordTransfer(_) => "record_transfer",
        Body::CaseClosure(_) => "case_closure",
        Body::Escalation(_) => "escalation",
    })
}

/// The child's age in whole years on `on`.
pub fn age_on(envelope: &proto::pb::Envelope, on: Date) -> Result<u32, RuleFailure> {
    let missing = || RuleFailure {
        stage: 4,
        code: ReasonCode::MissingFact,
        detail: "the rule depends on the child's age, but the message gives no `subject.date_of_birth`".to_owned(),
        missing_fact: Some("subject.date_of_birth"),
    };
    let date_of_birth =
        envelope.subject.as_ref().and_then(|subject| subject.date_of_birth.as_ref()).ok_or_else(missing)?;
    if date_of_birth.year == 0 && date_of_birth.month == 0 && date_of_birth.day == 0 {
        return Err(missing());
    }
    let invalid = |detail: &str| RuleFailure {
        stage: 4,
        code: ReasonCode::InvalidFact,
        detail: format!("`subject.date_of_birth` {detail}"),
        missing_fact: None,
    };
    let month = u8::try_from(date_of_birth.month)
        .ok()
        .and_then(|month| time::Month::try_from(month).ok())
        .ok_or_else(|| invalid("has no valid month"))?;
    let day = u8::try_from(date_of_birth.day).map_err(|_| invalid("has no valid day"))?;
    let born =
        Date::from_calendar_date(date_of_birth.year, month, day).map_err(|_| invalid("is not a calendar date"))?;
    if born > on {
        return Err(invalid("is after the date of the decision"));
    }
    let mut years = on.year() - born.year();
    if (on.month() as u8, on.day()) < (born.month() as u8, born.day()) {
        years -= 1;
    }
    u32::try_from(years).map_err(|_| invalid("is not a usable date"))
}

/// Checks one rule (of any effect) against the facts. `Ok` carries the override a permit relies on, if any.
/// With `collect_all`, every failed check is returned (for explanations); otherwise only the first.
pub fn check_rule(
    rule: &CompiledRule,
    facts: &Facts<'_>,
    collect_all: bool,
) -> Result<Option<OverrideUsed>, Vec<RuleFailure>> {
    let request = facts.request;
    let envelope = request.envelope;
    let mut failures: Vec<RuleFailure> = Vec::new();
    macro_rules! fail {
        ($failure:expr) => {{
            failures.push($failure);
            if !collect_all {
                return Err(failures);
            }
        }};
    }

    if !rule.covers_purpose(&envelope.purpose) {
        fail!(RuleFailure {
            stage: 0,
            code: ReasonCode::NoMatchingRule,
            detail: format!("the rule covers purposes `{}`, not `{}`", rule.purposes.join("`, `"), envelope.purpose),
            missing_fact: None,
        });
    }
    let before = rule.valid_from.is_some_and(|from| facts.local_date < from);
    let after = rule.valid_until.is_some_and(|until| facts.local_date > until);
    if before || after {
        fail!(RuleFailure {
            stage: 1,
            code: ReasonCode::OutsideValidityWindow,
            detail: format!(
                "the rule is valid {}{}, and the decision date is {}",
                rule.valid_from.map(|from| format!("from {from} ")).unwrap_or_default(),
                rule.valid_until.map(|until| format!("until {until}")).unwrap_or_default(),
                facts.local_date
            ),
            missing_fact: None,
        });
    }
    let conditions = &rule.conditions;
    if !conditions.sender_roles.is_empty() {
        let acting_ok = if envelope.sender_role.is_empty() {
            request.sender_roles.iter().any(|role| conditions.sender_roles.contains(role))
        } else {
            conditions.sender_roles.contains(&envelope.sender_role)
        };
        if !acting_ok {
            fail!(RuleFailure {
                stage: 2,
                code: ReasonCode::RoleNotAllowed,
                detail: format!(
                    "the sender must act as `{}`, but acts as `{}`",
                    conditions.sender_roles.join("` or `"),
                    if envelope.sender_role.is_empty() {
                        request.sender_roles.join("`, `")
                    } else {
                        envelope.sender_role.clone()
                    }
                ),
                missing_fact: None,
            });
        }
    }
    if !conditions.recipient_roles.is_empty() {
        if envelope.recipient_role.is_empty() {
            fail!(RuleFailure {
                stage: 3,
                code: ReasonCode::MissingFact,
                detail: format!(
                    "the rule requires the message to be addressed to `{}`, but it gives no `recipient_role`",
                    conditions.recipient_roles.join("` or `")
                ),
                missing_fact: Some("recipient_role"),
            });
        } else if !conditions.recipient_roles.contains(&envelope.recipient_role) {
            fail!(RuleFailure {
                stage: 3,
                code: ReasonCode::RoleNotAllowed,
                detail: format!(
                    "the message must be addressed to `{}`, not `{}`",
                    conditions.recipient_roles.join("` or `"),
                    envelope.recipient_role
                ),
                missing_fact: None,
            });
        }
    }
    if conditions.age_min.is_some() || conditions.age_max.is_some() {
        match age_on(envelope, facts.local_date) {
            Err(failure) => fail!(failure),
            Ok(age) => {
                let too_young = conditions.age_min.is_some_and(|min| age < min);
                let too_old = conditions.age_max.is_some_and(|max| age > max);
                if too_young || too_old {
                    fail!(RuleFailure {
                        stage: 4,
                        code: ReasonCode::ConditionFailed,
                        detail: format!(
                            "the child's age must be {}, and it is {age}",
                            describe_age_range(conditions.age_min, conditions.age_max)
                        ),
                        missing_fact: None,
                    });
                }
            }
        }
    }
    if !conditions.urgency.is_empty() && !conditions.urgency.contains(&envelope.urgency) {
        let wanted: Vec<&str> = conditions
            .urgency
            .iter()
            .filter_map(|value| UrgencyName::from_proto(*value))
            .map(UrgencyName::as_str)
            .collect();
        match UrgencyName::from_proto(envelope.urgency) {
            None => fail!(RuleFailure {
                stage: 5,
                code: ReasonCode::MissingFact,
                detail: format!("the rule requires urgency `{}`, but the message gives none", wanted.join("` or `")),
                missing_fact: Some("urgency"),
            }),
            Some(seen) => fail!(RuleFailure {
                stage: 5,
                code: ReasonCode::ConditionFailed,
                detail: format!("the urgency must be `{}`, and it is `{}`", wanted.join("` or `"), seen.as_str()),
                missing_fact: None,
            }),
        }
    }
    let mut override_used = None;
    if let Some(agreement) = rule.agreement.as_ref().filter(|agreement| agreement.required) {
        match check_agreement(agreement, request) {
            Ok(used) => override_used = used,
            Err(failure) => fail!(failure),
        }
    }
    if failures.is_empty() { Ok(override_used) } else { Err(failures) }
}

fn describe_age_range(min: Option<u32>, max: Option<u32>) -> String {
    match (min, max) {
        (Some(min), Some(max)) => format!("between {min} and {max}"),
        (Some(min), None) => format!("at least {min}"),
        (None, Some(max)) => format!("at most {max}"),
        (None, None) => "any".to_owned(),
    }
}

fn check_agreement(
    agreement: &super::compile::CompiledAgreement,
    request: &DecisionRequest<'_>,
) -> Result<Option<OverrideUsed>, RuleFailure> {
    use proto::pb::AgreementState;
    let failure = |code: ReasonCode, detail: String| RuleFailure { stage: 6, code, detail, missing_fact: None };
    let given = request.envelope.agreement.as_ref();
    let state = given.map(|agreement| agreement.state).unwrap_or(AgreementState::Unspecified as i32);
    if state == AgreementState::Agreed as i32 {
        return Ok(None);
    }
    let allowed: Vec<&str> = agreement.override_reasons.iter().map(|reason| reason.as_str()).collect();
    let is_override = state == AgreementState::NotSought as i32 || state == AgreementState::RefusedOverridden as i32;
    let Some(given) = given.filter(|_| is_override) else {
        let overridable = if allowed.is_empty() {
            "it cannot be overridden".to_owned()
        } else {
            format!("or an override for `{}`", allowed.join("`, `"))
        };
        return Err(failure(
            ReasonCode::AgreementRequired,
            format!("the rule requires the family's agreement ({overridable}), and the message records none"),
        ));
    };
    let state_name = if state == AgreementState::NotSought as i32 { "not-sought" } else { "refused-overridden" };
    let Some(reason) = OverrideReasonName::from_proto(given.override_reason) else {
        return Err(failure(
            ReasonCode::OverrideIncomplete,
            format!("the agreement is `{state_name}` but the message gives no `agreement.override_reason`"),
        ));
    };
    if !agreement.override_reasons.contains(&reason) {
        return Err(failure(
            ReasonCode::OverrideNotAllowed,
            if allowed.is_empty() {
                format!(
                    "the rule allows no override of the family's agreement, and the message gives `{}`",
                    reason.as_str()
                )
            } else {
                format!(
                    "the rule allows overriding the family's agreement only for `{}`, not `{}`",
                    allowed.join("`, `"),
                    reason.as_str()
                )
            },
        ));
    }
    if given.justification.trim().is_empty() || given.authorised_by.trim().is_empty() {
        return Err(failure(
            ReasonCode::OverrideIncomplete,
            "an override needs both `agreement.justification` and `agreement.authorised_by`".to_owned(),
        ));
    }
    if !agreement.override_roles.is_empty()
        && !request.sender_roles.iter().any(|role| agreement.override_roles.contains(role))
    {
        return Err(failure(
            ReasonCode::OverrideNotAuthorised,
            format!(
                "only a practitioner with role `{}` may send under an override, and the sender's token has `{}`",
                agreement.override_roles.join("` or `"),
                request.sender_roles.join("`, `")
            ),
        ));
    }
    Ok(Some(OverrideUsed {
        agreement_state: state_name.to_owned(),
        reason: reason.as_str().to_owned(),
        justification: given.justification.clone(),
        authorised_by: given.authorised_by.clone(),
        sent_by: request.sender_practitioner.to_owned(),
    }))
}

/// The result of the checks that come before any rule: the route's agencies and kind, or a refusal.
pub enum Prechecked {
    Route { sender: u16, recipient: u16, kind: KindName },
    Refused(ReasonCode, String),
}

pub fn precheck(set: &PolicySet, request: &DecisionRequest<'_>) -> Prechecked {
    let envelope = request.envelope;
    let Some(sender) = set.agency_index.get(request.sender).copied() else {
        return Prechecked::Refused(
            ReasonCode::UnknownSender,
            "the sending agency is not in the policy set's agency registry".to_owned(),
        );
    };
    let Some(recipient) = set.agency_index.get(request.recipient).copied() else {
        return Prechecked::Refused(
            ReasonCode::UnknownRecipient,
            format!("recipient `{}` is not in the policy set's agency registry", request.recipient),
        );
    };
    let Some(kind) = KindName::from_proto(envelope.kind) else {
        return Prechecked::Refused(ReasonCode::UnknownKind, "the message has no known `kind`".to_owned());
    };
    if body_field_name(envelope.body.as_ref()) != Some(kind.body_field()) {
        return Prechecked::Refused(
            ReasonCode::KindBodyMismatch,
            format!(
                "a message of kind `{}` must carry a `{}` body, and this one carries {}",
                kind.as_str(),
                kind.body_field(),
                body_field_name(envelope.body.as_ref())
                    .map(|name| format!("`{name}`"))
                    .unwrap_or_else(|| "none".to_owned())
            ),
        );
    }
    if set.purposes.binary_search(&envelope.purpose).is_err() {
        return Prechecked::Refused(
            ReasonCode::UnknownPurpose,
            format!("purpose `{}` is not declared in the policy set", envelope.purpose),
        );
    }
    if !envelope.recipients.iter().any(|named| named == request.recipient) {
        return Prechecked::Refused(
            ReasonCode::RecipientNotNamed,
            format!("recipient `{}` is not named in the message's `recipients`", request.recipient),
        );
    }
    if !envelope.sender_role.is_empty() && !request.sender_roles.contains(&envelope.sender_role) {
        return Prechecked::Refused(
            ReasonCode::RoleNotAllowed,
            format!("the message says the sender acts as `{}`, a role their token does not give", envelope.sender_role),
        );
    }
    Prechecked::Route { sender, recipient, kind }
}

pub fn decide(set: &PolicySet, request: &DecisionRequest<'_>) -> Decision {
    let refuse = |code: ReasonCode, explanation: String, rule_ids: Vec<String>| {
        refusal(set, request, code, explanation, rule_ids)
    };
    let (sender, recipient, kind) = match precheck(set, request) {
        Prechecked::Refused(code, explanation) => return refuse(code, explanation, Vec::new()),
        Prechecked::Route { sender, recipient, kind } => (sender, recipient, kind),
    };
    let Some(entry) = set.routes.get(sender, recipient, kind) else {
        return refuse(
            ReasonCode::NoMatchingRule,
            format!("no rule lets `{}` send `{}` messages to `{}`", request.sender, kind.as_str(), request.recipient),
            Vec::new(),
        );
    };
    let facts = Facts { request, local_date: calendar::uk_local(request.now).date() };
    let envelope = request.envelope;

    let mut forbidding: Vec<String> = Vec::new();
    for index in &entry.forbids {
        let rule = &set.rules[*index];
        if !rule.covers_purpose(&envelope.purpose) {
            continue;
        }
        match check_rule(rule, &facts, false) {
            Ok(_) => forbidding.push(rule.id.clone()),
            Err(failures) => {
                // A forbid that cannot be evaluated refuses: failing closed.
                if let Some(failure) = failures
                    .into_iter()
                    .find(|failure| matches!(failure.code, ReasonCode::MissingFact | ReasonCode::InvalidFact))
                {
                    return refuse(
                        failure.code,
                        format!("forbid `{}` could not be evaluated: {}", rule.id, failure.detail),
                        vec![rule.id.clone()],
                    );
                }
            }
        }
    }
    if !forbidding.is_empty() {
        let explanation = forbidding
            .iter()
            .filter_map(|id| set.rules.iter().find(|rule| &rule.id == id))
            .map(|rule| format!("forbidden by rule `{}`: {}", rule.id, rule.explanation))
            .collect::<Vec<_>>()
            .join("; ");
        return refuse(ReasonCode::Forbidden, explanation, forbidding);
    }

    let mut applying: Vec<(usize, Option<OverrideUsed>)> = Vec::new();
    let mut nearest: Option<(&CompiledRule, RuleFailure)> = None;
    for (position, permit) in entry.permits.iter().enumerate() {
        let rule = &set.rules[permit.rule];
        if !rule.covers_purpose(&envelope.purpose) {
            continue;
        }
        match check_rule(rule, &facts, false) {
            Ok(used) => applying.push((position, used)),
            Err(mut failures) => {
                let Some(failure) = failures.pop() else {
                    continue;
                };
                let nearer = match &nearest {
                    None => true,
                    Some((_, best)) => failure.stage > best.stage,
                };
                if nearer {
                    nearest = Some((rule, failure));
                }
            }
        }
    }
    if applying.is_empty() {
        return match nearest {
            Some((rule, failure)) => refuse(
                failure.code,
                format!("rule `{}` does not apply: {}", rule.id, failure.detail),
                vec![rule.id.clone()],
            ),
            None => refuse(
                ReasonCode::NoMatchingRule,
                format!(
                    "no rule lets `{}` send `{}` messages to `{}` for purpose `{}`",
                    request.sender,
                    kind.as_str(),
                    request.recipient,
                    envelope.purpose
                ),
                Vec::new(),
            ),
        };
    }

    let (mask, fields_shared) = if let [(position, _)] = applying.as_slice() {
        let permit = &entry.permits[*position];
        (permit.mask.clone(), permit.fields_shared.to_vec())
    } else {
        let mut union = MaskNode::empty(set.envelope.clone());
        for (position, _) in &applying {
            union.union_with(&entry.permits[*position].mask);
        }
        let paths = union.paths();
        (Arc::new(union), paths)
    };
    let mut rule_ids = Vec::with_capacity(applying.len());
    let mut lawful_basis: Vec<String> = Vec::new();
    let mut explanation = String::with_capacity(256);
    let mut obligations = Obligations { onward_disclosure: true, ..Obligations::default() };
    let mut earliest: Option<OffsetDateTime> = None;
    let mut override_used = None;
    for (position, used) in applying {
        let rule = &set.rules[entry.permits[position].rule];
        rule_ids.push(rule.id.clone());
        for basis in &rule.lawful_basis {
            if !lawful_basis.iter().any(|seen| seen == basis) {
                lawful_basis.push((*basis).to_owned());
            }
        }
        if !explanation.is_empty() {
            explanation.push_str("; ");
        }
        explanation.push_str("permitted by rule `");
        explanation.push_str(&rule.id);
        explanation.push_str("`: ");
        explanation.push_str(&rule.explanation);
        let given = &rule.obligations;
        obligations.onward_disclosure &= given.onward_disclosure;
        if obligations.retention_class.is_none() {
            obligations.retention_class = given.retention_class.clone();
        }
        if let Some(deadline) = given.acknowledge_within {
            let at = set.calendar.deadline_at(&deadline, request.now);
            if earliest.is_none_or(|best| at < best) {
                earliest = Some(at);
                obligations.acknowledge_within = Some(deadline);
                obligations.escalate_to = given.escalate_to.clone();
                obligations.deadline_rule = Some(rule.id.clone());
            }
        }
        if override_used.is_none() {
            override_used = used;
        }
    }
    lawful_basis.sort();
    if override_used.is_some() {
        explanation.push_str(" (the family's agreement was overridden; the override is recorded)");
    }
    let mut fields_withheld = Vec::with_capacity(16);
    with_encoded(request, |encoded| fields::withheld_paths(encoded, &mask, &mut fields_withheld));
    fields_withheld.sort();
    Decision {
        permitted: true,
        reason_code: ReasonCode::Permitted,
        explanation,
        rule_ids,
        lawful_basis,
        fields_shared,
        fields_withheld,
        obligations,
        override_used,
        policy_set_hash: set.hash.clone(),
        mask: Some(mask),
    }
}

/// Calls `work` with the request's envelope encoded: the bytes the caller gave, or encoded here.
fn with_encoded<T>(request: &DecisionRequest<'_>, work: impl FnOnce(&[u8]) -> T) -> T {
    match request.encoded_envelope {
        Some(encoded) => {
            debug_assert!(
                encoded == request.envelope.encode_to_vec().as_slice(),
                "a decision request's encoded envelope is not its envelope's encoding"
            );
            work(encoded)
        }
        None => work(&request.envelope.encode_to_vec()),
    }
}

fn refusal(
    set: &PolicySet,
    request: &DecisionRequest<'_>,
    code: ReasonCode,
    explanation: String,
    rule_ids: Vec<String>,
) -> Decision {
    let mut fields_withheld = Vec::new();
    with_encoded(request, |encoded| fields::withheld_paths(encoded, &set.routing_mask, &mut fields_withheld));
    fields_withheld.sort();
    Decision {
        permitted: false,
        reason_code: code,
        explanation,
        rule_ids,
        lawful_basis: Vec::new(),
        fields_shared: Vec::new(),
        fields_withheld,
        obligations: Obligations::default(),
        override_used: None,
        policy_set_hash: set.hash.clone(),
        mask: None,
    }
}
