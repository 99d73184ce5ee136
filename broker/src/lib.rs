//! The safeguarding information-sharing broker.
//!
//! Agencies' agents call the broker over gRPC with mutual TLS. For each message the broker identifies the sending
//! agency from its certificate ([`auth`]), asks the area's information-sharing policy ([`policy`]) about each
//! named recipient, builds each permitted recipient's copy from the fields it may see, records every decision in
//! the audit log ([`audit`]), stores the message durably ([`store`]) and delivers the copies to the recipients'
//! agents, which acknowledge them once their own write is durable ([`delivery`]).
//!
//! - [`run`] serves on an already-bound listener until a shutdown future resolves (so tests bind `127.0.0.1:0`).
//! - [`exchange`] holds send and track; [`transport`] is the gRPC face and the only error-to-status mapping.
//! - [`records`] names every stored key; [`store`] is the only module that names sled.
//! - [`config`] parses `broker.toml`; [`dev`] and [`pki`] make development certificates.

pub mod audit;
pub mod auth;
pub mod backup;
pub mod config;
pub mod delivery;
pub mod dev;
pub mod exchange;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod records;
pub mod reload;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod transport;

use std::{
    future::Future,
    sync::{Arc, RwLock},
};

use tokio::{net::TcpListener, sync::watch};

use crate::{
    audit::{AuditLog, Pseudonymiser},
    auth::token::TokenVerifier,
    config::Config,
    delivery::Deliveries,
    exchange::Exchange,
    policy::PolicySet,
    store::Store,
    transport::service::BrokerService,
};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the policy set in `{dir}` is not valid, so the broker will not start:\n{errors}")]
    Policy { dir: String, errors: String },
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] transport::TlsError),
    #[error("the token settings are not valid:\n{0}")]
    Tokens(String),
    #[error("the certificate revocation lists (`tls.crls`) do not load:\n{0}")]
    Revocations(String),
    #[error("could not listen for metrics on {address}: {source}")]
    Metrics { address: std::net::SocketAddr, source: std::io::Error },
    #[error("could not build the reflection service: {0}")]
    Reflection(String),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Installs the broker's log: lines on standard error (JSON lines when `json`) that `filter` lets through. A line that
/// cannot be written (standard error on a full disk, a closed pipe) is dropped: logging never stops the broker.
/// tracing-subscriber would otherwise report the failed write with `eprintln!`, which panics when standard error
/// cannot be written; with the log on a full disk, that panic stopped the committer thread and every send after it.
/// Does nothing if a logger is already installed.
pub fn init_logging(json: bool, filter: tracing_subscriber::EnvFilter) {
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// An error and its causes on one line, for a command's last words on standard error. Each cause is added unless the
/// error it caused already says it: the broker's errors write their cause into their own message *and* return it as
/// their source (so that a log line, which prints only the message, still says why), so anyhow's `{:#}` said each
/// cause two or three times (``storage: `…/journal`: No space left on device (os error 28): `…/journal`: No space
/// left …``).
pub fn error_report(error: &anyhow::Error) -> String {
    let mut report = String::new();
    let mut caused = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !text.is_empty() && !caused.contains(&text) {
            if !report.is_empty() {
                report.push_str(": ");
            }
            report.push_str(&text);
        }
        caused = text;
    }
    report
}

/// Loads the policy set and runs its tests; the broker never runs without a valid one.
pub fn load_policy(config: &Config) -> Result<PolicySet, BrokerError> {
    reload::load_and_test(&config.policy_dir)
        .map_err(|errors| BrokerError::Policy { dir: config.policy_dir.display().to_string(), errors })
}

/// Reads the trusted token issuers and their keys.
pub fn load_tokens(config: &Config) -> Result<TokenVerifier, BrokerError> {
    TokenVerifier::load(&config.tokens, &config.base_dir).map_err(|problems| BrokerError::Tokens(problems.join("\n")))
}

/// Reads the area CA's certificate revocation lists.
pub fn load_revocations(config: &Config) -> Result<auth::revocation::RevocationList, BrokerError> {
    auth::revocation::RevocationList::load(&config.tls.ca_cert, &config.tls.crls)
        .map_err(|problems| BrokerError::Revocations(problems.join("\n")))
}

/// Reloads what `load` reads whenever `changed` says its files have changed (an agency rotated its token signing key;
/// the area CA published a new revocation list), checking every two seconds. A set that fails to load is not used:
/// the previous one stays, and the error is logged (again only when it changes, though the load is retried every
/// two seconds until it succeeds).
async fn reload_on_change<T>(
    what: &'static str,
    current: Arc<RwLock<Arc<T>>>,
    changed: impl Fn(&T) -> bool,
    load: impl Fn() -> Result<T, BrokerError>,
    reloaded: impl Fn(),
) {
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(2));
    let mut reported = None;
    loop {
        interval.tick().await;
        let changed = current.read().map(|loaded| changed(&loaded)).unwrap_or(false);
        if !changed {
            continue;
        }
        match load() {
            Ok(loaded) => {
                if let Ok(mut slot) = current.write() {
                    *slot = Arc::new(loaded);
                }
                reported = None;
                reloaded();
                tracing::info!(what, "reloaded");
            }
            Err(error) => {
                let text = error.to_string();
                if reported.as_ref() != Some(&text) {
                    tracing::error!(what, error = %text, "changed but does not load: keeping the previous one");
                    reported = Some(text);
                }
            }
        }
    }
}

/// Records in the audit log a checkpoint key rotation that `broker audit rotate-key` made while the broker was
/// stopped (once: the note it left is removed when the entry is durable; if that removal fails, the next start
/// records it again).
async fn record_key_rotation(store: &Store, keys: &std::path::Path) {
    let Some(rotation) = audit::checkpoints::take_rotation_to_record(keys) else { return };
    // `<origin>+<key id>` (the key's base64 may hold `+` too).
    let key_name = |verifier_key: &str| verifier_key.splitn(3, '+').take(2).collect::<Vec<_>>().join("+");
    let detail = format!(
        "checkpoint signing key {} retired; {} signs from now on{}",
        key_name(&rotation.previous),
        key_name(&rotation.next),
        rotation.handover_size.map(|size| format!(" (handover checkpoint at size {size})")).unwrap_or_default()
    );
    let entry = audit::AuditEntry {
        time_micros: audit::AuditEntry::now_micros(),
        event: Some(audit::EventType::KeyRotation),
        actor: delivery::broker_actor(),
        detail,
        ..audit::AuditEntry::default()
    };
    match store.commit(store::Commit { audit: vec![entry], writes: Vec::new() }).await {
        Ok(_) => {
            tracing::info!(key = %key_name(&rotation.next), "recorded the checkpoint key rotation in the audit log");
            if let Err(error) = audit::checkpoints::rotation_recorded(keys) {
                tracing::warn!(error = %error, "could not remove the note of the recorded key rotation");
            }
        }
        Err(error) => tracing::error!(error = %error, "could not record the checkpoint key rotation in the audit log"),
    }
}

/// A write past the process's file-size limit (`RLIMIT_FSIZE`: `ulimit -f`, systemd's `LimitFSIZE=`) raises SIGXFSZ,
/// whose default action ends the process at once, in the middle of whatever it was writing. With a handler installed
/// (tokio's, which only counts the signal) the write fails with EFBIG instead, which the broker treats as a full
/// disk: the change is refused with RESOURCE_EXHAUSTED and nothing is lost (PostgreSQL ignores the signal likewise).
/// The handler stays installed for the life of the process.
fn survive_file_size_limit() {
    let kind = tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw());
    if let Err(error) = tokio::signal::unix::signal(kind) {
        tracing::warn!(error = %error, "could not handle SIGXFSZ: a file-size limit would end the broker");
    }
}

/// How long calls under way may take to finish once shutdown begins (well inside the usual 30 s grace period of a
/// supervisor such as Kubernetes).
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the broker on `listener` until `shutdown` resolves, then stops accepting, ends delivery streams, lets
/// requests in flight finish and closes the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BrokerError> {
    let policy = load_policy(&config)?;
    survive_file_size_limit();
    // Everything that can fail is checked before any task starts, so a failed start leaves nothing running.
    let tls = transport::server_tls(&config.tls)?;
    // With the TLS files, before storage opens (which can take seconds after a long run): a list that does not load
    // stops the start at once.
    let revocations = load_revocations(&config)?;
    // The token issuers' key files too: a missing one stops the start here, not after a long replay.
    let tokens = load_tokens(&config)?;
    if !revocations.is_empty() {
        tracing::info!(revoked = revocations.len(), "certificate revocation lists loaded");
    }
    tracing::info!(policy_set_hash = %policy.hash(), "policy set loaded");
    if config.auditor_agencies.is_empty() {
        tracing::warn!(
            "no agency is trusted to audit (`audit.auditor_agencies`): the audit service refuses every call"
        );
    }
    for agency in config.auditor_agencies.iter().filter(|agency| policy.agency(agency).is_none()) {
        tracing::warn!(%agency, "`audit.auditor_agencies` names an agency the policy set does not know");
    }
    metrics::metrics().policy_activated(policy.hash());
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(metrics::bind(address).await.map_err(|source| BrokerError::Metrics { address, source })?),
        None => None,
    };
    // The audit log (its Merkle tree and the auditors' index, from their start-up cache and the entries after it) is
    // read on its own thread while sled opens (which replays sled's own log); they share nothing.
    let opening = std::time::Instant::now();
    let fresh = store::journal::segment_files(&config.data_dir).map_or(true, |segments| segments.is_empty());
    if fresh {
        // A mistyped path, or a restore that never ran, starts a new area with no messages, no audit trail and new
        // keys: said loudly, since agents connect to it all the same.
        tracing::warn!(
            data_dir = %config.data_dir.display(),
            "the data directory holds no journal: starting a NEW, EMPTY broker (new keys, empty audit log); if you meant \
             an existing one or a restore, stop now and check `data_dir`"
        );
    }
    let data_dir_lock = store::lock_data_dir(&config.data_dir)?;
    // Before the audit log is read: a directory from a newer broker is refused with one clear error.
    store::format::check_and_mark(&config.data_dir)?;
    audit::check_keys_kept(&config.data_dir)?;
    let audit_dir = config.data_dir.join("audit");
    let reading_audit = std::thread::Builder::new()
        .name("audit-open".to_owned())
        .spawn(move || {
            let audit = AuditLog::open(&audit_dir);
            (audit, opening.elapsed())
        })
        .map_err(|source| store::StoreError::Log(store::log::LogError::Io { path: config.data_dir.clone(), source }))?;
    let index = Store::open_index(&config.data_dir, config.storage);
    tracing::info!(millis = opening.elapsed().as_millis() as u64, "index opened");
    let (audit, audit_took) = reading_audit.join().map_err(|_| audit::AuditError::Stopped)?;
    let audit = audit?;
    tracing::info!(
        entries = audit.len(),
        from_cache = audit.from_cache(),
        millis = audit_took.as_millis() as u64,
        "audit log opened"
    );
    let checkpointer =
        audit::checkpoints::Checkpointer::open_in(&config.data_dir, audit.tree(), &config.checkpoint_origin)
            .map_err(audit::AuditError::from)?;
    let (store, report) = Store::open_with(index?, &config.data_dir, audit)?;
    store.hold_lock(data_dir_lock);
    tracing::info!(
        millis = opening.elapsed().as_millis() as u64,
        journal_records_replayed = report.journal_records_replayed,
        journal_bytes_truncated = report.journal_bytes_truncated,
        audit_entries = report.audit_entries,
        "storage opened"
    );
    let pseudonymiser = Pseudonymiser::load_or_create(&config.data_dir.join("keys"))?;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| BrokerError::Reflection(error.to_string()))?;
    let (stop_streams, streams_stopping) = watch::channel(false);
    let opening = std::time::Instant::now();
    let deliveries = Deliveries::start(store.clone(), config.delivery.clone(), streams_stopping)?;
    tracing::info!(millis = opening.elapsed().as_millis() as u64, "deliveries started; queues load in the background");
    reload::audit_policy_event(&store, audit::EventType::PolicyActivated, policy.hash(), "at start".to_owned()).await;
    record_key_rotation(&store, &config.data_dir.join("keys")).await;
    let current_policy = Arc::new(RwLock::new(Arc::new(policy)));
    // Each reload of the revocation lists or the policy set is announced to the open delivery streams, which end at
    // once if their agent may no longer receive (a revoked certificate, an agency the policy set no longer knows).
    let (access_changed, access_changes) = watch::channel(0u64);
    let policy_watcher = {
        let access_changed = access_changed.clone();
        tokio::spawn(reload::watch(config.policy_dir.clone(), current_policy.clone(), store.clone(), move || {
            access_changed.send_modify(|count| *count += 1)
        }))
    };
    let exchange = Exchange::new(store.clone(), deliveries.clone(), current_policy, pseudonymiser);
    // Escalation and dead-letter notices: those the delivery engine reports, and those the last run recorded as owed
    // but did not store (it stopped in between).
    let notify: delivery::EscalationHook = {
        let exchange = exchange.clone();
        Arc::new(move |late| {
            let exchange = exchange.clone();
            tokio::spawn(async move { exchange.notify_until_stored(late, std::time::Duration::from_secs(1)).await });
        })
    };
    deliveries.set_escalation_hook(notify.clone());
    match exchange.notices_owed() {
        Ok(owed) => {
            if !owed.is_empty() {
                tracing::warn!(count = owed.len(), "sending escalation notices owed since before the restart");
            }
            owed.into_iter().for_each(|late| notify(late));
        }
        Err(error) => tracing::error!(error = %error, "could not read the escalation notices owed"),
    }
    let current_tokens = Arc::new(RwLock::new(Arc::new(tokens)));
    let reloader = {
        let config = config.clone();
        tokio::spawn(reload_on_change(
            "token keys",
            current_tokens.clone(),
            TokenVerifier::key_files_changed,
            move || load_tokens(&config),
            || {},
        ))
    };
    let current_revocations = Arc::new(RwLock::new(Arc::new(revocations)));
    let revocation_reloader = {
        let config = config.clone();
        tokio::spawn(reload_on_change(
            "certificate revocation lists",
            current_revocations.clone(),
            auth::revocation::RevocationList::files_changed,
            move || load_revocations(&config),
            move || access_changed.send_modify(|count| *count += 1),
        ))
    };
    let audit_service = transport::audit_service::server(
        transport::service::Authenticator::new(
            exchange.clone(),
            current_tokens.clone(),
            current_revocations.clone(),
            store.clone(),
        ),
        config.auditor_agencies.clone(),
        store.clone(),
        Pseudonymiser::load_or_create(&config.data_dir.join("keys"))?,
        checkpointer.clone(),
    );
    let checkpoints = tokio::spawn(checkpointer.clone().run(audit::checkpoints::CHECKPOINT_INTERVAL));
    let service = proto::pb::broker_server::BrokerServer::new(BrokerService::new(
        exchange,
        deliveries.clone(),
        current_tokens,
        (current_revocations, access_changes),
        store.clone(),
    ))
    .max_decoding_message_size(config.max_message_bytes)
    .max_encoding_message_size(config.max_message_bytes.saturating_mul(2));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<proto::pb::broker_server::BrokerServer<BrokerService>>().await;
    let (stop_metrics, metrics_stopping) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = metrics_listener.map(|listener| {
        tracing::info!(address = ?listener.local_addr().ok(), "metrics at /metrics");
        tokio::spawn(metrics::serve(listener, deliveries.clone(), async move {
            let _ = metrics_stopping.await;
        }))
    });
    let local = listener.local_addr().ok();
    tracing::info!(address = ?local, "broker listening (mutual TLS)");
    // A store that needs a restart (its index failed: sled met a full disk, say, while applying an acknowledged change
    // or while read; or its committer stopped after a failure) refuses every change until then; the broker then stops
    // as on SIGTERM and exits with an error, so that its supervisor starts it again, which recovers from the journal.
    let broken = {
        let store = store.clone();
        async move { store.restart_needed().await }
    };
    let (signalled, shutdown_began) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            () = broken => tracing::error!(
                "storage needs a restart (a full disk?): stopping, so that the next start recovers from the journal"
            ),
        }
        tracing::info!("shutting down: no new connections, ending delivery streams");
        health.set_not_serving::<proto::pb::broker_server::BrokerServer<BrokerService>>().await;
        // The whole server too: what `grpc.health.v1.Health/Check` with no service name (and most probes) ask about.
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let _ = stop_streams.send(true);
        let _ = signalled.send(());
    };
    let mut serving = Box::pin(
        tonic::transport::Server::builder()
            .tls_config(tls)?
            // An agent that stops answering (a hung process, a dropped network path) loses its connection within a
            // minute: its delivery stream ends and the copies on it go back to the queue. A copy's acknowledgement
            // wait starts only when the stream reads it, so without this a stream no longer read would hold them.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
            // One span per request, named by its gRPC method (never by anything in the message).
            .trace_fn(|request| tracing::info_span!("grpc", method = %request.uri().path()))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            .add_service(audit_service)
            .serve_with_incoming_shutdown(
                // TCP_NODELAY, as tonic's own `serve` sets it: without it Nagle's algorithm and delayed ACKs add ~40 ms
                // stalls to small responses (measured by the load generator, PERFORMANCE.md).
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            ),
    );
    // Requests under way get `DRAIN` to finish once shutdown begins; a call that never ends by itself (a client
    // watching `Health/Watch`, say) would otherwise hold the shutdown open until the process is killed, which skips
    // closing the store and the final checkpoint.
    let served = tokio::select! {
        served = &mut serving => served,
        () = async {
            let _ = shutdown_began.await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!(seconds = DRAIN.as_secs(), "calls still open after shutdown began: closing them");
            Ok(())
        }
    };
    drop(serving);
    reloader.abort();
    revocation_reloader.abort();
    policy_watcher.abort();
    let _ = stop_metrics.send(());
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    deliveries.shutdown().await;
    store.close();
    checkpoints.abort();
    // A last checkpoint covering everything the log holds.
    if let Err(error) = checkpointer.checkpoint_now() {
        tracing::error!(error = %error, "could not sign the final checkpoint");
    }
    tracing::info!("broker stopped");
    served.map_err(BrokerError::from)?;
    // Also when it broke during a shutdown that SIGTERM began.
    if store.needs_restart() {
        return Err(store::StoreError::NeedsRestart.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn an_error_report_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let said = io.to_string();
        let error = store::StoreError::Log(store::log::LogError::Io { path: "/data/journal".into(), source: io });
        let error = anyhow::Error::from(error).context("could not open the storage");
        let report = error_report(&error);
        assert_eq!(report, format!("could not open the storage: storage: `/data/journal`: {said}"));
        assert_eq!(report.matches(&said).count(), 1, "{report}");
        // A cause its error does not write into its own message is still said.
        let error = Err::<(), _>(std::io::Error::other("permission denied")).context("cannot read `x.toml`");
        let report = error_report(&error.expect_err("an error"));
        assert_eq!(report, "cannot read `x.toml`: permission denied");
        // Nor is a cause that only happens to be said further up the line.
        let error = Err::<(), _>(std::io::Error::other("timed out")).context("sending `referral.json`");
        let error = error.context("the transfer timed out");
        assert_eq!(
            error_report(&error.expect_err("an error")),
            "the transfer timed out: sending `referral.json`: timed out"
        );
    }
}
