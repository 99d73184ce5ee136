//! Prometheus metrics, served as text on a separate HTTP port (`metrics_listen`, path `/metrics`).
//!
//! Counters and histograms are process-wide ([`metrics()`]); queue depth and the age of the oldest waiting copy per
//! recipient agency are read from the store at scrape time. Labels are agency ids, message kinds, outcomes and reason
//! codes only: never a child, a practitioner or any content (invariant 6).

use std::{
    net::SocketAddr,
    sync::{LazyLock, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::delivery::Deliveries;

type Labels = Vec<(String, String)>;

/// The broker's metrics.
pub struct Metrics {
    registry: Registry,
    /// Per named recipient: the message kind and `accepted` or `refused`.
    pub messages: Family<Labels, Counter>,
    /// Refusals by reason code.
    pub refusals: Family<Labels, Counter>,
    pub deliveries: Counter,
    pub redeliveries: Counter,
    pub dead_letters: Counter,
    pub escalations: Counter,
    /// Seconds from handing a copy to an agent to its acknowledgement.
    pub acknowledgement_seconds: Histogram,
    /// Seconds one group commit takes until its callers are answered (audit append, journal fsync).
    pub commit_seconds: Histogram,
    /// Seconds applying one answered group to the index (sled) takes; the next group waits for it.
    pub apply_seconds: Histogram,
    /// Seconds a commit waits before the committer takes it up (behind the group being committed, and for the
    /// committer thread to wake).
    pub commit_wait_seconds: Histogram,
    /// Seconds the journal's `fdatasync` takes, once per group.
    pub journal_sync_seconds: Histogram,
    /// Commits per group (how much group commit shares each fsync).
    pub commit_group_size: Histogram,
    pub audit_entries: Gauge,
    pub audit_log_bytes: Gauge,
    pub policy_set: Family<Labels, Gauge>,
    pub connected_agents: Gauge,
    /// Agencies whose stored queues are still loading after start (their deliveries wait; see
    /// [`crate::delivery::Deliveries::start`]).
    pub queues_loading: Gauge,
    queue_depth: Family<Labels, Gauge>,
    queue_oldest_age_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_owned(), value.to_owned())]
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("broker");
        let messages = Family::<Labels, Counter>::default();
        registry.register("messages", "Messages by kind and per-recipient outcome", messages.clone());
        let refusals = Family::<Labels, Counter>::default();
        registry.register("refusals", "Recipients refused by policy, by reason code", refusals.clone());
        let deliveries = Counter::default();
        registry.register("deliveries", "Copies handed to recipient agents (first attempts)", deliveries.clone());
        let redeliveries = Counter::default();
        registry.register("redeliveries", "Copies handed to recipient agents again", redeliveries.clone());
        let dead_letters = Counter::default();
        registry.register("dead_letters", "Copies given up after the maximum number of attempts", dead_letters.clone());
        let escalations = Counter::default();
        registry.register("escalations", "Acknowledgement deadlines that passed", escalations.clone());
        let acknowledgement_seconds =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0]);
        registry.register(
            "acknowledgement_seconds",
            "Time from delivery to acknowledgement",
            acknowledgement_seconds.clone(),
        );
        let commit_seconds = Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0]);
        registry.register(
            "commit_seconds",
            "Time of one durable group commit until its callers are answered (audit append and journal fsync)",
            commit_seconds.clone(),
        );
        // Steps of a commit, from 50 µs (a fast disk's `fdatasync`) up.
        let mut step = |name: &str, help: &str| {
            let histogram = Histogram::new([0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.5]);
            registry.register(name, help, histogram.clone());
            histogram
        };
        let apply_seconds =
            step("apply_seconds", "Time applying one answered group commit to the index (the next group waits for it)");
        let commit_wait_seconds = step(
            "commit_wait_seconds",
            "Time a commit waits before the committer takes it up (behind the group being committed)",
        );
        let journal_sync_seconds =
            step("journal_sync_seconds", "Time of the journal's fdatasync, once per group commit");
        let commit_group_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0]);
        registry.register("commit_group_size", "Commits sharing one fsync", commit_group_size.clone());
        let audit_entries = Gauge::default();
        registry.register("audit_entries", "Entries in the audit log", audit_entries.clone());
        let audit_log_bytes = Gauge::default();
        registry.register("audit_log_bytes", "Size of the audit log file", audit_log_bytes.clone());
        let policy_set = Family::<Labels, Gauge>::default();
        registry.register("policy_set", "The policy set in force (label: its hash)", policy_set.clone());
        let connected_agents = Gauge::default();
        registry.register("connected_agents", "Open delivery streams", connected_agents.clone());
        let queues_loading = Gauge::default();
        registry.register(
            "queues_loading",
            "Agencies whose stored queues are still loading after start (until then only the copies loaded so far go out)",
            queues_loading.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Copies waiting for acknowledgement per recipient agency",
            queue_depth.clone(),
        );
        let queue_oldest_age_seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest copy waiting per recipient agency",
            queue_oldest_age_seconds.clone(),
        );
        Self {
            registry,
            messages,
            refusals,
            deliveries,
            redeliveries,
            dead_letters,
            escalations,
            acknowledgement_seconds,
            commit_seconds,
            apply_seconds,
            commit_wait_seconds,
            journal_sync_seconds,
            commit_group_size,
            audit_entries,
            audit_log_bytes,
            policy_set,
            connected_agents,
            queues_loading,
            queue_depth,
            queue_oldest_age_seconds,
        }
    }

    pub fn message(&self, kind: &str, accepted: bool, reason_code: &str) {
        let outcome = if accepted { "accepted" } else { "refused" };
        self.messages
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned()), ("outcome".to_owned(), outcome.to_owned())])
            .inc();
        if !accepted {
            self.refusals.get_or_create(&label("reason_code", reason_code)).inc();
        }
    }

    /// Marks `hash` as the policy set in force.
    pub fn policy_activated(&self, hash: &str) {
        self.policy_set.clear();
        self.policy_set.get_or_create(&label("hash", hash)).set(1);
    }

    /// The text exposition, with queue figures read now.
    pub fn render(&self, deliveries: &Deliveries) -> String {
        self.queue_depth.clear();
        self.queue_oldest_age_seconds.clear();
        match deliveries.queue_stats() {
            Ok(stats) => {
                let now = crate::audit::AuditEntry::now_micros();
                for (recipient, (depth, oldest)) in stats {
                    self.queue_depth.get_or_create(&label("recipient", &recipient)).set(depth as i64);
                    if let Some(oldest) = oldest {
                        let age = (now - oldest).max(0) as f64 / 1_000_000.0;
                        self.queue_oldest_age_seconds.get_or_create(&label("recipient", &recipient)).set(age);
                    }
                }
            }
            Err(error) => tracing::error!(error = %error, "could not read queue figures for metrics"),
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            tracing::error!("could not encode metrics");
        }
        text
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    deliveries: Deliveries,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let deliveries = deliveries.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    metrics().render(&deliveries),
                )
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds the metrics address (kept apart from `serve` so start-up reports a bad address before serving).
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}
