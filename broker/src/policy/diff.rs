//! `policy diff`: what a change to the policy set does, found by enumerating the finite decision space exactly.
//!
//! A decision depends only on the rules on its route (sender, recipient, kind) and on a few facts. For each route
//! that has a permit in either set, the enumeration takes every purpose those rules name, and for each fact a rule
//! on the route looks at, one representative value per region in which every rule's outcome is the same: every
//! subset of the sender roles named (in conditions or as override roles), each recipient role named plus none and
//! another, every urgency when urgency is named, the child's age on both sides of every age threshold plus no date
//! of birth, decision dates on both sides of every validity boundary, and every family-agreement state (each
//! override reason, complete) when a rule requires agreement. Facts no rule on the route looks at cannot change its
//! outcome, so they are held fixed. Both sets decide every point; differences are grouped by route, purpose and
//! kind of change, with a count and an example.

use std::collections::{BTreeMap, BTreeSet};

use proto::pb;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time};

use super::compile::CompiledRule;
use super::model::{KindName, OverrideReasonName, UrgencyName};
use super::testing::empty_body;
use super::{Decision, DecisionRequest, PolicySet};

/// The family-agreement facts of a decision point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgreementPoint {
    NotRecorded,
    Agreed,
    InformedNotAsked,
    NotSought(OverrideReasonName),
    RefusedOverridden(OverrideReasonName),
}

/// One point of the decision space on a route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Point {
    pub purpose: String,
    pub token_roles: Vec<String>,
    pub recipient_role: String,
    pub urgency: i32,
    pub age: Option<u32>,
    pub date: Date,
    pub agreement: AgreementPoint,
}

impl Point {
    /// A short description of the facts, for reports.
    pub fn describe(&self) -> String {
        let mut parts = vec![format!("purpose `{}`", self.purpose)];
        if !self.token_roles.is_empty() {
            parts.push(format!("sender roles [{}]", self.token_roles.join(", ")));
        }
        if !self.recipient_role.is_empty() {
            parts.push(format!("recipient role `{}`", self.recipient_role));
        }
        if let Some(urgency) = UrgencyName::from_proto(self.urgency) {
            parts.push(format!("urgency `{}`", urgency.as_str()));
        }
        if let Some(age) = self.age {
            parts.push(format!("child aged {age}"))
        }
        parts.push(format!("on {}", self.date));
        parts.push(match self.agreement {
            AgreementPoint::NotRecorded => "no agreement recorded".to_owned(),
            AgreementPoint::Agreed => "family agreed".to_owned(),
            AgreementPoint::InformedNotAsked => "family informed, not asked".to_owned(),
            AgreementPoint::NotSought(reason) => format!("agreement not sought ({})", reason.as_str()),
            AgreementPoint::RefusedOverridden(reason) => format!("refusal overridden ({})", reason.as_str()),
        });
        parts.join(", ")
    }

    /// The envelope and time this point stands for.
    pub fn envelope(&self, kind: KindName, recipient: &str) -> (pb::Envelope, OffsetDateTime) {
        let now = PrimitiveDateTime::new(self.date, Time::from_hms(12, 0, 0).unwrap_or(Time::MIDNIGHT)).assume_utc();
        let mut envelope = pb::Envelope {
            kind: kind.proto_value(),
            purpose: self.purpose.clone(),
            urgency: self.urgency,
            recipients: vec![recipient.to_owned()],
            recipient_role: self.recipient_role.clone(),
            body: Some(empty_body(kind)),
            ..Default::default()
        };
        if let Some(age) = self.age {
            let year = self.date.year() - i32::try_from(age).unwrap_or(0);
            let day = self.date.day().min(28);
            envelope.subject = Some(pb::Child {
                date_of_birth: Some(pb::Date { year, month: i32::from(self.date.month() as u8), day: i32::from(day) }),
                ..Default::default()
            });
        }
        let override_of = |state: pb::AgreementState, reason: OverrideReasonName| pb::FamilyAgreement {
            state: state as i32,
            override_reason: reason.proto_value(),
            justification: "justification".to_owned(),
            authorised_by: "authoriser".to_owned(),
            ..Default::default()
        };
        envelope.agreement = match self.agreement {
            AgreementPoint::NotRecorded => None,
            AgreementPoint::Agreed => {
                Some(pb::FamilyAgreement { state: pb::AgreementState::Agreed as i32, ..Default::default() })
            }
            AgreementPoint::InformedNotAsked => {
                Some(pb::FamilyAgreement { state: pb::AgreementState::InformedNotAsked as i32, ..Default::default() })
            }
            AgreementPoint::NotSought(reason) => Some(override_of(pb::AgreementState::NotSought, reason)),
            AgreementPoint::RefusedOverridden(reason) => {
                Some(override_of(pb::AgreementState::RefusedOverridden, reason))
            }
        };
        (envelope, now)
    }
}

/// A route by agency ids.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub sender: String,
    pub recipient: String,
    pub kind: KindName,
}

/// The rules of `set` on `route`.
pub(crate) fn rules_on<'a>(set: &'a PolicySet, route: &Route) -> Vec<&'a CompiledRule> {
    let (Some(sender), Some(recipient)) = (set.agency_index.get(&route.sender), set.agency_index.get(&route.recipient))
    else {
        return Vec::new();
    };
    let Some(entry) = set.routes.get(*sender, *recipient, route.kind) else {
        return Vec::new();
    };
    entry
        .permits
        .iter()
        .map(|permit| permit.rule)
        .chain(entry.forbids.iter().copied())
        .map(|index| &set.rules[index])
        .collect()
}

/// Every route with a permit in `set`.
pub(crate) fn permitted_routes(set: &PolicySet) -> BTreeSet<Route> {
    let mut routes = BTreeSet::new();
    for (sender, recipient, kind, entry) in set.routes.iter() {
        if entry.permits.is_empty() {
            continue;
        }
        if let (Some(sender), Some(recipient)) =
            (set.agencies.get(usize::from(sender)), set.agencies.get(usize::from(recipient)))
        {
            routes.insert(Route { sender: sender.id.clone(), recipient: recipient.id.clone(), kind });
        }
    }
    routes
}

/// The points that cover every distinct outcome of `rules` (from one or more policy sets) on one route.
/// The most sender roles a route's decision points combine (every subset of them is tried: 2^8 role sets).
pub const MAX_COMBINED_ROLES: usize = 8;

/// The sender roles the rules on a route look at (their conditions and agreement overrides).
pub(crate) fn sender_roles_named(rules: &[&CompiledRule]) -> BTreeSet<String> {
    let mut roles = BTreeSet::new();
    for rule in rules {
        roles.extend(rule.conditions.sender_roles.iter().cloned());
        if let Some(agreement) = rule.agreement.as_ref().filter(|agreement| agreement.required) {
            roles.extend(agreement.override_roles.iter().cloned());
        }
    }
    roles
}

pub(crate) fn points_for(rules: &[&CompiledRule]) -> Vec<Point> {
    let mut purposes: BTreeSet<String> = BTreeSet::new();
    let mut recipient_roles: BTreeSet<String> = BTreeSet::new();
    let mut urgency_matters = false;
    let mut ages: BTreeSet<Option<u32>> = [None].into_iter().collect();
    let mut age_matters = false;
    let mut dates: BTreeSet<Date> = BTreeSet::new();
    let mut agreement_matters = false;
    for rule in rules {
        if rule.effect == super::model::Effect::Permit {
            purposes.extend(rule.purposes.iter().cloned());
        }
        recipient_roles.extend(rule.conditions.recipient_roles.iter().cloned());
        urgency_matters |= !rule.conditions.urgency.is_empty();
        if let Some(min) = rule.conditions.age_min {
            age_matters = true;
            ages.insert(Some(min));
            if min > 0 {
                ages.insert(Some(min - 1));
            }
        }
        if let Some(max) = rule.conditions.age_max {
            age_matters = true;
            ages.insert(Some(max));
            ages.insert(Some(max + 1));
        }
        if let Some(from) = rule.valid_from {
            dates.insert(from);
            if let Some(before) = from.previous_day() {
                dates.insert(before);
            }
        }
        if let Some(until) = rule.valid_until {
            dates.insert(until);
            if let Some(after) = until.next_day() {
                dates.insert(after);
            }
        }
        if rule.agreement.as_ref().is_some_and(|agreement| agreement.required) {
            agreement_matters = true;
        }
    }
    if !age_matters {
        ages = [None].into_iter().collect();
    } else {
        ages.insert(Some(10));
    }
    if dates.is_empty() {
        dates.insert(Date::from_calendar_date(2026, time::Month::January, 15).unwrap_or(Date::MIN));
    }
    let roles: Vec<String> = sender_roles_named(rules).into_iter().take(MAX_COMBINED_ROLES).collect();
    let mut role_sets: Vec<Vec<String>> = Vec::new();
    for mask in 0u32..(1 << roles.len()) {
        role_sets.push(
            roles
                .iter()
                .enumerate()
                .filter(|(index, _)| mask & (1 << index) != 0)
                .map(|(_, role)| role.clone())
                .collect(),
        );
    }
    let mut recipient_role_values: Vec<String> = vec![String::new()];
    if !recipient_roles.is_empty() {
        recipient_role_values.extend(recipient_roles);
        recipient_role_values.push("another-role".to_owned());
    }
    let urgencies: Vec<i32> = if urgency_matters { (0..=3).collect() } else { vec![0] };
    let mut agreements = vec![AgreementPoint::NotRecorded];
    if agreement_matters {
        agreements.push(AgreementPoint::Agreed);
        agreements.push(AgreementPoint::InformedNotAsked);
        for reason in OverrideReasonName::ALL {
            agreements.push(AgreementPoint::NotSought(reason));
            agreements.push(AgreementPoint::RefusedOverridden(reason));
        }
    }
    let mut points = Vec::new();
    for purpose in &purposes {
        for token_roles in &role_sets {
            for recipient_role in &recipient_role_values {
                for urgency in &urgencies {
                    for age in &ages {
                        for date in &dates {
                            for agreement in &agreements {
                                points.push(Point {
                                    purpose: purpose.clone(),
                                    token_roles: token_roles.clone(),
                                    recipient_role: recipient_role.clone(),
                                    urgency: *urgency,
                                    age: *age,
                                    date: *date,
                                    agreement: *agreement,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    points
}

/// Decides one point with one set.
pub(crate) fn decide_point(set: &PolicySet, route: &Route, point: &Point) -> Decision {
    let (envelope, now) = point.envelope(route.kind, &route.recipient);
    set.decide(&DecisionRequest {
        sender: &route.sender,
        sender_practitioner: "policy-diff",
        sender_roles: &point.token_roles,
        recipient: &route.recipient,
        envelope: &envelope,
        encoded_envelope: None,
        now,
    })
}

/// What changed at a group of decision points.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    NewlyAllowed,
    NewlyRefused,
    FieldsNewlyVisible(Vec<String>),
    FieldsNewlyHidden(Vec<String>),
    ObligationsChanged(String),
    LawfulBasisChanged(String),
}

/// One kind of change on one route and purpose.
#[derive(Clone, Debug)]
pub struct Change {
    pub route: Route,
    pub purpose: String,
    pub kind: ChangeKind,
    /// How many decision points show this change.
    pub points: usize,
    /// One of them.
    pub example: String,
}

/// The result of comparing two policy sets.
#[derive(Clone, Debug)]
pub struct DiffReport {
    pub routes_compared: usize,
    pub points_compared: usize,
    pub changes: Vec<Change>,
    /// Routes whose rules name more sender roles than are combined ([`MAX_COMBINED_ROLES`]): the comparison is not
    /// exact there (a change that depends on a role past the first eight, alphabetically, is not seen).
    pub not_exact: Vec<(Route, usize)>,
}

impl DiffReport {
    /// Whether the new set grants anything the old did not (a route allowed or a field made visible), or may on a
    /// route the comparison could not cover exactly.
    pub fn grants_new_access(&self) -> bool {
        !self.not_exact.is_empty()
            || self
                .changes
                .iter()
                .any(|change| matches!(change.kind, ChangeKind::NewlyAllowed | ChangeKind::FieldsNewlyVisible(_)))
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "compared {} decision points on {} routes\n",
            self.points_compared, self.routes_compared
        ));
        for (route, roles) in &self.not_exact {
            out.push_str(&format!(
                "NOT EXACT on {} -> {} `{}`: its rules name {roles} sender roles and only the first \
                 {MAX_COMBINED_ROLES} (alphabetically) are combined; review that route's changes by hand\n",
                route.sender,
                route.recipient,
                route.kind.as_str()
            ));
        }
        if self.changes.is_empty() {
            out.push_str("no decision changes\n");
            return out;
        }
        for change in &self.changes {
            let route = format!(
                "{} -> {} `{}` for `{}`",
                change.route.sender,
                change.route.recipient,
                change.route.kind.as_str(),
                change.purpose
            );
            let what = match &change.kind {
                ChangeKind::NewlyAllowed => "NEWLY ALLOWED".to_owned(),
                ChangeKind::NewlyRefused => "newly refused".to_owned(),
                ChangeKind::FieldsNewlyVisible(paths) => format!("NEWLY VISIBLE fields: {}", paths.join(", ")),
                ChangeKind::FieldsNewlyHidden(paths) => format!("newly hidden fields: {}", paths.join(", ")),
                ChangeKind::ObligationsChanged(text) => format!("obligations changed: {text}"),
                ChangeKind::LawfulBasisChanged(text) => format!("lawful basis changed: {text}"),
            };
            out.push_str(&format!(
                "{route}: {what} ({} point{}; e.g. {})\n",
                change.points,
                if change.points == 1 { "" } else { "s" },
                change.example
            ));
        }
        out
    }
}

fn describe_obligations(decision: &Decision) -> String {
    let obligations = &decision.obligations;
    format!(
        "acknowledge {}, retention {}, onward disclosure {}, escalate to {}",
        obligations
            .acknowledge_within
            .map(|deadline| deadline.to_string())
            .unwrap_or_else(|| "not required".to_owned()),
        obligations.retention_class.as_deref().unwrap_or("none"),
        if obligations.onward_disclosure { "allowed" } else { "not allowed" },
        obligations.escalate_to.as_deref().unwrap_or("nobody")
    )
}

/// Compares two policy sets over the whole decision space.
pub fn diff(old: &PolicySet, new: &PolicySet) -> DiffReport {
    let routes: BTreeSet<Route> = permitted_routes(old).union(&permitted_routes(new)).cloned().collect();
    let mut grouped: BTreeMap<(Route, String, ChangeKind), (usize, String)> = BTreeMap::new();
    let mut points_compared = 0;
    let mut not_exact = Vec::new();
    for route in &routes {
        let mut rules = rules_on(old, route);
        rules.extend(rules_on(new, route));
        let roles = sender_roles_named(&rules).len();
        if roles > MAX_COMBINED_ROLES {
            not_exact.push((route.clone(), roles));
        }
        for point in points_for(&rules) {
            points_compared += 1;
            let before = decide_point(old, route, &point);
            let after = decide_point(new, route, &point);
            let mut kinds = Vec::new();
            match (before.permitted, after.permitted) {
                (false, true) => kinds.push(ChangeKind::NewlyAllowed),
                (true, false) => kinds.push(ChangeKind::NewlyRefused),
                (true, true) => {
                    let visible: Vec<String> = after
                        .fields_shared
                        .iter()
                        .filter(|path| !before.fields_shared.contains(path))
                        .cloned()
                        .collect();
                    let hidden: Vec<String> = before
                        .fields_shared
                        .iter()
                        .filter(|path| !after.fields_shared.contains(path))
                        .cloned()
                        .collect();
                    if !visible.is_empty() {
                        kinds.push(ChangeKind::FieldsNewlyVisible(visible));
                    }
                    if !hidden.is_empty() {
                        kinds.push(ChangeKind::FieldsNewlyHidden(hidden));
                    }
                    let (old_obligations, new_obligations) =
                        (describe_obligations(&before), describe_obligations(&after));
                    if old_obligations != new_obligations {
                        kinds.push(ChangeKind::ObligationsChanged(format!("{old_obligations} -> {new_obligations}")));
                    }
                    if before.lawful_basis != after.lawful_basis {
                        kinds.push(ChangeKind::LawfulBasisChanged(format!(
                            "[{}] -> [{}]",
                            before.lawful_basis.join(", "),
                            after.lawful_basis.join(", ")
                        )));
                    }
                }
                (false, false) => {}
            }
            for kind in kinds {
                let entry = grouped
                    .entry((route.clone(), point.purpose.clone(), kind))
                    .or_insert_with(|| (0, point.describe()));
                entry.0 += 1;
            }
        }
    }
    DiffReport {
        routes_compared: routes.len(),
        points_compared,
        changes: grouped
            .into_iter()
            .map(|((route, purpose, kind), (points, example))| Change { route, purpose, kind, points, example })
            .collect(),
        not_exact,
    }
}
