//! The long-running agent (`agent run`): the delivery stream written into the inbox, and the outbox folder sent to
//! the broker, both until shutdown.
//!
//! Neither loop exits on a broker or network failure: each waits with exponential backoff (from
//! `delivery.reconnect_initial_millis` doubling up to `delivery.reconnect_max_millis`) and tries again. Shutdown is
//! observed between units of work, so a delivery being written is written and acknowledged (or negatively
//! acknowledged) before the agent stops; if the agent is killed instead, the broker redelivers and the inbox
//! recognises the copy by its id.

use std::{future::Future, path::Path, time::Duration};

use proto::pb;
use tokio::sync::watch;

use crate::{
    AgentError, BrokerClient,
    client::connect_lazily,
    config::AgentConfig,
    inbox::{WriteOutcome, remove_stale_temporary_files, write_delivery_durably},
    outbox::{prepare_outbox, process_outbox_once},
    send::code_name,
};

/// How often the outbox is looked at when nothing is failing.
const OUTBOX_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Runs the agent until `shutdown` resolves: receives deliveries into the inbox and, when an outbox is configured,
/// sends the files dropped there.
///
/// # Errors
/// Only problems that retrying cannot fix: the inbox or outbox folder cannot be created, or the certificate files
/// cannot be read. Broker and network failures are retried, never returned.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let folder_error = |path: &Path| {
        let path = path.to_path_buf();
        move |error| AgentError::Io { path, error }
    };
    std::fs::create_dir_all(&config.inbox).map_err(folder_error(&config.inbox))?;
    let removed = remove_stale_temporary_files(&config.inbox).map_err(folder_error(&config.inbox))?;
    if removed > 0 {
        tracing::info!(removed, "removed temporary files left by an earlier run");
    }
    if let Some(outbox) = &config.outbox {
        prepare_outbox(outbox).map_err(folder_error(outbox))?;
    }
    let client = connect_lazily(&config)?;
    tracing::info!(agency = %config.agency, broker = %config.broker_url, "agent started");

    let (stop_sender, stop_receiver) = watch::channel(false);
    let signal_stop = async move {
        shutdown.await;
        tracing::info!("agent stopping");
        let _ = stop_sender.send(true);
    };
    let deliveries = receive_deliveries(client.clone(), &config, stop_receiver.clone());
    let outbox = async {
        if let Some(outbox) = &config.outbox {
            send_outbox(client.clone(), outbox, &config, stop_receiver.clone()).await;
        }
    };
    tokio::join!(signal_stop, deliveries, outbox);
    tracing::info!("agent stopped");
    Ok(())
}

/// Resolves once stop is requested (or can no longer be requested).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Sleeps for `delay` unless stop is requested first; returns whether it was.
async fn sleep_or_stop(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop_requested(stop) => true,
    }
}

fn next_delay(delay: Duration, config: &AgentConfig) -> Duration {
    delay.saturating_mul(2).min(config.delivery.reconnect_max)
}

/// Acknowledgements sent at once, at most: the next delivery is written while earlier ones are acknowledged, so a
/// busy agent pays for its own durable write and the broker's commit side by side rather than one after the other.
const MAX_PENDING_ACKNOWLEDGEMENTS: usize = 64;

/// Keeps the delivery stream open, reconnecting with backoff, and handles each delivery until stop; then waits for
/// the acknowledgements still under way.
async fn receive_deliveries(client: BrokerClient, config: &AgentConfig, stop: watch::Receiver<bool>) {
    let mut acknowledgements = tokio::task::JoinSet::new();
    receive_until_stop(client, config, stop, &mut acknowledgements).await;
    while acknowledgements.join_next().await.is_some() {}
}

async fn receive_until_stop(
    mut client: BrokerClient,
    config: &AgentConfig,
    mut stop: watch::Receiver<bool>,
    acknowledgements: &mut tokio::task::JoinSet<()>,
) {
    let mut delay = config.delivery.reconnect_initial;
    loop {
        if *stop.borrow() {
            return;
        }
        let opened = tokio::select! {
            opened = client.deliveries(pb::DeliveriesRequest {}) => opened,
            () = stop_requested(&mut stop) => return,
        };
        match opened {
            Ok(response) => {
                tracing::info!("delivery stream open");
                let opened_at = tokio::time::Instant::now();
                let mut stream = response.into_inner();
                loop {
                    let next = tokio::select! {
                        next = stream.message() => next,
                        () = stop_requested(&mut stop) => return,
                    };
                    // The backoff starts again once the stream has proved itself (it carried a copy, or stayed open
                    // for the longest wait): a stream the broker ends at once (it is stopping; another agent of this
                    // agency took the stream) is reopened with growing waits, not every `reconnect_initial`.
                    if matches!(next, Ok(Some(_))) || opened_at.elapsed() >= config.delivery.reconnect_max {
                        delay = config.delivery.reconnect_initial;
                    }
                    match next {
                        Ok(Some(delivery)) => {
                            while acknowledgements.len() >= MAX_PENDING_ACKNOWLEDGEMENTS {
                                acknowledgements.join_next().await;
                            }
                            if handle_delivery(&mut client, config, delivery, acknowledgements).await
                                == Handled::InboxUnavailable
                            {
                                // Closing the stream leaves its copies queued at the broker (no attempt is used up
                                // by a negative acknowledgement); it opens again once the inbox takes a write.
                                drop(stream);
                                if !wait_for_writable_inbox(config, &mut stop).await {
                                    return;
                                }
                                break;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("delivery stream ended by the broker: reconnecting");
                            break;
                        }
                        Err(status) if status.code() == tonic::Code::Aborted => {
                            // Another agent of this agency (or this one's earlier connection) took the stream: wait
                            // the longest before taking it back, so two agents do not keep replacing each other.
                            tracing::error!(
                                message = status.message(),
                                "another connection of this agency took the delivery stream: is a second agent running?"
                            );
                            delay = config.delivery.reconnect_max;
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(
                                code = code_name(status.code()),
                                message = status.message(),
                                "delivery stream failed: reconnecting"
                            );
                            break;
                        }
                    }
                }
            }
            Err(status) if crate::send::is_permanent_failure(status.code()) => {
                // Not transient, but an operator can fix it (a refreshed token, a policy change) without restarting.
                tracing::error!(
                    code = code_name(status.code()),
                    message = status.message(),
                    "broker refused the delivery stream"
                );
            }
            Err(status) => {
                tracing::warn!(
                    code = code_name(status.code()),
                    message = status.message(),
                    "cannot open the delivery stream"
                );
            }
        }
        tracing::debug!(
            delay_millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "waiting before reconnecting"
        );
        if sleep_or_stop(delay, &mut stop).await {
            return;
        }
        delay = next_delay(delay, config);
    }
}

/// What became of one delivery.
#[derive(Debug, PartialEq, Eq)]
enum Handled {
    /// Written and being acknowledged, or negatively acknowledged (a copy the inbox cannot take, whatever its state).
    Done,
    /// The inbox cannot take writes now (a full disk, a read-only or missing folder): the stream should close until
    /// it can.
    InboxUnavailable,
}

/// Whether a small file can be written and made durable in the inbox now; the error's kind when not.
async fn probe_inbox(config: &AgentConfig) -> Result<(), std::io::ErrorKind> {
    let inbox = config.inbox.clone();
    match tokio::task::spawn_blocking(move || crate::inbox::probe_writable(&inbox)).await {
        Ok(result) => result.map_err(|error| error.kind()),
        Err(_) => Err(std::io::ErrorKind::Interrupted),
    }
}

/// Waits, with backoff, until a file can be written and made durable in the inbox; returns false if stop is
/// requested first.
async fn wait_for_writable_inbox(config: &AgentConfig, stop: &mut watch::Receiver<bool>) -> bool {
    let mut delay = config.delivery.reconnect_initial;
    let mut reported = false;
    loop {
        match probe_inbox(config).await {
            Ok(()) => {
                if reported {
                    tracing::info!("the inbox takes writes again: reopening the delivery stream");
                }
                return true;
            }
            Err(kind) if !reported => {
                tracing::error!(
                    %kind,
                    "the inbox cannot be written: deliveries wait at the broker until it can (check its disk space, \
                     permissions and mount)"
                );
                reported = true;
            }
            _ => {}
        }
        if sleep_or_stop(delay, stop).await {
            return false;
        }
        delay = next_delay(delay, config);
    }
}

/// Writes one delivery durably, then acknowledges it (in the background). When the inbox cannot take writes at all
/// (a test write fails too) the delivery is left to the broker ([`Handled::InboxUnavailable`]); when this copy alone
/// cannot be written (its id is not a safe file name, it is too big for the space left, something other than a
/// readable file has its name) it is negatively acknowledged.
async fn handle_delivery(
    client: &mut BrokerClient,
    config: &AgentConfig,
    delivery: pb::Delivery,
    acknowledgements: &mut tokio::task::JoinSet<()>,
) -> Handled {
    let delivery_id = delivery.delivery_id.clone();
    let expected_suffix = format!(".{}", config.agency);
    if !delivery_id.ends_with(&expected_suffix) {
        tracing::warn!(delivery_id = %delivery_id, agency = %config.agency, "delivery id does not name the configured agency: check that `agency` matches the certificate");
    }
    let inbox = config.inbox.clone();
    let attempt = delivery.attempt;
    let written = tokio::task::spawn_blocking(move || write_delivery_durably(&inbox, &delivery)).await;
    let failure = match written {
        Ok(Ok(outcome)) => {
            match outcome {
                WriteOutcome::Written => {
                    tracing::info!(delivery_id = %delivery_id, attempt, "delivery written to the inbox")
                }
                WriteOutcome::AlreadyPresent => {
                    tracing::info!(delivery_id = %delivery_id, attempt, "delivery already in the inbox: acknowledging the redelivery");
                }
            }
            // The write is durable: the acknowledgement may now go, while the next delivery is written.
            let mut client = client.clone();
            acknowledgements.spawn(async move {
                match client.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery_id.clone() }).await {
                    Ok(_) => tracing::debug!(delivery_id = %delivery_id, "delivery acknowledged"),
                    Err(status) => {
                        // The broker redelivers it; the inbox then recognises it and the agent acknowledges again.
                        tracing::warn!(delivery_id = %delivery_id, code = code_name(status.code()), "acknowledgement failed");
                    }
                }
            });
            return Handled::Done;
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::InvalidInput => {
            "the delivery id is not a safe file name".to_owned()
        }
        // The inbox as a whole cannot take writes (a full disk, a read-only or missing folder) when a small test write
        // fails too; otherwise it is this copy (too big for the space left, an existing file it cannot read, ...).
        Ok(Err(error)) if probe_inbox(config).await.is_err() => {
            tracing::error!(delivery_id = %delivery_id, kind = %error.kind(), "delivery not written: the inbox cannot take writes");
            return Handled::InboxUnavailable;
        }
        // Only the kind of the error goes to the broker and the log: the error text may name files.
        Ok(Err(error)) => format!("the agent could not write the delivery into its inbox: {}", error.kind()),
        Err(_) => "the agent's write into its inbox was interrupted".to_owned(),
    };
    tracing::error!(delivery_id = %delivery_id, reason = %failure, "delivery not written: negatively acknowledging");
    let request = pb::NegativeAcknowledgeRequest {
        delivery_id: delivery_id.clone(),
        retry_after_millis: i64::try_from(config.delivery.retry_after.as_millis()).unwrap_or(i64::MAX),
        reason: failure,
    };
    match client.negative_acknowledge(request).await {
        Ok(response) if response.get_ref().dead_lettered => {
            tracing::error!(delivery_id = %delivery_id, "delivery dead-lettered by the broker after its last attempt");
        }
        Ok(_) => {}
        Err(status) => {
            tracing::warn!(delivery_id = %delivery_id, code = code_name(status.code()), "negative acknowledgement failed")
        }
    }
    Handled::Done
}

/// Sends the outbox's files until stop: every poll interval, or with backoff after a transient failure.
async fn send_outbox(mut client: BrokerClient, outbox: &Path, config: &AgentConfig, mut stop: watch::Receiver<bool>) {
    let mut delay = config.delivery.reconnect_initial;
    loop {
        let stop_flag = stop.clone();
        let pass = process_outbox_once(&mut client, outbox, || *stop_flag.borrow()).await;
        let wait = match pass {
            Ok(pass) if pass.retry_later => {
                let wait = delay;
                delay = next_delay(delay, config);
                wait
            }
            Ok(_) => {
                delay = config.delivery.reconnect_initial;
                OUTBOX_POLL_INTERVAL
            }
            Err(error) => {
                tracing::warn!(kind = %error.kind(), "cannot process the outbox");
                let wait = delay;
                delay = next_delay(delay, config);
                wait
            }
        };
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
    }
}
