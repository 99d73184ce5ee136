//! Hot reload of the policy set: on a change to the policy directory (checked every second) or on SIGHUP, the broker
//! validates and compiles the new files and runs their policy tests; only if all of that succeeds does it swap the
//! new set in, atomically (one pointer swap: a decision sees either the old set or the new one, never a mix).
//! On any failure it keeps the last good set and says why in its log and its audit trail. Every activation and
//! every rejection is an audit entry naming the policy-set hash.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    audit::{AuditEntry, EventType},
    delivery::broker_actor,
    exchange::CurrentPolicy,
    policy::PolicySet,
    store::{Commit, Store},
};

/// Loads, validates, compiles and tests a policy directory.
pub fn load_and_test(dir: &Path) -> Result<PolicySet, String> {
    let policy = PolicySet::load_dir(dir).map_err(|errors| errors.to_string())?;
    let report = policy.run_tests();
    if report.failed() > 0 {
        let failing: Vec<String> =
            report.results.iter().filter(|result| !result.passed()).map(|result| result.name.clone()).collect();
        return Err(format!("{} policy test(s) fail: {}", report.failed(), failing.join(", ")));
    }
    Ok(policy)
}

/// What the directory looks like now: every file's path, size and modification time.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_owned()];
    while let Some(folder) = folders.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(metadata) = std::fs::metadata(&path) else { continue };
            if metadata.is_dir() {
                folders.push(path);
            } else {
                found.push((path, metadata.len(), metadata.modified().ok()));
            }
        }
    }
    found.sort();
    found
}

/// Records an activation or rejection in the audit log.
pub async fn audit_policy_event(store: &Store, event: EventType, hash: &str, detail: String) {
    let entry = AuditEntry {
        time_micros: AuditEntry::now_micros(),
        event: Some(event),
        actor: broker_actor(),
        policy_set_hash: hash.to_owned(),
        detail: detail.chars().take(2000).collect(),
        ..AuditEntry::default()
    };
    if let Err(error) = store.commit(Commit { audit: vec![entry], writes: Vec::new() }).await {
        tracing::error!(error = %error, "could not record a policy event in the audit log");
    }
}

/// Watches `dir` until the task is aborted; `activated` is called after each new set takes effect.
pub async fn watch(dir: PathBuf, current: CurrentPolicy, store: Store, activated: impl Fn() + Send) {
    let mut seen = fingerprint(&dir);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<bool>();
        let forced = tokio::select! {
            _ = tick.tick() => false,
            received = signalled => received,
        };
        let now = fingerprint(&dir);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        if reload(&dir, &current, &store).await {
            activated();
        }
    }
}

/// One reload attempt: swap in the new set if it validates and its tests pass; true if a new set took effect.
pub async fn reload(dir: &Path, current: &CurrentPolicy, store: &Store) -> bool {
    let old_hash = current.read().map(|policy| policy.hash().to_owned()).unwrap_or_default();
    match load_and_test(dir) {
        Ok(policy) if policy.hash() == old_hash => {
            tracing::debug!("policy files touched but the set is unchanged");
            false
        }
        Ok(policy) => {
            let hash = policy.hash().to_owned();
            audit_policy_event(store, EventType::PolicyActivated, &hash, format!("replaces {old_hash}")).await;
            if let Ok(mut slot) = current.write() {
                *slot = Arc::new(policy);
            }
            crate::metrics::metrics().policy_activated(&hash);
            tracing::info!(policy_set_hash = %hash, "policy set reloaded and activated");
            true
        }
        Err(reason) => {
            tracing::error!(reason = %reason, kept = %old_hash, "new policy files rejected: keeping the last good set");
            audit_policy_event(store, EventType::PolicyRejected, &old_hash, reason).await;
            false
        }
    }
}
