//! Criterion benchmarks of the audit log against issue 5's targets: durable appends through the group committer
//! (`Store::commit` from many tasks, index writes included), offline verification rate, inclusion proof time, a
//! query for one child among a million entries, and opening the log at start (from its start-up cache, and whole).
//!
//! Run: `cargo bench -p broker --bench audit`. `AUDIT_BENCH_ENTRIES` sets the size of the log the verification and
//! query benchmarks build (default 1,000,000).

// Benchmarks are test code: a failed unwrap is how they stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use broker::{
    audit::{
        Actor, AuditEntry, AuditLog, EventType, Pseudonym,
        checkpoints::{Checkpointer, DEFAULT_ORIGIN},
        merkle::{MerkleTree, leaf_hash},
        query::{AuditFilter, search},
        verify::verify_data_dir,
    },
    store::{Commit, Store, StoreOptions},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Children in the generated logs: each has `entries / CHILDREN` entries.
const CHILDREN: u64 = 100_000;

fn entries_wanted() -> u64 {
    std::env::var("AUDIT_BENCH_ENTRIES").ok().and_then(|value| value.parse().ok()).unwrap_or(1_000_000)
}

fn entry(index: u64) -> AuditEntry {
    let mut child = [0u8; 32];
    child[..8].copy_from_slice(&(index % CHILDREN).to_be_bytes());
    AuditEntry {
        time_micros: 1_760_000_000_000_000 + index as i64,
        event: Some(if index.is_multiple_of(3) { EventType::DecisionToShare } else { EventType::Delivery }),
        actor: Actor {
            agency: "beds-police".to_owned(),
            practitioner: "bench-spoc".to_owned(),
            role: "spoc".to_owned(),
        },
        subject: Some(Pseudonym { key_version: 1, value: child }),
        message_id: format!("0198c0de-0000-7000-8000-{index:012}"),
        recipient: "luton-oakwood-primary".to_owned(),
        rule_ids: vec!["f1-encompass-police-to-school-dsl".to_owned()],
        lawful_basis: vec!["uk-gdpr-6-1-c".to_owned()],
        reason_code: "permitted".to_owned(),
        fields_shared: (0..6).map(|field| format!("domestic_abuse_incident.field_{field}")).collect(),
        policy_set_hash: "0".repeat(64),
        ..AuditEntry::default()
    }
}

fn durable_append(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
    let (store, _) =
        Store::open(dir.path(), audit, StoreOptions { index_cache_bytes: 64 * 1024 * 1024, ..StoreOptions::default() })
            .unwrap();
    let store = Arc::new(store);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut group = criterion.benchmark_group("audit_durable_append");
    group.measurement_time(Duration::from_secs(8));
    group.sample_size(10);
    group.throughput(Throughput::Elements(1));
    for tasks in [64usize, 512] {
        group.bench_with_input(BenchmarkId::new("concurrent_tasks", tasks), &tasks, |bencher, &tasks| {
            bencher.iter_custom(|iterations| {
                let store = store.clone();
                let counter = counter.clone();
                runtime.block_on(async move {
                    let per_task = iterations.div_ceil(tasks as u64);
                    let start = Instant::now();
                    let mut handles = Vec::new();
                    for _ in 0..tasks {
                        let store = store.clone();
                        let counter = counter.clone();
                        handles.push(tokio::spawn(async move {
                            for _ in 0..per_task {
                                let index = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                store.commit(Commit { audit: vec![entry(index)], writes: Vec::new() }).await.unwrap();
                            }
                        }));
                    }
                    for handle in handles {
                        handle.await.unwrap();
                    }
                    start.elapsed().mul_f64(iterations as f64 / (per_task * tasks as u64) as f64)
                })
            });
        });
    }
    group.finish();
    store.close();
}

/// A data directory of `count` entries appended (with their index keys) through the store in large commits, with
/// a signed checkpoint at the end.
fn build_log(count: u64) -> (tempfile::TempDir, Store, Arc<Checkpointer>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(&dir.path().join("audit")).unwrap();
    let tree = audit.tree();
    let (store, _) = Store::open(
        dir.path(),
        audit,
        StoreOptions { index_cache_bytes: 256 * 1024 * 1024, ..StoreOptions::default() },
    )
    .unwrap();
    let started = Instant::now();
    runtime.block_on(async {
        let mut index = 0;
        while index < count {
            let batch: Vec<AuditEntry> = (index..(index + 5000).min(count)).map(entry).collect();
            index += batch.len() as u64;
            store.commit(Commit { audit: batch, writes: Vec::new() }).await.unwrap();
        }
    });
    let checkpointer = Checkpointer::open_in(dir.path(), tree, DEFAULT_ORIGIN).unwrap();
    checkpointer.checkpoint_now().unwrap();
    eprintln!("built a log of {count} entries with indexes in {:?}", started.elapsed());
    (dir, store, checkpointer)
}

fn verification_and_query(criterion: &mut Criterion) {
    let count = entries_wanted();
    let (dir, store, checkpointer) = build_log(count);
    let size = checkpointer.latest().unwrap().size();

    let mut group = criterion.benchmark_group("audit_verify");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(count));
    group.bench_function(BenchmarkId::new("whole_log", count), |bencher| {
        bencher.iter(|| black_box(verify_data_dir(dir.path(), None, &mut |_, _| {}).unwrap()));
    });
    group.finish();

    let audit_dir = dir.path().join("audit");
    let mut child = [0u8; 32];
    child[..8].copy_from_slice(&(CHILDREN / 2).to_be_bytes());
    let filter = AuditFilter { child: Some(Pseudonym { key_version: 1, value: child }), ..AuditFilter::default() };
    let mut group = criterion.benchmark_group("audit_query");
    group.bench_function(BenchmarkId::new("one_child_among", count), |bencher| {
        bencher.iter(|| {
            let page = search(&store, &audit_dir, &filter, None, 1000, size).unwrap();
            assert_eq!(page.found.len() as u64, count / CHILDREN);
            black_box(page)
        });
    });
    group.finish();
    store.close();
    drop(store);

    // Opening the log at start: from the start-up cache (what a restart does), and from the whole log (the first
    // start without a cache, or with one that disagrees with the log). Only the open is timed.
    let mut group = criterion.benchmark_group("audit_open");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(count));
    for from_cache in [true, false] {
        let name = if from_cache { "from_cache" } else { "whole_log" };
        group.bench_function(BenchmarkId::new(name, count), |bencher| {
            bencher.iter_custom(|iterations| {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    if !from_cache {
                        std::fs::remove_dir_all(audit_dir.join("cache")).unwrap();
                    }
                    let started = Instant::now();
                    let log = AuditLog::open(&audit_dir).unwrap();
                    timed += started.elapsed();
                    assert_eq!(log.from_cache(), if from_cache { log.len() } else { 0 });
                    drop(log);
                }
                timed
            });
        });
    }
    group.finish();
}

fn inclusion_proof(criterion: &mut Criterion) {
    let count = 10_000_000u64;
    let mut tree = MerkleTree::with_capacity(count);
    for index in 0..count {
        tree.push_leaf_hash(leaf_hash(&index.to_be_bytes()));
    }
    let mut index = 0u64;
    criterion.bench_function("audit_inclusion_proof_10m", |bencher| {
        bencher.iter(|| {
            index = (index + 7_919_993) % count;
            black_box(tree.inclusion_proof(index, count).unwrap())
        });
    });
}

criterion_group!(benches, inclusion_proof, durable_append, verification_and_query);
criterion_main!(benches);
