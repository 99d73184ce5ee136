//! Validation and compilation: from parsed policy files to the route index the decision path uses.
//!
//! Every check runs and every problem is collected, so that `broker policy validate` reports them all at once with
//! their file, line and column. Rules are expanded to concrete routes (sender agency, recipient agency, kind) and
//! stored in a hash map keyed by route; for each permit on a route the recipient's field mask is computed here, with
//! the fields that any rule withholds on that route already removed, so a decision only looks the mask up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost_reflect::{FieldDescriptor, MessageDescriptor};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::Date;

use super::calendar::{self, Calendar};
use super::fields::{self, MaskNode, ROUTING_FACTS};
use super::model::{
    AcknowledgeWithin, AgencyKind, Effect, KindName, LawfulBasis, Located, NamedEntry, OverrideReasonName, PolicyFile,
    RuleEntry,
};
use super::{Agency, Deadline, Diagnostic, Group, PolicySet, Severity, testing};

/// A parsed file and where it came from.
pub struct SourceFile {
    pub path: PathBuf,
    pub file: PolicyFile,
}

/// Where something was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
}

/// A rule after validation.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    pub id: String,
    pub effect: Effect,
    pub flow: Option<String>,
    pub explanation: String,
    /// Sorted; empty means every purpose (forbid and withhold rules only).
    pub purposes: Vec<String>,
    pub lawful_basis: Vec<&'static str>,
    pub agreement: Option<CompiledAgreement>,
    pub conditions: CompiledConditions,
    pub valid_from: Option<Date>,
    pub valid_until: Option<Date>,
    pub share: Vec<String>,
    pub withhold: Vec<String>,
    pub share_resolved: Vec<Vec<FieldDescriptor>>,
    pub withhold_resolved: Vec<Vec<FieldDescriptor>>,
    pub obligations: CompiledObligations,
    pub senders: BTreeSet<u16>,
    pub recipients: BTreeSet<u16>,
    pub kinds: BTreeSet<KindName>,
    pub place: Place,
}

impl CompiledRule {
    pub fn covers_purpose(&self, purpose: &str) -> bool {
        self.purposes.is_empty() || self.purposes.binary_search_by(|p| p.as_str().cmp(purpose)).is_ok()
    }

    /// Whether the rule has anything beyond its route and purposes that could stop it applying.
    pub fn is_unconditional(&self) -> bool {
        self.conditions.is_empty() && self.valid_from.is_none() && self.valid_until.is_none()
    }
}

#[derive(Clone, Debug, Default)]
pub struct CompiledAgreement {
    pub required: bool,
    pub override_reasons: Vec<OverrideReasonName>,
    pub override_roles: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CompiledConditions {
    pub age_min: Option<u32>,
    pub age_max: Option<u32>,
    pub urgency: Vec<i32>,
    pub sender_roles: Vec<String>,
    pub recipient_roles: Vec<String>,
}

impl CompiledConditions {
    pub fn is_empty(&self) -> bool {
        self.age_min.is_none()
            && self.age_max.is_none()
            && self.urgency.is_empty()
            && self.sender_roles.is_empty()
            && self.recipient_roles.is_empty()
    }
}

#[derive(Clone, Debug, Default)]
pub struct CompiledObligations {
    pub acknowledge_within: Option<Deadline>,
    pub retention_class: Option<String>,
    pub onward_disclosure: bool,
    pub escalate_to: Option<String>,
}

/// A permit on one route, with the recipient's mask for it.
#[derive(Clone, Debug)]
pub struct RoutePermit {
    pub rule: usize,
    pub mask: Arc<MaskNode>,
    pub fields_shared: Arc<[String]>,
}

/// Every rule that touches one route.
#[derive(Clone, Debug, Default)]
pub struct RouteEntry {
    pub permits: Vec<RoutePermit>,
    pub forbids: Vec<usize>,
    /// Rules (of any effect) that withhold fields on this route.
    pub withholders: Vec<usize>,
}

/// The index key of a route between two classes of agencies (see [`Routes`]).
fn route_key(sender: u16, recipient: u16, kind: KindName) -> u64 {
    (u64::from(sender) << 32) | (u64::from(recipient) << 8) | (kind as u64)
}

fn split_key(key: u64) -> (usize, usize, Option<KindName>) {
    let sender = usize::try_from(key >> 32).unwrap_or(usize::MAX);
    let recipient = usize::try_from((key >> 8) & 0xffff).unwrap_or(usize::MAX);
    let kind = KindName::ALL.into_iter().find(|kind| *kind as u64 == key & 0xff);
    (sender, recipient, kind)
}

/// Every route's rules, found by one hash lookup.
///
/// Agencies that the same rules name as senders form one sender class, and likewise for recipients; routes are
/// kept per (sender class, recipient class, kind). Every agency of a class is in exactly the same rules, so this is
/// the same table as one keyed by agencies, without growing with the square of the registry: keyed by agencies it
/// took ~1 GB for a registry of 1,010 agencies (a thousand family hubs, PERFORMANCE.md), where the thousand hubs are
/// now one class.
#[derive(Debug, Default)]
pub struct Routes {
    sender_class: Vec<u16>,
    recipient_class: Vec<u16>,
    /// The agencies of each class, in registry order (for listing routes and naming them).
    sender_members: Vec<Vec<u16>>,
    recipient_members: Vec<Vec<u16>>,
    entries: HashMap<u64, RouteEntry>,
}

impl Routes {
    /// The rules on the route from `sender` to `recipient` (registry indices) for `kind`.
    pub fn get(&self, sender: u16, recipient: u16, kind: KindName) -> Option<&RouteEntry> {
        let sender = *self.sender_class.get(usize::from(sender))?;
        let recipient = *self.recipient_class.get(usize::from(recipient))?;
        self.entries.get(&route_key(sender, recipient, kind))
    }

    /// Distinct routes kept (between classes).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every route between agencies that some rule touches: (sender, recipient, kind, its rules).
    pub fn iter(&self) -> impl Iterator<Item = (u16, u16, KindName, &RouteEntry)> + '_ {
        self.entries.iter().flat_map(move |(key, entry)| {
            let (sender, recipient, kind) = split_key(*key);
            let senders = self.sender_members.get(sender).map(Vec::as_slice).unwrap_or_default();
            let recipients = self.recipient_members.get(recipient).map(Vec::as_slice).unwrap_or_default();
            kind.into_iter().flat_map(move |kind| {
                senders
                    .iter()
                    .flat_map(move |sender| recipients.iter().map(move |recipient| (*sender, *recipient, kind, entry)))
            })
        })
    }

    /// One sender and one recipient agency of the route `key` (between classes), by id, to name it in a message.
    fn names(&self, key: u64, registry: &Registry) -> (String, String) {
        let (sender, recipient, _) = split_key(key);
        let first = |members: &[Vec<u16>], class: usize| {
            members
                .get(class)
                .and_then(|agencies| agencies.first())
                .and_then(|agency| registry.agencies.get(usize::from(*agency)))
                .map(|agency| agency.id.clone())
                .unwrap_or_default()
        };
        (first(&self.sender_members, sender), first(&self.recipient_members, recipient))
    }

    /// The classes of a rule's senders and of its recipients.
    fn classes_of(&self, rule: &CompiledRule) -> (BTreeSet<u16>, BTreeSet<u16>) {
        let class = |classes: &[u16], agency: &u16| classes.get(usize::from(*agency)).copied();
        (
            rule.senders.iter().filter_map(|agency| class(&self.sender_class, agency)).collect(),
            rule.recipients.iter().filter_map(|agency| class(&self.recipient_class, agency)).collect(),
        )
    }
}

/// Groups the registry's `count` agencies by the set of rules whose `members` include them: each agency's class,
/// and each class's agencies.
fn agency_classes(
    count: usize,
    rules: &[CompiledRule],
    members: impl Fn(&CompiledRule) -> &BTreeSet<u16>,
) -> (Vec<u16>, Vec<Vec<u16>>) {
    let mut signatures: Vec<Vec<u32>> = vec![Vec::new(); count];
    for (index, rule) in rules.iter().enumerate() {
        for agency in members(rule) {
            if let Some(signature) = signatures.get_mut(usize::from(*agency)) {
                signature.push(u32::try_from(index).unwrap_or(u32::MAX));
            }
        }
    }
    let mut ids: HashMap<Vec<u32>, u16> = HashMap::new();
    let mut class_of = Vec::with_capacity(count);
    let mut classes: Vec<Vec<u16>> = Vec::new();
    for (agency, signature) in signatures.into_iter().enumerate() {
        // Agencies are indexed by u16, so there are never more classes than a u16 holds.
        let next = u16::try_from(classes.len()).unwrap_or(u16::MAX);
        let class = *ids.entry(signature).or_insert(next);
        if class == next {
            classes.push(Vec::new());
        }
        if let Some(agencies) = classes.get_mut(usize::from(class)) {
            agencies.push(u16::try_from(agency).unwrap_or(u16::MAX));
        }
        class_of.push(class);
    }
    (class_of, classes)
}

struct Diagnostics {
    list: Vec<Diagnostic>,
}

impl Diagnostics {
    fn push(&mut self, severity: Severity, file: &Path, line: u64, column: u64, message: String) {
        self.list.push(Diagnostic { file: file.to_path_buf(), line, column, severity, message });
    }

    fn error<T>(&mut self, file: &Path, at: &Located<T>, message: String) {
        self.push(Severity::Error, file, at.line, at.column, message);
    }

    fn warning<T>(&mut self, file: &Path, at: &Located<T>, message: String) {
        self.push(Severity::Warning, file, at.line, at.column, message);
    }

    fn error_at(&mut self, place: &Place, message: String) {
        self.push(Severity::Error, &place.file, place.line, place.column, message);
    }

    fn has_errors(&self) -> bool {
        self.list.iter().any(|diagnostic| diagnostic.severity == Severity::Error)
    }
}

/// The registry, needed to resolve selectors.
struct Registry {
    agencies: Vec<Agency>,
    agency_index: HashMap<String, u16>,
    groups: BTreeMap<String, Group>,
    purposes: BTreeSet<String>,
    roles: BTreeSet<String>,
    retention_classes: BTreeSet<String>,
}

impl Registry {
    /// The agencies a selector (agency id, group id, agency kind, or `any`) names.
    fn resolve_selector(&self, selector: &str) -> Option<BTreeSet<u16>> {
        if selector == "any" {
            return Some((0..self.agencies.len()).filter_map(|index| u16::try_from(index).ok()).collect());
        }
        if let Some(index) = self.agency_index.get(selector) {
            return Some([*index].into_iter().collect());
        }
        if self.groups.contains_key(selector) {
            return Some(self.members(|agency| agency.groups.iter().any(|group| group == selector)));
        }
        let kind = AgencyKind::ALL.into_iter().find(|kind| kind.as_str() == selector)?;
        Some(self.members(|agency| agency.kind == kind))
    }

    fn members(&self, wanted: impl Fn(&Agency) -> bool) -> BTreeSet<u16> {
        self.agencies
            .iter()
            .enumerate()
            .filter(|(_, agency)| wanted(agency))
            .filter_map(|(index, _)| u16::try_from(index).ok())
            .collect()
    }

    fn selector_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.agencies.iter().map(|agency| agency.id.clone()).collect();
        names.extend(self.groups.keys().cloned());
        names.extend(AgencyKind::ALL.iter().map(|kind| kind.as_str().to_owned()));
        names.push("any".to_owned());
        names
    }
}

fn suggestion(given: &str, known: &[String]) -> String {
    fields::nearest_name(given, known).map(|name| format!("; did you mean `{name}`?")).unwrap_or_default()
}

/// Validates and compiles parsed files. Returns every error (and warning) when any error is found.
pub fn compile(sources: Vec<SourceFile>, base_dir: &Path) -> Result<PolicySet, Vec<Diagnostic>> {
    let mut diagnostics = Diagnostics { list: Vec::new() };
    let envelope =
        match proto::descriptor_pool().ok().and_then(|pool| pool.get_message_by_name(proto::ENVELOPE_MESSAGE)) {
            Some(envelope) => envelope,
            None => {
                diagnostics.push(
                    Severity::Error,
                    base_dir,
                    0,
                    0,
                    "the broker's message descriptors could not be read".to_owned(),
                );
                return Err(diagnostics.list);
            }
        };

    let registry = build_registry(&sources, &mut diagnostics);
    let calendar = build_calendar(&sources, &mut diagnostics);
    let rules = compile_rules(&sources, &registry, &envelope, &mut diagnostics);
    let routing_mask = routing_mask(&envelope);
    let routes = build_routes(&rules, &routing_mask, &registry, &mut diagnostics);
    let hash = canonical_hash(&sources);
    let rule_ids: BTreeSet<String> = rules.iter().map(|rule| rule.id.clone()).collect();
    let tests = testing::prepare_tests(&sources, base_dir, &registry.agency_index, &rule_ids, &envelope)
        .unwrap_or_else(|problems| {
            diagnostics.list.extend(problems);
            Vec::new()
        });

    if diagnostics.has_errors() {
        return Err(diagnostics.list);
    }
    Ok(PolicySet {
        hash,
        agencies: registry.agencies,
        agency_index: registry.agency_index,
        groups: registry.groups.into_values().collect(),
        purposes: registry.purposes.into_iter().collect(),
        roles: registry.roles.into_iter().collect(),
        rules,
        routes,
        calendar,
        wire: fields::WirePlan::new(&envelope),
        envelope,
        routing_mask: Arc::new(routing_mask),
        tests,
        warnings: diagnostics.list,
    })
}

fn build_registry(sources: &[SourceFile], diagnostics: &mut Diagnostics) -> Registry {
    let mut registry = Registry {
        agencies: Vec::new(),
        agency_index: HashMap::new(),
        groups: BTreeMap::new(),
        purposes: BTreeSet::new(),
        roles: BTreeSet::new(),
        retention_classes: BTreeSet::new(),
    };
    let mut seen: HashMap<String, (PathBuf, u64)> = HashMap::new();
    for source in sources {
        for group in &source.file.groups {
            let id = &group.value.id;
            check_id(&source.path, id, "group", diagnostics);
            if let Some((file, line)) = seen.insert(id.value.clone(), (source.path.clone(), id.line)) {
                diagnostics.error(
                    &source.path,
                    id,
                    format!("`{}` is declared twice (also at {}:{line})", id.value, file.display()),
                );
            }
            if id.value == "any" || AgencyKind::ALL.iter().any(|kind| kind.as_str() == id.value) {
                diagnostics.error(
                    &source.path,
                    id,
                    format!("`{}` is reserved (an agency kind or `any`); choose another group id", id.value),
                );
            }
            registry.groups.insert(id.value.clone(), Group { id: id.value.clone(), name: group.value.name.clone() });
        }
    }
    for source in sources {
        for agency in &source.file.agencies {
            let id = &agency.value.id;
            check_id(&source.path, id, "agency", diagnostics);
            if let Some((file, line)) = seen.insert(id.value.clone(), (source.path.clone(), id.line)) {
                diagnostics.error(
                    &source.path,
                    id,
                    format!("`{}` is declared twice (also at {}:{line})", id.value, file.display()),
                );
                continue;
            }
            if id.value == "any" || AgencyKind::ALL.iter().any(|kind| kind.as_str() == id.value) {
                diagnostics.error(
                    &source.path,
                    id,
                    format!("`{}` is reserved (an agency kind or `any`); choose another agency id", id.value),
                );
            }
            for group in &agency.value.groups {
                if !registry.groups.contains_key(&group.value) {
                    let known: Vec<String> = registry.groups.keys().cloned().collect();
                    diagnostics.error(
                        &source.path,
                        group,
                        format!("unknown group `{}`{}", group.value, suggestion(&group.value, &known)),
                    );
                }
            }
            let Ok(index) = u16::try_from(registry.agencies.len()) else {
                diagnostics.error(&source.path, id, "too many agencies (at most 65535)".to_owned());
                continue;
            };
            registry.agency_index.insert(id.value.clone(), index);
            registry.agencies.push(Agency {
                id: id.value.clone(),
                name: agency.value.name.clone(),
                kind: agency.value.kind,
                groups: agency.value.groups.iter().map(|group| group.value.clone()).collect(),
                description: agency.value.description.clone(),
            });
        }
    }
    let declare = |entries: &dyn Fn(&PolicyFile) -> &Vec<Located<NamedEntry>>,
                   what: &str,
                   target: &mut BTreeSet<String>,
                   diagnostics: &mut Diagnostics| {
        for source in sources {
            for entry in entries(&source.file) {
                let id = &entry.value.id;
                check_id(&source.path, id, what, diagnostics);
                if !target.insert(id.value.clone()) {
                    diagnostics.error(&source.path, id, format!("{what} `{}` is declared twice", id.value));
                }
            }
        }
    };
    declare(&|file| &file.purposes, "purpose", &mut registry.purposes, diagnostics);
    declare(&|file| &file.roles, "role", &mut registry.roles, diagnostics);
    declare(&|file| &file.retention_classes, "retention class", &mut registry.retention_classes, diagnostics);
    if registry.agencies.is_empty()
        && !sources.is_empty()
        && let Some(first) = sources.first()
    {
        diagnostics.push(
            Severity::Error,
            &first.path,
            1,
            1,
            "the policy set declares no agencies (add an `agencies` section)".to_owned(),
        );
    }
    registry
}

fn check_id(file: &Path, id: &Located<String>, what: &str, diagnostics: &mut Diagnostics) {
    let valid = !id.value.is_empty()
        && id.value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !id.value.starts_with('-');
    if !valid {
        diagnostics.error(
            file,
            id,
            format!("{what} id `{}` must use lowercase letters, digits and hyphens only", id.value),
        );
    }
}

fn build_calendar(sources: &[SourceFile], diagnostics: &mut Diagnostics) -> Calendar {
    let mut calendar = Calendar::default();
    let mut found: Option<(PathBuf, u64)> = None;
    for source in sources {
        let Some(entry) = &source.file.calendar else {
            continue;
        };
        if let Some((file, line)) = &found {
            diagnostics.error(
                &source.path,
                entry,
                format!("a second calendar; the policy set already has one at {}:{line}", file.display()),
            );
            continue;
        }
        found = Some((source.path.clone(), entry.line));
        let clock = |at: &Located<String>, diagnostics: &mut Diagnostics| {
            let parsed = calendar::parse_clock(&at.value);
            if parsed.is_none() {
                diagnostics.error(&source.path, at, format!("`{}` is not a time of day (`HH:MM`)", at.value));
            }
            parsed
        };
        if let Some(time) = clock(&entry.value.school_day_starts_at, diagnostics) {
            calendar.school_day_starts_at = time;
        }
        if let Some(time) = clock(&entry.value.working_day_starts_at, diagnostics) {
            calendar.working_day_starts_at = time;
        }
        for day in &entry.value.bank_holidays {
            match parse_located_date(&source.path, day, diagnostics) {
                Some(date) => {
                    calendar.bank_holidays.insert(date);
                }
                None => continue,
            }
        }
        for closure in &entry.value.school_closures {
            let from = parse_located_date(&source.path, &closure.value.from, diagnostics);
            let until = parse_located_date(&source.path, &closure.value.until, diagnostics);
            if let (Some(from), Some(until)) = (from, until) {
                if until < from {
                    diagnostics.error(
                        &source.path,
                        closure,
                        format!("school closure `{}` ends before it starts", closure.value.name),
                    );
                }
                calendar.school_closures.push((from, until));
            }
        }
    }
    calendar.school_closures.sort();
    calendar
}

fn parse_located_date(file: &Path, at: &Located<String>, diagnostics: &mut Diagnostics) -> Option<Date> {
    let parsed = calendar::parse_date(&at.value);
    if parsed.is_none() {
        diagnostics.error(file, at, format!("`{}` is not a date (`YYYY-MM-DD`)", at.value));
    }
    parsed
}

fn compile_rules(
    sources: &[SourceFile],
    registry: &Registry,
    envelope: &MessageDescriptor,
    diagnostics: &mut Diagnostics,
) -> Vec<CompiledRule> {
    let mut rules = Vec::new();
    let mut seen: HashMap<String, Place> = HashMap::new();
    for source in sources {
        for rule in &source.file.rules {
            let place = Place { file: source.path.clone(), line: rule.value.id.line, column: rule.value.id.column };
            check_id(&source.path, &rule.value.id, "rule", diagnostics);
            if let Some(other) = seen.insert(rule.value.id.value.clone(), place.clone()) {
                diagnostics.error_at(
                    &place,
                    format!(
                        "rule `{}` is declared twice (also at {}:{})",
                        rule.value.id.value,
                        other.file.display(),
                        other.line
                    ),
                );
                continue;
            }
            if let Some(compiled) = compile_rule(&source.path, &rule.value, place, registry, envelope, diagnostics) {
                rules.push(compiled);
            }
        }
    }
    rules.sort_by(|left, right| left.id.cmp(&right.id));
    rules
}

fn resolve_selectors(
    file: &Path,
    selectors: &[Located<String>],
    registry: &Registry,
    diagnostics: &mut Diagnostics,
) -> BTreeSet<u16> {
    let mut agencies = BTreeSet::new();
    for selector in selectors {
        match registry.resolve_selector(&selector.value) {
            Some(found) => agencies.extend(found),
            None => diagnostics.error(
                file,
                selector,
                format!(
                    "unknown agency, group or agency kind `{}`{}",
                    selector.value,
                    suggestion(&selector.value, &registry.selector_names())
                ),
            ),
        }
    }
    agencies
}

fn check_roles(file: &Path, roles: &[Located<String>], registry: &Registry, diagnostics: &mut Diagnostics) {
    for role in roles {
        if !registry.roles.contains(&role.value) {
            let known: Vec<String> = registry.roles.iter().cloned().collect();
            diagnostics.error(file, role, format!("unknown role `{}`{}", role.value, suggestion(&role.value, &known)));
        }
    }
}

fn compile_rule(
    file: &Path,
    rule: &RuleEntry,
    place: Place,
    registry: &Registry,
    envelope: &MessageDescriptor,
    diagnostics: &mut Diagnostics,
) -> Option<CompiledRule> {
    let errors_before = diagnostics.list.len();
    let id = &rule.id.value;
    let senders = resolve_selectors(file, &rule.from, registry, diagnostics);
    let mut recipients = resolve_selectors(file, &rule.to, registry, diagnostics);
    let excluded = resolve_selectors(file, &rule.except_to, registry, diagnostics);
    let selectors_resolved = diagnostics.list.len() == errors_before;
    recipients.retain(|recipient| !excluded.contains(recipient));
    let kinds: BTreeSet<KindName> = rule.kinds.iter().map(|kind| kind.value).collect();

    if rule.from.is_empty() || rule.to.is_empty() || rule.kinds.is_empty() {
        diagnostics.error(
            file,
            &rule.id,
            format!("rule `{id}` can never match: it needs at least one `from`, one `to` and one of `kinds`"),
        );
    } else if selectors_resolved && (senders.is_empty() || recipients.is_empty()) {
        diagnostics.error(
            file,
            &rule.id,
            format!("rule `{id}` can never match: its `from` or `to` (less `except_to`) names no agency"),
        );
    }

    for purpose in &rule.purposes {
        if !registry.purposes.contains(&purpose.value) {
            let known: Vec<String> = registry.purposes.iter().cloned().collect();
            diagnostics.error(
                file,
                purpose,
                format!("unknown purpose `{}`{}", purpose.value, suggestion(&purpose.value, &known)),
            );
        }
    }

    let bases: BTreeSet<LawfulBasis> = rule.lawful_basis.iter().map(|basis| basis.value).collect();
    match rule.effect {
        Effect::Permit => {
            if rule.purposes.is_empty() {
                diagnostics.error(file, &rule.id, format!("permit `{id}` must list the `purposes` it covers"));
            }
            if bases.is_empty() {
                diagnostics.error(file, &rule.id, format!("permit `{id}` must name its `lawful_basis`"));
            }
            if rule.share.is_empty() {
                diagnostics.warning(
                    file,
                    &rule.id,
                    format!("permit `{id}` shares no fields: the recipient would see the routing facts only"),
                );
            }
        }
        Effect::Forbid => {
            if !rule.share.is_empty()
                || !rule.withhold.is_empty()
                || rule.obligations.is_some()
                || rule.agreement.is_some()
                || !bases.is_empty()
            {
                diagnostics.error(
                    file,
                    &rule.id,
                    format!(
                        "forbid `{id}` refuses the route, so `share`, `withhold`, `lawful_basis`, `agreement` and \
                         `obligations` mean nothing on it; remove them"
                    ),
                );
            }
        }
        Effect::Withhold => {
            if rule.withhold.is_empty() {
                diagnostics.error(file, &rule.id, format!("withhold rule `{id}` must list the fields to `withhold`"));
            }
            if !rule.share.is_empty()
                || !rule.purposes.is_empty()
                || rule.obligations.is_some()
                || rule.agreement.is_some()
                || rule.conditions.is_some()
                || rule.valid.is_some()
                || !bases.is_empty()
            {
                diagnostics.error(
                    file,
                    &rule.id,
                    format!(
                        "withhold rule `{id}` applies to every message on its routes; it may only have `from`, \
                         `to`, `except_to`, `kinds`, `withhold` and `explanation`"
                    ),
                );
            }
        }
    }
    if bases.contains(&LawfulBasis::LegitimateInterests) {
        let public_bodies: Vec<&str> = senders
            .iter()
            .filter_map(|index| registry.agencies.get(usize::from(*index)))
            .filter(|agency| agency.kind != AgencyKind::VoluntarySector)
            .map(|agency| agency.id.as_str())
            .collect();
        let at = rule.lawful_basis.iter().find(|basis| basis.value == LawfulBasis::LegitimateInterests);
        if let (false, Some(at)) = (public_bodies.is_empty(), at) {
            diagnostics.error(
                file,
                at,
                format!(
                    "legitimate interests (`uk-gdpr-6-1-f`) is for voluntary-sector senders only, but rule `{id}` \
                     lets public bodies send under it: {}",
                    public_bodies.join(", ")
                ),
            );
        }
    }
    if bases.contains(&LawfulBasis::SubstantialPublicInterest) && !bases.contains(&LawfulBasis::SafeguardingChildren) {
        diagnostics.warning(
            file,
            &rule.id,
            format!("rule `{id}` names `uk-gdpr-9-2-g` without its condition `dpa-2018-sch1-pt2-para18`"),
        );
    }
    if bases.contains(&LawfulBasis::CriminalOffenceData) && !bases.contains(&LawfulBasis::CriminalOffenceConditions) {
        diagnostics.warning(
            file,
            &rule.id,
            format!("rule `{id}` names `uk-gdpr-10` without its condition `dpa-2018-sch1-pt3`"),
        );
    }

    let agreement = rule.agreement.as_ref().map(|entry| {
        check_roles(file, &entry.value.override_roles, registry, diagnostics);
        if !entry.value.required && !entry.value.override_reasons.is_empty() {
            diagnostics.warning(
                file,
                entry,
                format!("rule `{id}` lists override reasons but does not require agreement, so they are never used"),
            );
        }
        if !entry.value.override_roles.is_empty() && entry.value.override_reasons.is_empty() {
            diagnostics.error(
                file,
                entry,
                format!("rule `{id}` names `override_roles` but no `override_reasons`, so no override can be used"),
            );
        }
        let mut reasons = entry.value.override_reasons.clone();
        reasons.sort();
        reasons.dedup();
        let mut roles: Vec<String> = entry.value.override_roles.iter().map(|role| role.value.clone()).collect();
        roles.sort();
        roles.dedup();
        CompiledAgreement { required: entry.value.required, override_reasons: reasons, override_roles: roles }
    });

    let mut conditions = CompiledConditions::default();
    if let Some(entry) = &rule.conditions {
        let given = &entry.value;
        if let Some(range) = given.child_age {
            if let (Some(min), Some(max)) = (range.min, range.max)
                && min > max
            {
                diagnostics.error(
                    file,
                    entry,
                    format!("rule `{id}` can never match: its `child_age` minimum {min} is above its maximum {max}"),
                );
            }
            conditions.age_min = range.min;
            conditions.age_max = range.max;
        }
        conditions.urgency = given.urgency.iter().map(|urgency| urgency.proto_value()).collect();
        conditions.urgency.sort_unstable();
        conditions.urgency.dedup();
        check_roles(file, &given.sender_role, registry, diagnostics);
        check_roles(file, &given.recipient_role, registry, diagnostics);
        conditions.sender_roles = given.sender_role.iter().map(|role| role.value.clone()).collect();
        conditions.recipient_roles = given.recipient_role.iter().map(|role| role.value.clone()).collect();
    }

    let (mut valid_from, mut valid_until) = (None, None);
    if let Some(window) = &rule.valid {
        valid_from = window.value.from.as_ref().and_then(|at| parse_located_date(file, at, diagnostics));
        valid_until = window.value.until.as_ref().and_then(|at| parse_located_date(file, at, diagnostics));
        if let (Some(from), Some(until)) = (valid_from, valid_until)
            && until < from
        {
            diagnostics.error(
                file,
                window,
                format!("rule `{id}` can never match: it is valid until {until}, before it starts on {from}"),
            );
        }
    }

    let allowed_bodies: BTreeSet<&str> = kinds.iter().map(|kind| kind.body_field()).collect();
    let all_bodies: BTreeSet<&str> = KindName::ALL.iter().map(|kind| kind.body_field()).collect();
    let mut resolve_all = |paths: &[Located<String>], what: &str| -> Vec<Vec<FieldDescriptor>> {
        let mut resolved = Vec::new();
        for path in paths {
            match fields::resolve_path(envelope, &path.value) {
                Err(error) => diagnostics.error(file, path, error.message),
                Ok(found) => {
                    let top = found.first().map(|field| field.name().to_owned()).unwrap_or_default();
                    if ROUTING_FACTS.contains(&top.as_str()) {
                        diagnostics.error(
                            file,
                            path,
                            format!(
                                "`{}` is a routing fact that every copy holds; it cannot be named in `{what}`",
                                path.value
                            ),
                        );
                        continue;
                    }
                    if all_bodies.contains(top.as_str()) && !allowed_bodies.contains(top.as_str()) {
                        let kind_names: Vec<&str> = kinds.iter().map(|kind| kind.as_str()).collect();
                        diagnostics.error(
                            file,
                            path,
                            format!(
                                "`{}` is never present in a message of kind {}: that body is `{}`",
                                path.value,
                                kind_names.join(", "),
                                allowed_bodies.iter().copied().collect::<Vec<_>>().join("`, `")
                            ),
                        );
                        continue;
                    }
                    resolved.push(found);
                }
            }
        }
        resolved
    };
    let share_resolved = resolve_all(&rule.share, "share");
    let withhold_resolved = resolve_all(&rule.withhold, "withhold");
    for (index, path) in rule.share.iter().enumerate() {
        if rule.share[..index].iter().any(|other| other.value == path.value) {
            diagnostics.warning(file, path, format!("`{}` is listed twice in `share`", path.value));
        }
    }

    let mut obligations = CompiledObligations::default();
    if let Some(entry) = &rule.obligations {
        let given = &entry.value;
        obligations.acknowledge_within = given.acknowledge_within.map(deadline_of);
        if matches!(
            given.acknowledge_within,
            Some(
                AcknowledgeWithin::Minutes(0)
                    | AcknowledgeWithin::Hours(0)
                    | AcknowledgeWithin::WorkingDays(0)
                    | AcknowledgeWithin::SchoolDays(0)
            )
        ) {
            diagnostics.error(file, entry, format!("rule `{id}`: `acknowledge_within` must be more than zero"));
        }
        if let Some(class) = &given.retention_class
            && !registry.retention_classes.contains(&class.value)
        {
            let known: Vec<String> = registry.retention_classes.iter().cloned().collect();
            diagnostics.error(
                file,
                class,
                format!("unknown retention class `{}`{}", class.value, suggestion(&class.value, &known)),
            );
        }
        if let Some(target) = &given.escalate_to {
            if !registry.agency_index.contains_key(&target.value) {
                let known: Vec<String> = registry.agencies.iter().map(|agency| agency.id.clone()).collect();
                diagnostics.error(
                    file,
                    target,
                    format!("unknown agency `{}`{}", target.value, suggestion(&target.value, &known)),
                );
            }
            if given.acknowledge_within.is_none() {
                diagnostics.error(
                    file,
                    target,
                    format!("rule `{id}` names `escalate_to` but no `acknowledge_within` deadline to escalate on"),
                );
            }
        }
        obligations.retention_class = given.retention_class.as_ref().map(|class| class.value.clone());
        obligations.onward_disclosure = given.onward_disclosure;
        obligations.escalate_to = given.escalate_to.as_ref().map(|target| target.value.clone());
    }

    if diagnostics.list[errors_before..].iter().any(|diagnostic| diagnostic.severity == Severity::Error) {
        return None;
    }
    let mut purposes: Vec<String> = rule.purposes.iter().map(|purpose| purpose.value.clone()).collect();
    purposes.sort();
    purposes.dedup();
    let mut share: Vec<String> = rule.share.iter().map(|path| path.value.clone()).collect();
    share.sort();
    share.dedup();
    let mut withhold: Vec<String> = rule.withhold.iter().map(|path| path.value.clone()).collect();
    withhold.sort();
    withhold.dedup();
    Some(CompiledRule {
        id: id.clone(),
        effect: rule.effect,
        flow: rule.flow.clone(),
        explanation: rule.explanation.trim().to_owned(),
        purposes,
        lawful_basis: bases.iter().map(|basis| basis.as_str()).collect(),
        agreement,
        conditions,
        valid_from,
        valid_until,
        share,
        withhold,
        share_resolved,
        withhold_resolved,
        obligations,
        senders,
        recipients,
        kinds,
        place,
    })
}

/// The deadline a policy file's `acknowledge_within` means.
pub fn deadline_of(within: AcknowledgeWithin) -> Deadline {
    match within {
        AcknowledgeWithin::Minutes(minutes) => {
            Deadline::Within(std::time::Duration::from_secs(u64::from(minutes) * 60))
        }
        AcknowledgeWithin::Hours(hours) => Deadline::Within(std::time::Duration::from_secs(u64::from(hours) * 3600)),
        AcknowledgeWithin::WorkingDays(days) => Deadline::WorkingDays(days),
        AcknowledgeWithin::SchoolDays(days) => Deadline::SchoolDays(days),
        AcknowledgeWithin::BeforeNextSchoolDay => Deadline::BeforeNextSchoolDay,
    }
}

/// The mask holding only the routing facts.
pub fn routing_mask(envelope: &MessageDescriptor) -> MaskNode {
    let mut mask = MaskNode::empty(envelope.clone());
    for name in ROUTING_FACTS {
        if let Some(field) = envelope.get_field_by_name(name) {
            mask.insert(&[field]);
        }
    }
    mask
}

fn path_is_within(inner: &[FieldDescriptor], outer: &[FieldDescriptor]) -> bool {
    inner.len() >= outer.len() && inner.iter().zip(outer).all(|(left, right)| left.number() == right.number())
}

fn path_text(path: &[FieldDescriptor]) -> String {
    path.iter().map(|field| field.name()).collect::<Vec<_>>().join(".")
}

/// A route mask and its field paths, shared by every route with the same permit and the same withholders.
type CachedMask = (Arc<MaskNode>, Arc<[String]>);

fn build_routes(
    rules: &[CompiledRule],
    routing: &MaskNode,
    registry: &Registry,
    diagnostics: &mut Diagnostics,
) -> Routes {
    let (sender_class, sender_members) = agency_classes(registry.agencies.len(), rules, |rule| &rule.senders);
    let (recipient_class, recipient_members) = agency_classes(registry.agencies.len(), rules, |rule| &rule.recipients);
    let mut table =
        Routes { sender_class, recipient_class, sender_members, recipient_members, entries: HashMap::new() };
    let mut routes: HashMap<u64, RouteEntry> = HashMap::new();
    for (index, rule) in rules.iter().enumerate() {
        let (senders, recipients) = table.classes_of(rule);
        for sender in &senders {
            for recipient in &recipients {
                for kind in &rule.kinds {
                    let entry = routes.entry(route_key(*sender, *recipient, *kind)).or_default();
                    match rule.effect {
                        Effect::Permit => entry.permits.push(RoutePermit {
                            rule: index,
                            mask: Arc::new(MaskNode::empty(routing.message.clone())),
                            fields_shared: Arc::from(Vec::new()),
                        }),
                        Effect::Forbid => entry.forbids.push(index),
                        Effect::Withhold => {}
                    }
                    if !rule.withhold_resolved.is_empty() {
                        entry.withholders.push(index);
                    }
                }
            }
        }
    }

    // Base masks per rule (share + routing facts); route masks subtract the route's withheld fields.
    let base: Vec<Arc<MaskNode>> = rules
        .iter()
        .map(|rule| {
            let mut mask = routing.clone();
            for path in &rule.share_resolved {
                mask.insert(path);
            }
            Arc::new(mask)
        })
        .collect();
    let base_paths: Vec<Arc<[String]>> = base.iter().map(|mask| Arc::from(mask.paths())).collect();
    let mut cache: HashMap<(usize, Vec<usize>), CachedMask> = HashMap::new();
    let mut reported: BTreeSet<(usize, usize, String)> = BTreeSet::new();
    let mut overlap_reported: BTreeSet<(usize, usize)> = BTreeSet::new();
    let mut keys: Vec<u64> = routes.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let Some(entry) = routes.get_mut(&key) else {
            continue;
        };
        entry.permits.sort_by_key(|permit| permit.rule);
        entry.forbids.sort_unstable();
        entry.withholders.sort_unstable();
        for permit in &mut entry.permits {
            let rule = &rules[permit.rule];
            if entry.withholders.is_empty() {
                permit.mask = base[permit.rule].clone();
                permit.fields_shared = base_paths[permit.rule].clone();
                continue;
            }
            // A share that another rule withholds on the same route is a contradiction worth stopping for.
            for holder in &entry.withholders {
                for withheld in &rules[*holder].withhold_resolved {
                    for shared in &rule.share_resolved {
                        if path_is_within(shared, withheld)
                            && reported.insert((permit.rule, *holder, path_text(shared)))
                        {
                            let (sender, recipient) = table.names(key, registry);
                            diagnostics.error_at(
                                &rule.place,
                                format!(
                                    "rule `{}` shares `{}` from `{sender}` to `{recipient}`, but rule `{}` withholds \
                                     `{}` on that route, so it would never be shared",
                                    rule.id,
                                    path_text(shared),
                                    rules[*holder].id,
                                    path_text(withheld)
                                ),
                            );
                        }
                    }
                }
            }
            let cache_key = (permit.rule, entry.withholders.clone());
            let (mask, paths) = cache
                .entry(cache_key)
                .or_insert_with(|| {
                    let mut mask = (*base[permit.rule]).clone();
                    for holder in &entry.withholders {
                        for withheld in &rules[*holder].withhold_resolved {
                            mask.remove(withheld);
                        }
                    }
                    let paths = Arc::from(mask.paths());
                    (Arc::new(mask), paths)
                })
                .clone();
            permit.mask = mask;
            permit.fields_shared = paths;
        }
        // Overlapping validity windows: two versions of an agreement in force at once.
        for (position, first) in entry.permits.iter().enumerate() {
            for second in &entry.permits[position + 1..] {
                let (left, right) = (&rules[first.rule], &rules[second.rule]);
                let windowed = |rule: &CompiledRule| rule.valid_from.is_some() || rule.valid_until.is_some();
                if !windowed(left) || !windowed(right) {
                    continue;
                }
                if !left.purposes.iter().any(|purpose| right.covers_purpose(purpose)) {
                    continue;
                }
                let overlap = left.valid_from.max(right.valid_from) <= min_until(left.valid_until, right.valid_until);
                if overlap && overlap_reported.insert((first.rule, second.rule)) {
                    diagnostics.error_at(
                        &right.place,
                        format!(
                            "the validity window of rule `{}` overlaps that of rule `{}` on the same route and purpose; \
                             end one before the other starts",
                            right.id, left.id
                        ),
                    );
                }
            }
        }
    }

    // A permit that an unconditional forbid covers on every one of its routes can never apply.
    for (index, rule) in rules.iter().enumerate() {
        if rule.effect != Effect::Permit {
            continue;
        }
        let mut blocker: Option<usize> = None;
        let mut every_route_blocked = true;
        let (senders, recipients) = table.classes_of(rule);
        'routes: for sender in &senders {
            for recipient in &recipients {
                for kind in &rule.kinds {
                    let Some(entry) = routes.get(&route_key(*sender, *recipient, *kind)) else {
                        continue;
                    };
                    let found = entry.forbids.iter().find(|forbid| {
                        let forbid = &rules[**forbid];
                        forbid.is_unconditional() && rule.purposes.iter().all(|purpose| forbid.covers_purpose(purpose))
                    });
                    match found {
                        Some(forbid) => blocker = Some(*forbid),
                        None => {
                            every_route_blocked = false;
                            break 'routes;
                        }
                    }
                }
            }
        }
        if every_route_blocked && let Some(forbid) = blocker {
            diagnostics.error_at(
                &rule.place,
                format!(
                    "rule `{}` can never match: forbid `{}` refuses every route and purpose it covers",
                    rules[index].id, rules[forbid].id
                ),
            );
        }
    }
    table.entries = routes;
    table
}

fn min_until(left: Option<Date>, right: Option<Date>) -> Option<Date> {
    match (left, right) {
        (Some(left), Some(right)) => Some(left.min(right)),
        (Some(date), None) | (None, Some(date)) => Some(date),
        (None, None) => None,
    }
    .or(Some(Date::MAX))
}

/// The canonical form of a policy set that its hash covers: every section but the tests, sorted by id, with every
/// list inside a rule sorted, serialised as JSON.
#[derive(Serialize)]
struct CanonicalSet<'a> {
    format: u32,
    agencies: Vec<&'a super::model::AgencyEntry>,
    groups: Vec<&'a super::model::GroupEntry>,
    purposes: Vec<&'a NamedEntry>,
    roles: Vec<&'a NamedEntry>,
    retention_classes: Vec<&'a NamedEntry>,
    rules: Vec<RuleEntry>,
    calendar: Option<&'a super::model::CalendarEntry>,
}

fn canonical_hash(sources: &[SourceFile]) -> String {
    let mut set = CanonicalSet {
        format: 1,
        agencies: Vec::new(),
        groups: Vec::new(),
        purposes: Vec::new(),
        roles: Vec::new(),
        retention_classes: Vec::new(),
        rules: Vec::new(),
        calendar: None,
    };
    for source in sources {
        let file = &source.file;
        set.agencies.extend(file.agencies.iter().map(|entry| &entry.value));
        set.groups.extend(file.groups.iter().map(|entry| &entry.value));
        set.purposes.extend(file.purposes.iter().map(|entry| &entry.value));
        set.roles.extend(file.roles.iter().map(|entry| &entry.value));
        set.retention_classes.extend(file.retention_classes.iter().map(|entry| &entry.value));
        set.rules.extend(file.rules.iter().map(|entry| canonical_rule(&entry.value)));
        if set.calendar.is_none() {
            set.calendar = file.calendar.as_ref().map(|entry| &entry.value);
        }
    }
    set.agencies.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    set.groups.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    set.purposes.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    set.roles.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    set.retention_classes.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    set.rules.sort_by(|left, right| left.id.value.cmp(&right.id.value));
    let bytes = serde_json::to_vec(&set).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

fn canonical_rule(rule: &RuleEntry) -> RuleEntry {
    let mut rule = rule.clone();
    let by_value = |left: &Located<String>, right: &Located<String>| left.value.cmp(&right.value);
    rule.from.sort_by(by_value);
    rule.to.sort_by(by_value);
    rule.except_to.sort_by(by_value);
    rule.kinds.sort_by_key(|left| left.value);
    rule.purposes.sort_by(by_value);
    rule.lawful_basis.sort_by_key(|left| left.value);
    rule.share.sort_by(by_value);
    rule.withhold.sort_by(by_value);
    rule
}
