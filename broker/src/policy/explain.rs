//! Explanations: "may A send K to B for P, with these facts, at this time, and what would B see?"
//!
//! An explanation is the decision plus, for every rule on the route (and, when there is none, the nearest rules for
//! the same sender and recipient or the same kind), whether it applied and every check it failed, with the values
//! seen, and the facts that were missing. It is meant for information-governance leads and developers; unlike a
//! decision's explanation it may quote values such as the child's age.

use std::fmt::Write as _;

use super::compile::CompiledRule;
use super::decide::{Facts, Prechecked, RuleFailure, check_rule, precheck};
use super::model::Effect;
use super::{Decision, DecisionRequest, PolicySet, calendar};

/// How one rule fared against a request.
#[derive(Clone, Debug)]
pub struct RuleReport {
    pub rule_id: String,
    pub effect: &'static str,
    pub flow: Option<String>,
    pub explanation: String,
    /// Whether the rule is on the request's route (sender, recipient, kind) or only near it.
    pub on_route: bool,
    pub applies: bool,
    /// The field paths the rule shares and withholds, as written.
    pub share: Vec<String>,
    pub withhold: Vec<String>,
    pub failures: Vec<RuleFailure>,
}

/// A decision with the reasons behind it.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub decision: Decision,
    pub rules: Vec<RuleReport>,
    pub missing_facts: Vec<String>,
    /// The acknowledgement deadline for a delivery at the request's time, if any.
    pub deadline: Option<time::OffsetDateTime>,
}

fn effect_name(effect: Effect) -> &'static str {
    match effect {
        Effect::Permit => "permit",
        Effect::Forbid => "forbid",
        Effect::Withhold => "withhold",
    }
}

impl PolicySet {
    /// Decides `request` and explains the decision.
    pub fn explain(&self, request: &DecisionRequest<'_>) -> Explanation {
        let decision = self.decide(request);
        let facts = Facts { request, local_date: calendar::uk_local(request.now).date() };
        let mut rules = Vec::new();
        let report = |rule: &CompiledRule, on_route: bool| {
            let (applies, failures) = match rule.effect {
                Effect::Withhold => (on_route, Vec::new()),
                _ => match check_rule(rule, &facts, true) {
                    Ok(_) => (on_route, Vec::new()),
                    Err(failures) => (false, failures),
                },
            };
            RuleReport {
                rule_id: rule.id.clone(),
                effect: effect_name(rule.effect),
                flow: rule.flow.clone(),
                explanation: rule.explanation.clone(),
                on_route,
                applies,
                share: rule.share.clone(),
                withhold: rule.withhold.clone(),
                failures,
            }
        };
        let route = match precheck(self, request) {
            Prechecked::Route { sender, recipient, kind } => Some((sender, recipient, kind)),
            Prechecked::Refused(..) => None,
        };
        let on_route: Vec<usize> = route
            .and_then(|(sender, recipient, kind)| self.routes.get(sender, recipient, kind))
            .map(|entry| {
                let mut all: Vec<usize> = entry
                    .permits
                    .iter()
                    .map(|permit| permit.rule)
                    .chain(entry.forbids.iter().copied())
                    .chain(entry.withholders.iter().copied())
                    .collect();
                all.sort_unstable();
                all.dedup();
                all
            })
            .unwrap_or_default();
        for index in &on_route {
            rules.push(report(&self.rules[*index], true));
        }
        if on_route.is_empty() {
            // Nearest rules: the same sender and recipient with other kinds, or the same kind from the same sender.
            let sender = self.agency_index.get(request.sender).copied();
            let recipient = self.agency_index.get(request.recipient).copied();
            let kind = super::KindName::from_proto(request.envelope.kind);
            for rule in self.rules.iter().filter(|rule| rule.effect == Effect::Permit) {
                let same_pair = sender.is_some_and(|s| rule.senders.contains(&s))
                    && recipient.is_some_and(|r| rule.recipients.contains(&r));
                let same_kind_from_sender =
                    sender.is_some_and(|s| rule.senders.contains(&s)) && kind.is_some_and(|k| rule.kinds.contains(&k));
                if same_pair || same_kind_from_sender {
                    rules.push(report(rule, false));
                }
                if rules.len() >= 5 {
                    break;
                }
            }
        }
        let mut missing_facts: Vec<String> = rules
            .iter()
            .flat_map(|rule| rule.failures.iter())
            .filter_map(|failure| failure.missing_fact.map(str::to_owned))
            .collect();
        missing_facts.sort();
        missing_facts.dedup();
        let deadline = decision.obligations.acknowledge_within.map(|deadline| self.deadline_at(&deadline, request.now));
        Explanation { decision, rules, missing_facts, deadline }
    }
}

impl Explanation {
    /// Renders the explanation as plain text for a terminal.
    pub fn to_text(&self) -> String {
        let decision = &self.decision;
        let mut out = String::new();
        let verdict = if decision.permitted { "PERMIT" } else { "DENY" };
        let _ = writeln!(out, "{verdict} ({})", decision.reason_code);
        let _ = writeln!(out, "  {}", decision.explanation);
        if !decision.rule_ids.is_empty() {
            let _ = writeln!(out, "deciding rules: {}", decision.rule_ids.join(", "));
        }
        if decision.permitted {
            let _ = writeln!(out, "lawful basis: {}", decision.lawful_basis.join(", "));
            let _ = writeln!(out, "the recipient sees:");
            for path in &decision.fields_shared {
                let _ = writeln!(out, "  + {path}");
            }
            let obligations = &decision.obligations;
            if let Some(within) = obligations.acknowledge_within {
                let due = self
                    .deadline
                    .and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok())
                    .unwrap_or_default();
                let _ = writeln!(out, "acknowledge: {within} (due {due} for a delivery now)");
            }
            if let Some(class) = &obligations.retention_class {
                let _ = writeln!(out, "retention class: {class}");
            }
            let _ = writeln!(
                out,
                "onward disclosure: {}",
                if obligations.onward_disclosure { "allowed" } else { "not allowed" }
            );
            if let Some(target) = &obligations.escalate_to {
                let _ = writeln!(out, "escalate to: {target}");
            }
            if let Some(used) = &decision.override_used {
                let _ = writeln!(
                    out,
                    "family agreement overridden: {} ({}), authorised by {}",
                    used.agreement_state, used.reason, used.authorised_by
                );
            }
        }
        if !decision.fields_withheld.is_empty() {
            let _ = writeln!(out, "present in the message but not in the copy:");
            for path in &decision.fields_withheld {
                let _ = writeln!(out, "  - {path}");
            }
        }
        if !self.rules.is_empty() {
            let on_route = self.rules.iter().any(|rule| rule.on_route);
            let _ = writeln!(out, "{}", if on_route { "rules on this route:" } else { "nearest rules:" });
            for rule in &self.rules {
                let status = if rule.applies {
                    "applies"
                } else if rule.failures.is_empty() {
                    "not on this route"
                } else {
                    "does not apply"
                };
                let _ = writeln!(out, "  {} `{}`: {status}", rule.effect, rule.rule_id);
                for failure in &rule.failures {
                    let _ = writeln!(out, "    x {} ({})", failure.detail, failure.code);
                }
            }
        }
        if !self.missing_facts.is_empty() {
            let _ = writeln!(out, "missing facts: {}", self.missing_facts.join(", "));
        }
        let _ = writeln!(out, "policy set: {}", decision.policy_set_hash);
        out
    }
}
