//! Criterion benchmarks of the durable path under the exchange: `Store::commit` from many tasks at once (group
//! commit: one audit-log fsync and one journal fsync per group, then one sled batch), with commits shaped like a
//! send's (one decision entry, a message record, a delivery record, a copy and a queue entry, about 3 KiB), and
//! bearer token verification (EdDSA), which every request pays.
//!
//! Run: `cargo bench -p broker --bench store`. The machine's raw fsync rate is the reference: the load generator
//! (`cargo run --release -p tests --bin load`) measures it in the same filesystem.

// A benchmark fails loudly: unwrap and panic are how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use broker::{
    audit::{Actor, AuditEntry, AuditLog, EventType},
    store::{Commit, Store, StoreOptions, Write},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn send_like_commit(index: u64) -> Commit {
    let message_id = format!("0198c0de-0000-7000-8000-{index:012}");
    let entry = AuditEntry {
        time_micros: AuditEntry::now_micros(),
        event: Some(EventType::DecisionToShare),
        actor: Actor {
            agency: "beds-police".to_owned(),
            practitioner: "bench-spoc".to_owned(),
            role: "spoc".to_owned(),
        },
        message_id: message_id.clone(),
        recipient: "luton-oakwood-primary".to_owned(),
        rule_ids: vec!["f1-encompass-police-to-school-dsl".to_owned()],
        lawful_basis: vec!["uk-gdpr-6-1-c".to_owned()],
        reason_code: "permitted".to_owned(),
        fields_shared: (0..14).map(|field| format!("domestic_abuse_incident.field_{field}")).collect(),
        fields_withheld: vec!["domestic_abuse_incident.crime_report".to_owned()],
        policy_set_hash: "0".repeat(64),
        ..AuditEntry::default()
    };
    // What a send writes: the records kept in the journal, the copy attached to its queue entry.
    let writes = vec![
        Write::PutBlob(format!("m/{message_id}").into_bytes(), vec![7u8; 1200]),
        Write::PutBlob(format!("d/{message_id}.luton-oakwood-primary").into_bytes(), vec![8u8; 400]),
        Write::PutAttached(
            format!("q/luton-oakwood-primary/{index:020}").into_bytes(),
            format!("{message_id}.luton-oakwood-primary\n").into_bytes(),
            vec![9u8; 1400],
        ),
    ];
    Commit { audit: vec![entry], writes }
}

fn group_commit(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
    let (store, _) =
        Store::open(dir.path(), audit, StoreOptions { index_cache_bytes: 64 * 1024 * 1024, ..StoreOptions::default() })
            .unwrap();
    let store = Arc::new(store);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut group = criterion.benchmark_group("store_commit");
    group.measurement_time(Duration::from_secs(8));
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    for tasks in [1usize, 16, 64, 256] {
        group.bench_with_input(BenchmarkId::new("concurrent_tasks", tasks), &tasks, |bencher, &tasks| {
            bencher.iter_custom(|iterations| {
                let store = store.clone();
                let counter = counter.clone();
                runtime.block_on(async move {
                    let start = Instant::now();
                    let per_task = iterations.div_ceil(tasks as u64);
                    let mut handles = Vec::new();
                    for _ in 0..tasks {
                        let store = store.clone();
                        let counter = counter.clone();
                        handles.push(tokio::spawn(async move {
                            for _ in 0..per_task {
                                let index = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                black_box(store.commit(send_like_commit(index)).await.unwrap());
                            }
                        }));
                    }
                    for handle in handles {
                        handle.await.unwrap();
                    }
                    // Per commit: the elapsed time scaled to the iterations asked for.
                    start.elapsed().mul_f64(iterations as f64 / (per_task * tasks as u64) as f64)
                })
            });
        });
    }
    group.finish();
    store.close();
}

fn token_verification(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, _private, public) = broker::auth::token::DevIssuer::generate("beds-police").unwrap();
    let public_path = dir.path().join("beds-police.pub.pem");
    std::fs::write(&public_path, public).unwrap();
    let settings = broker::auth::token::TokensFile {
        issuers: vec![issuer.issuer_file(&public_path)],
        ..broker::auth::token::TokensFile::default()
    };
    let verifier = broker::auth::token::TokenVerifier::load(&settings, dir.path()).unwrap();
    let token = issuer.mint("bench-spoc", &["spoc".to_owned()], Duration::from_secs(600)).unwrap();
    verifier.verify("beds-police", &token).unwrap();
    // A token already verified is remembered until it expires: this is the cost of every request after a
    // practitioner's first.
    criterion.bench_function("token_verify_remembered", |bencher| {
        bencher.iter(|| black_box(verifier.verify(black_box("beds-police"), black_box(&token)).unwrap()));
    });
    // A token not seen before (a different practitioner each time): the EdDSA check and claims validation.
    let mut next = 0u64;
    criterion.bench_function("token_verify_eddsa_first_use", |bencher| {
        bencher.iter_batched(
            || {
                next += 1;
                issuer.mint(&format!("bench-spoc-{next}"), &["spoc".to_owned()], Duration::from_secs(600)).unwrap()
            },
            |token| black_box(verifier.verify("beds-police", &token).unwrap()),
            criterion::BatchSize::SmallInput,
        );
    });
}

criterion_group!(benches, group_commit, token_verification);
criterion_main!(benches);
