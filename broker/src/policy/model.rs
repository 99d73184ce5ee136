//! The policy file format: the serde and schemars types that YAML files in `policies/` are read into.
//!
//! Every file is one [`PolicyFile`] with optional sections (agencies, groups, purposes, roles, retention classes,
//! rules, a calendar and test cases), so one JSON Schema (`policies/policy.schema.json`, generated from these types)
//! serves every file. Values whose position matters for diagnostics are wrapped in [`Located`], which records the
//! line and column the YAML node came from. These types are the raw file shape: `compile` checks and turns them into
//! the compiled set the decision path uses.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value together with the 1-based line and column of the YAML node it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub line: u64,
    pub column: u64,
}

impl<T> Located<T> {
    /// Wraps a value that did not come from a file (line and column 0).
    pub fn unplaced(value: T) -> Self {
        Located { value, line: 0, column: 0 }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Located { value: spanned.value, line: spanned.referenced.line(), column: spanned.referenced.column() })
    }
}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(serializer)
    }
}

impl<T: JsonSchema> JsonSchema for Located<T> {
    fn inline_schema() -> bool {
        T::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
}

/// One policy file. Every section is optional; a policy set is the union of all files in its directory.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The agencies taking part in the area's information-sharing protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agencies: Vec<Located<AgencyEntry>>,
    /// Named groups of agencies (for example "Luton schools"), usable in a rule's `from` and `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Located<GroupEntry>>,
    /// The purpose codes a message may give in `Envelope.purpose`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<Located<NamedEntry>>,
    /// The practitioner roles rules may name (they come from practitioners' tokens).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<Located<NamedEntry>>,
    /// The retention classes rules may name in their obligations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention_classes: Vec<Located<NamedEntry>>,
    /// The sharing rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Located<RuleEntry>>,
    /// Working days and school days, for deadlines such as "1 working day" or "before the next school day".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calendar: Option<Located<CalendarEntry>>,
    /// Test cases that pin the time and say what the policy must decide.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<Located<TestCase>>,
}

/// The kind of an agency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AgencyKind {
    /// Local authority children's social care (front door, MASH, Family Help, MACPT, LADO).
    LocalAuthority,
    /// A police force (public protection unit, Operation Encompass single point of contact).
    Police,
    /// A health body (hospital, GP practice, health visiting, school nursing, ICB).
    Health,
    /// A school, nursery or college.
    Education,
    /// A family hub.
    FamilyHub,
    /// A charity or other voluntary-sector organisation.
    VoluntarySector,
}

impl AgencyKind {
    /// Every kind, in a fixed order.
    pub const ALL: [AgencyKind; 6] = [
        AgencyKind::LocalAuthority,
        AgencyKind::Police,
        AgencyKind::Health,
        AgencyKind::Education,
        AgencyKind::FamilyHub,
        AgencyKind::VoluntarySector,
    ];

    /// The kebab-case name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            AgencyKind::LocalAuthority => "local-authority",
            AgencyKind::Police => "police",
            AgencyKind::Health => "health",
            AgencyKind::Education => "education",
            AgencyKind::FamilyHub => "family-hub",
            AgencyKind::VoluntarySector => "voluntary-sector",
        }
    }
}

/// An agency in the registry.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgencyEntry {
    /// The agency id, as in its certificate (`urn:agency:<id>`): lowercase letters, digits and hyphens.
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub id: Located<String>,
    /// The agency's name, for people.
    pub name: String,
    pub kind: AgencyKind,
    /// Ids of the groups this agency belongs to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Located<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A named group of agencies.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupEntry {
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub id: Located<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A declared code (purpose, role, retention class) with its meaning.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedEntry {
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub id: Located<String>,
    pub description: String,
}

/// What a rule does when it applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Allows the route and names the fields the recipient may see.
    #[default]
    Permit,
    /// Refuses the route whatever any permit says.
    Forbid,
    /// Never lets the named fields reach the recipient on the route, whatever any permit says.
    Withhold,
}

/// A message kind, as named in policy files (the proto `MessageKind` without its prefix, in kebab-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum KindName {
    Referral,
    DomesticAbuseNotification,
    PublicProtectionNotice,
    ReferralAcknowledgement,
    OutcomeFeedback,
    InformationRequest,
    InformationResponse,
    StrategyDiscussion,
    Conference,
    PlanStatusNotification,
    UnscheduledCareAttendance,
    EmergencyAttendance,
    FamilyHelpRequest,
    FamilyNetworkMeeting,
    MissingEpisode,
    RecordTransfer,
    CaseClosure,
    EscalationNotice,
}

impl KindName {
    /// Every kind, in proto order.
    pub const ALL: [KindName; 18] = [
        KindName::Referral,
        KindName::DomesticAbuseNotification,
        KindName::PublicProtectionNotice,
        KindName::ReferralAcknowledgement,
        KindName::OutcomeFeedback,
        KindName::InformationRequest,
        KindName::InformationResponse,
        KindName::StrategyDiscussion,
        KindName::Conference,
        KindName::PlanStatusNotification,
        KindName::UnscheduledCareAttendance,
        KindName::EmergencyAttendance,
        KindName::FamilyHelpRequest,
        KindName::FamilyNetworkMeeting,
        KindName::MissingEpisode,
        KindName::RecordTransfer,
        KindName::CaseClosure,
        KindName::EscalationNotice,
    ];

    /// The proto enum value (`MessageKind`).
    pub fn proto_value(self) -> i32 {
        self as i32 + 1
    }

    /// The kind for a proto enum value, if it names one.
    pub fn from_proto(value: i32) -> Option<KindName> {
        let index = usize::try_from(value).ok()?.checked_sub(1)?;
        KindName::ALL.get(index).copied()
    }

    /// The kebab-case name used in policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            KindName::Referral => "referral",
            KindName::DomesticAbuseNotification => "domestic-abuse-notification",
            KindName::PublicProtectionNotice => "public-protection-notice",
            KindName::ReferralAcknowledgement => "referral-acknowledgement",
            KindName::OutcomeFeedback => "outcome-feedback",
            KindName::InformationRequest => "information-request",
            KindName::InformationResponse => "information-response",
            KindName::StrategyDiscussion => "strategy-discussion",
            KindName::Conference => "conference",
            KindName::PlanStatusNotification => "plan-status-notification",
            KindName::UnscheduledCareAttendance => "unscheduled-care-attendance",
            KindName::EmergencyAttendance => "emergency-attendance",
            KindName::FamilyHelpRequest => "family-help-request",
            KindName::FamilyNetworkMeeting => "family-network-meeting",
            KindName::MissingEpisode => "missing-episode",
            KindName::RecordTransfer => "record-transfer",
            KindName::CaseClosure => "case-closure",
            KindName::EscalationNotice => "escalation-notice",
        }
    }

    /// The name of the `Envelope.body` field that a message of this kind carries.
    pub fn body_field(self) -> &'static str {
        match self {
            KindName::Referral => "referral",
            KindName::DomesticAbuseNotification => "domestic_abuse_incident",
            KindName::PublicProtectionNotice => "public_protection_notice",
            KindName::ReferralAcknowledgement | KindName::OutcomeFeedback => "referral_outcome",
            KindName::InformationRequest => "information_request",
            KindName::InformationResponse => "information_response",
            KindName::StrategyDiscussion | KindName::Conference | KindName::FamilyNetworkMeeting => "meeting",
            KindName::PlanStatusNotification => "plan_status",
            KindName::UnscheduledCareAttendance | KindName::EmergencyAttendance => "care_attendance",
            KindName::FamilyHelpRequest => "family_help_request",
            KindName::MissingEpisode => "missing_episode",
            KindName::RecordTransfer => "record_transfer",
            KindName::CaseClosure => "case_closure",
            KindName::EscalationNotice => "escalation",
        }
    }
}

/// The lawful bases a rule may name (UK GDPR and the Data Protection Act 2018).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
pub enum LawfulBasis {
    /// UK GDPR Art 6(1)(c): legal obligation (Operation Encompass, the statutory duty to share).
    #[serde(rename = "uk-gdpr-6-1-c")]
    LegalObligation,
    /// UK GDPR Art 6(1)(d): vital interests.
    #[serde(rename = "uk-gdpr-6-1-d")]
    VitalInterests,
    /// UK GDPR Art 6(1)(e): public task.
    #[serde(rename = "uk-gdpr-6-1-e")]
    PublicTask,
    /// UK GDPR Art 6(1)(f): legitimate interests (voluntary-sector senders only).
    #[serde(rename = "uk-gdpr-6-1-f")]
    LegitimateInterests,
    /// UK GDPR Art 9(2)(g): substantial public interest (special-category data; pair with para 18).
    #[serde(rename = "uk-gdpr-9-2-g")]
    SubstantialPublicInterest,
    /// DPA 2018 Schedule 1 Part 2 paragraph 18: safeguarding of children and of individuals at risk.
    #[serde(rename = "dpa-2018-sch1-pt2-para18")]
    SafeguardingChildren,
    /// UK GDPR Art 9(2)(h): health and social care.
    #[serde(rename = "uk-gdpr-9-2-h")]
    HealthAndSocialCare,
    /// UK GDPR Art 10: criminal-offence data (with DPA 2018 Schedule 1 Part 3).
    #[serde(rename = "uk-gdpr-10")]
    CriminalOffenceData,
    /// DPA 2018 Schedule 1 Part 3: additional conditions for criminal-offence data.
    #[serde(rename = "dpa-2018-sch1-pt3")]
    CriminalOffenceConditions,
}

impl LawfulBasis {
    /// The code used in policy files, decisions and audit entries.
    pub fn as_str(self) -> &'static str {
        match self {
            LawfulBasis::LegalObligation => "uk-gdpr-6-1-c",
            LawfulBasis::VitalInterests => "uk-gdpr-6-1-d",
            LawfulBasis::PublicTask => "uk-gdpr-6-1-e",
            LawfulBasis::LegitimateInterests => "uk-gdpr-6-1-f",
            LawfulBasis::SubstantialPublicInterest => "uk-gdpr-9-2-g",
            LawfulBasis::SafeguardingChildren => "dpa-2018-sch1-pt2-para18",
            LawfulBasis::HealthAndSocialCare => "uk-gdpr-9-2-h",
            LawfulBasis::CriminalOffenceData => "uk-gdpr-10",
            LawfulBasis::CriminalOffenceConditions => "dpa-2018-sch1-pt3",
        }
    }
}

/// Why sharing may proceed without the family's agreement (the proto `OverrideReason` in kebab-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OverrideReasonName {
    RiskOfSignificantHarm,
    SeekingWouldIncreaseRisk,
    WouldPrejudiceCriminalInvestigation,
    Emergency,
}

impl OverrideReasonName {
    pub const ALL: [OverrideReasonName; 4] = [
        OverrideReasonName::RiskOfSignificantHarm,
        OverrideReasonName::SeekingWouldIncreaseRisk,
        OverrideReasonName::WouldPrejudiceCriminalInvestigation,
        OverrideReasonName::Emergency,
    ];

    pub fn from_proto(value: i32) -> Option<OverrideReasonName> {
        let index = usize::try_from(value).ok()?.checked_sub(1)?;
        OverrideReasonName::ALL.get(index).copied()
    }

    pub fn proto_value(self) -> i32 {
        self as i32 + 1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OverrideReasonName::RiskOfSignificantHarm => "risk-of-significant-harm",
            OverrideReasonName::SeekingWouldIncreaseRisk => "seeking-would-increase-risk",
            OverrideReasonName::WouldPrejudiceCriminalInvestigation => "would-prejudice-criminal-investigation",
            OverrideReasonName::Emergency => "emergency",
        }
    }
}

/// Urgency, as named in policy files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UrgencyName {
    Routine,
    Priority,
    Immediate,
}

impl UrgencyName {
    pub const ALL: [UrgencyName; 3] = [UrgencyName::Routine, UrgencyName::Priority, UrgencyName::Immediate];

    pub fn from_proto(value: i32) -> Option<UrgencyName> {
        let index = usize::try_from(value).ok()?.checked_sub(1)?;
        UrgencyName::ALL.get(index).copied()
    }

    pub fn proto_value(self) -> i32 {
        self as i32 + 1
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UrgencyName::Routine => "routine",
            UrgencyName::Priority => "priority",
            UrgencyName::Immediate => "immediate",
        }
    }
}

/// One sharing rule.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    /// A unique id, quoted in decisions and audit entries (for example `f1-encompass-police-to-school`).
    #[schemars(regex(pattern = r"^[a-z0-9][a-z0-9-]*$"))]
    pub id: Located<String>,
    /// `permit` (the default), `forbid` (refuses whatever any permit says) or `withhold` (hides fields).
    #[serde(default)]
    pub effect: Effect,
    /// The flow of the area's protocol this rule implements (for example `F1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    /// Plain English: what this rule allows or refuses and why. Shown to senders and auditors.
    pub explanation: String,
    /// Senders: agency ids, group ids, agency kinds, or `any`.
    pub from: Vec<Located<String>>,
    /// Recipients: agency ids, group ids, agency kinds, or `any`.
    pub to: Vec<Located<String>>,
    /// Recipients the rule does not apply to even though `to` names them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except_to: Vec<Located<String>>,
    /// The message kinds the rule covers.
    pub kinds: Vec<Located<KindName>>,
    /// The purpose codes the rule covers (required for permits; a forbid without purposes covers every purpose).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purposes: Vec<Located<String>>,
    /// The lawful bases for sharing (required for permits).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lawful_basis: Vec<Located<LawfulBasis>>,
    /// Whether the family's agreement is needed, and when it may be overridden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Located<AgreementEntry>>,
    /// Facts that must hold for the rule to apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Located<ConditionsEntry>>,
    /// The dates between which the rule applies (the agreement's validity window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<Located<ValidityEntry>>,
    /// Field paths into the envelope that the recipient may see (for example `subject.given_name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub share: Vec<Located<String>>,
    /// Field paths that never reach the recipient on this route, whatever any rule shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withhold: Vec<Located<String>>,
    /// What the recipient and the broker must do once the message is delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obligations: Option<Located<ObligationsEntry>>,
}

/// The family-agreement requirement of a rule.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgreementEntry {
    /// When true the family must have agreed (`agreed`), unless an allowed override is recorded.
    pub required: bool,
    /// The reasons for which sharing may go ahead without agreement (agreement not sought, or refused and overridden).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub override_reasons: Vec<OverrideReasonName>,
    /// If given, the sending practitioner's token must hold one of these roles to use an override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub override_roles: Vec<Located<String>>,
}

/// Conditions of a rule. All given conditions must hold.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConditionsEntry {
    /// The child's age in whole years on the day of the decision (from `subject.date_of_birth`), inclusive bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_age: Option<AgeRange>,
    /// Allowed urgencies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urgency: Vec<UrgencyName>,
    /// Roles the sending practitioner must act in (checked against their token).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_role: Vec<Located<String>>,
    /// Roles the message must be addressed to at the recipient (`Envelope.recipient_role`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipient_role: Vec<Located<String>>,
}

/// An inclusive range of ages in whole years.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgeRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// The dates a rule applies between, both inclusive, as `YYYY-MM-DD` (UK local dates).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidityEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub from: Option<Located<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub until: Option<Located<String>>,
}

/// Obligations attached to a permit.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ObligationsEntry {
    /// How soon the recipient's agent must acknowledge the delivery before the broker escalates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledge_within: Option<AcknowledgeWithin>,
    /// The retention class the recipient must apply (declared in `retention_classes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_class: Option<Located<String>>,
    /// Whether the recipient may pass the information on to others.
    #[serde(default)]
    pub onward_disclosure: bool,
    /// The agency that receives an escalation notice when the acknowledgement deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<Located<String>>,
}

/// An acknowledgement deadline: `{minutes: N}`, `{hours: N}`, `{working_days: N}`, `{school_days: N}` or
/// `before_next_school_day`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AcknowledgeWithin {
    Minutes(u32),
    Hours(u32),
    WorkingDays(u32),
    SchoolDays(u32),
    BeforeNextSchoolDay,
}

/// The area's calendar: which days are working days and school days, and when a school day starts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CalendarEntry {
    /// Local time (UK) a school day starts, `HH:MM`; "before the next school day" means before this time.
    #[schemars(regex(pattern = r"^\d{2}:\d{2}$"))]
    pub school_day_starts_at: Located<String>,
    /// Local time (UK) a working day starts, `HH:MM`: a clock started on a non-working day starts then.
    #[schemars(regex(pattern = r"^\d{2}:\d{2}$"))]
    pub working_day_starts_at: Located<String>,
    /// Bank holidays (England), `YYYY-MM-DD`: neither working days nor school days.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bank_holidays: Vec<Located<String>>,
    /// School holidays and closures (inclusive dates): not school days.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub school_closures: Vec<Located<ClosureEntry>>,
}

/// A run of days on which schools are closed.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClosureEntry {
    pub name: String,
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub from: Located<String>,
    #[schemars(regex(pattern = r"^\d{4}-\d{2}-\d{2}$"))]
    pub until: Located<String>,
}

/// A policy test case: a pinned time, a sender, a recipient and a message, and what the policy must decide.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// What the case checks, in plain English.
    pub name: String,
    /// The decision time, RFC 3339 (for example `2026-03-02T21:15:00Z`).
    pub now: Located<String>,
    /// The sending agency id (as its certificate would say).
    pub sender: Located<String>,
    /// The sending practitioner (token subject).
    #[serde(default = "default_practitioner")]
    pub practitioner: String,
    /// The roles in the sending practitioner's token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The recipient agency id.
    pub recipient: Located<String>,
    /// The message kind (overrides the envelope's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<KindName>,
    /// The purpose code (overrides the envelope's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Facts that fill in or override the envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<TestFacts>,
    /// A sample envelope in the proto3 JSON mapping (field names as in the proto or lowerCamelCase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<serde_json::Value>,
    /// A file holding a sample envelope in the proto3 JSON mapping, relative to this test file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_file: Option<Located<String>>,
    pub expect: Located<TestExpectation>,
}

fn default_practitioner() -> String {
    "test-practitioner".to_owned()
}

/// Facts a test case can set without writing an envelope.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urgency: Option<UrgencyName>,
    /// The child's date of birth, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<TestAgreement>,
}

/// The family agreement facts of a test case.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestAgreement {
    pub state: AgreementStateName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_reason: Option<OverrideReasonName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorised_by: Option<String>,
}

/// The family's agreement state (the proto `AgreementState` in kebab-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AgreementStateName {
    Unspecified,
    Agreed,
    InformedNotAsked,
    NotSought,
    RefusedOverridden,
}

impl AgreementStateName {
    pub fn proto_value(self) -> i32 {
        self as i32
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgreementStateName::Unspecified => "unspecified",
            AgreementStateName::Agreed => "agreed",
            AgreementStateName::InformedNotAsked => "informed-not-asked",
            AgreementStateName::NotSought => "not-sought",
            AgreementStateName::RefusedOverridden => "refused-overridden",
        }
    }
}

/// What a test case expects.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestExpectation {
    /// `permit` or `deny`.
    pub decision: ExpectedDecision,
    /// The reason code (for example `permitted`, `agreement-required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The deciding rule ids, in any order (exactly these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<String>>,
    /// The field paths the copy holds, exactly (routing facts may be left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields_shared: Option<Vec<String>>,
    /// Field paths that must be visible to the recipient (a path counts if it or a parent is shared).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub visible: Vec<String>,
    /// Field paths that must not be visible to the recipient.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<String>,
    /// The lawful bases, in any order (exactly these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lawful_basis: Option<Vec<LawfulBasis>>,
    /// The obligations expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub obligations: Option<ExpectedObligations>,
    /// The acknowledgement deadline expected for a delivery at `now`, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// Whether a family-agreement override was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_used: Option<bool>,
}

/// `permit` or `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExpectedDecision {
    Permit,
    Deny,
}

/// Expected obligations of a permitted decision; only the given ones are checked.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectedObligations {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledge_within: Option<AcknowledgeWithin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onward_disclosure: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escalate_to: Option<String>,
}

/// The JSON Schema of policy files, as written to `policies/policy.schema.json`.
pub fn policy_file_schema_json() -> String {
    let schema = schemars::schema_for!(PolicyFile);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}
