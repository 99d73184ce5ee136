//! Criterion benchmarks of the policy hot path: a decision including the field mask, at 10, 100, 1,000 and 10,000
//! rules (it should stay flat: a route-keyed lookup plus a few checks), and building a recipient's copy of a 16 KiB
//! referral: from the encoded envelope to the encoded copy, as a send does (`referral_16k_from_encoded`), and from
//! the decoded envelope to the decoded copy (`referral_16k_to_front_door`, which adds an encode and a decode).
//! Besides criterion's means, each benchmark prints p50/p99/p99.9 of single calls (issue 3's targets are p99 ≤ 10 µs
//! per decision and ≤ 20 µs per copy).
//!
//! Run: `cargo bench -p broker --bench policy`.

// A benchmark fails loudly: unwrap and panic are how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    hint::black_box,
    path::{Path, PathBuf},
    time::Instant,
};

use broker::policy::{DecisionRequest, PolicySet};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;
use proto::pb;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(name: &str) -> pb::Envelope {
    let bytes = std::fs::read(repository().join("examples").join(name)).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let pool = proto::descriptor_pool().unwrap();
    let descriptor = pool.get_message_by_name(proto::ENVELOPE_MESSAGE).unwrap();
    let message = prost_reflect::DynamicMessage::deserialize(descriptor, json).unwrap();
    message.transcode_to::<pb::Envelope>().unwrap()
}

/// A policy folder with `rules` synthetic permit rules on distinct routes between synthetic agencies, plus the
/// sample set's calendar. Returns the folder (kept alive by the `TempDir`).
fn synthetic_policy(rules: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repository().join("policies/calendar.yaml"), dir.path().join("calendar.yaml")).unwrap();
    let agencies = (rules as f64).sqrt().ceil() as usize + 1;
    let mut registry = String::from("groups:\n  - id: synthetic\n    name: Synthetic agencies\nagencies:\n");
    for index in 0..agencies {
        registry.push_str(&format!(
            "  - id: syn-{index:05}\n    name: Synthetic agency {index}\n    kind: health\n    groups: [synthetic]\n"
        ));
    }
    registry.push_str(
        "purposes:\n  - id: child-protection-plan-notification\n    description: F8.\nroles:\n  - id: social-worker\n    description: A social worker.\n  - id: health-professional\n    description: Health.\nretention_classes:\n  - id: child-record-25\n    description: To the 25th birthday.\n",
    );
    std::fs::write(dir.path().join("registry.yaml"), registry).unwrap();
    // One file per 1,000 rules: the loader limits the YAML nodes of one file (serde-saphyr's budget).
    let mut text = String::from("rules:\n");
    for index in 0..rules {
        if index > 0 && index % 1000 == 0 {
            std::fs::write(dir.path().join(format!("rules-{index:05}.yaml")), &text).unwrap();
            text = String::from("rules:\n");
        }
        let from = index / agencies;
        let to = index % agencies;
        text.push_str(&format!(
            "  - id: synthetic-{index:05}\n    flow: F8\n    explanation: Synthetic rule {index}.\n    from: [syn-{from:05}]\n    to: [syn-{to:05}]\n    kinds: [plan-status-notification]\n    purposes: [child-protection-plan-notification]\n    lawful_basis: [uk-gdpr-6-1-e, uk-gdpr-9-2-g, dpa-2018-sch1-pt2-para18]\n    share:\n      - subject.nhs_number\n      - subject.given_name\n      - subject.family_name\n      - subject.date_of_birth\n      - plan_status.plan_type\n      - plan_status.start_date\n      - plan_status.responsible_local_authority\n      - plan_status.office_hours_phone\n      - plan_status.lead_social_worker\n    obligations:\n      acknowledge_within: {{ hours: 24 }}\n      retention_class: child-record-25\n      onward_disclosure: false\n"
        ));
    }
    text.push_str("  - id: synthetic-withhold-placement\n    flow: F8\n    effect: withhold\n    explanation: Never the placement address.\n    from: [any]\n    to: [any]\n    kinds: [plan-status-notification]\n    withhold: [plan_status.placement_address, subject.address]\n");
    std::fs::write(dir.path().join("rules.yaml"), text).unwrap();
    dir
}

/// The sample referral padded to about 16 KiB encoded: longer narrative, more household members and agencies.
fn referral_16k() -> pb::Envelope {
    let mut envelope = example("school-referral-to-front-door.json");
    let Some(pb::envelope::Body::Referral(referral)) = envelope.body.as_mut() else { panic!("not a referral") };
    let household = referral.household.clone();
    let agencies = referral.agencies.clone();
    let mut round = 0;
    while envelope.encoded_len() < 16 * 1024 {
        let Some(pb::envelope::Body::Referral(referral)) = envelope.body.as_mut() else { unreachable!() };
        if let Some(concern) = referral.concern.as_mut() {
            concern.facts.push_str(" The class teacher recorded further observations during the day, in detail.");
        }
        if round % 4 == 0 {
            referral.household.extend(household.iter().cloned());
            referral.agencies.extend(agencies.iter().cloned());
        }
        round += 1;
    }
    envelope
}

/// p50/p99/p99.9 of `calls` single timed calls of `work`, printed beside criterion's figures.
fn print_percentiles(name: &str, calls: usize, mut work: impl FnMut()) {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        work();
        samples.push(start.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    let at =
        |quantile: f64| samples[((samples.len() as f64 * quantile) as usize).min(samples.len() - 1)] as f64 / 1000.0;
    eprintln!("{name}: single calls n={calls} p50={:.2} µs p99={:.2} µs p99.9={:.2} µs", at(0.5), at(0.99), at(0.999));
}

fn decisions(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("policy_decision_with_mask");
    let mut envelope = example("child-protection-plan-notification.json");
    let roles = vec!["social-worker".to_owned()];
    let now = time::OffsetDateTime::now_utc();
    for rules in [10usize, 100, 1_000, 10_000] {
        let dir = synthetic_policy(rules);
        let set = PolicySet::load_dir(dir.path()).unwrap_or_else(|errors| panic!("{errors}"));
        let agencies = (rules as f64).sqrt().ceil() as usize + 1;
        // The last rule's route, so a linear scan would pay for every rule before it.
        let last = rules - 1;
        let sender = format!("syn-{:05}", last / agencies);
        let recipient = format!("syn-{:05}", last % agencies);
        envelope.recipients = vec![recipient.clone()];
        let request = DecisionRequest {
            sender: &sender,
            sender_practitioner: "bench-social-worker",
            sender_roles: &roles,
            recipient: &recipient,
            envelope: &envelope,
            encoded_envelope: None,
            now,
        };
        let decision = set.decide(&request);
        assert!(decision.permitted, "{:?}: {}", decision.reason_code, decision.explanation);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(rules), &request, |bencher, request| {
            bencher.iter(|| black_box(set.decide(black_box(request))));
        });
        print_percentiles(&format!("policy_decision_with_mask/{rules}"), 100_000, || {
            black_box(set.decide(black_box(&request)));
        });
        // A refusal (no rule for the route) costs the same lookup.
        let stranger = format!("syn-{:05}", agencies - 1);
        let refused = DecisionRequest { sender: &stranger, recipient: &stranger, ..request };
        print_percentiles(&format!("policy_decision_refused/{rules}"), 100_000, || {
            black_box(set.decide(black_box(&refused)));
        });
    }
    group.finish();
}

fn copies(criterion: &mut Criterion) {
    let set = PolicySet::load_dir(&repository().join("policies")).unwrap_or_else(|errors| panic!("{errors}"));
    let now = time::OffsetDateTime::now_utc();
    let mut group = criterion.benchmark_group("recipient_copy");

    // F3: a 16 KiB referral from the school to the front door (whole subtrees shared, the referrer kept).
    let referral = referral_16k();
    let school_roles = vec!["dsl".to_owned()];
    let request = DecisionRequest {
        sender: "luton-oakwood-primary",
        sender_practitioner: "bench-dsl",
        sender_roles: &school_roles,
        recipient: "luton-csc",
        envelope: &referral,
        encoded_envelope: None,
        now,
    };
    let decision = set.decide(&request);
    assert!(decision.permitted, "{:?}: {}", decision.reason_code, decision.explanation);
    eprintln!("referral encoded size: {} bytes", referral.encoded_len());
    group.throughput(Throughput::Bytes(referral.encoded_len() as u64));
    group.bench_function("referral_16k_to_front_door", |bencher| {
        bencher.iter(|| black_box(set.build_copy(black_box(&referral), black_box(&decision)).unwrap()));
    });
    print_percentiles("recipient_copy/referral_16k_to_front_door", 20_000, || {
        black_box(set.build_copy(black_box(&referral), black_box(&decision)).unwrap());
    });
    // What a send does for each recipient: the envelope is encoded once per send, and the copy is built from those
    // bytes into bytes, which the broker stores and delivers as they are.
    let encoded = referral.encode_to_vec();
    group.bench_function("referral_16k_from_encoded", |bencher| {
        bencher.iter(|| black_box(set.build_copy_encoded(black_box(&encoded), black_box(&decision)).unwrap()));
    });
    print_percentiles("recipient_copy/referral_16k_from_encoded", 20_000, || {
        black_box(set.build_copy_encoded(black_box(&encoded), black_box(&decision)).unwrap());
    });
    print_percentiles("recipient_copy/referral_16k_encode_envelope (once per send)", 20_000, || {
        black_box(black_box(&referral).encode_to_vec());
    });
    let encoded_request = DecisionRequest { encoded_envelope: Some(&encoded), ..request };
    group.bench_function("referral_16k_decide_and_copy", |bencher| {
        bencher.iter(|| {
            let decision = set.decide(black_box(&encoded_request));
            black_box(set.build_copy_encoded(&encoded, &decision).unwrap())
        });
    });

    // F1: field-by-field minimisation (crime report, history and health withheld from the school).
    let encompass = example("operation-encompass-notification.json");
    let police_roles = vec!["spoc".to_owned()];
    let request = DecisionRequest {
        sender: "beds-police",
        sender_practitioner: "bench-spoc",
        sender_roles: &police_roles,
        recipient: "luton-oakwood-primary",
        envelope: &encompass,
        encoded_envelope: None,
        now,
    };
    let decision = set.decide(&request);
    // The recipient role condition may need the facts the broker supplies; report rather than fail if refused.
    if decision.permitted {
        group.throughput(Throughput::Bytes(encompass.encoded_len() as u64));
        group.bench_function("encompass_to_school", |bencher| {
            bencher.iter(|| black_box(set.build_copy(black_box(&encompass), black_box(&decision)).unwrap()));
        });
        print_percentiles("recipient_copy/encompass_to_school", 20_000, || {
            black_box(set.build_copy(black_box(&encompass), black_box(&decision)).unwrap());
        });
        let encoded = encompass.encode_to_vec();
        print_percentiles("recipient_copy/encompass_to_school_from_encoded", 20_000, || {
            black_box(set.build_copy_encoded(black_box(&encoded), black_box(&decision)).unwrap());
        });
    } else {
        eprintln!("encompass_to_school skipped: {:?} {}", decision.reason_code, decision.explanation);
    }
    group.finish();
}

criterion_group!(benches, decisions, copies);
criterion_main!(benches);
