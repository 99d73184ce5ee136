//! Operations (issue 7): health and reflection through real clients, a metrics scrape after traffic (and the commits
//! a message to an idle agent takes, counted by it), graceful shutdown losing nothing, backup while running and
//! restore, the deploy/ example configurations, and a run's logs holding no personal data.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use anyhow::Result;
use broker::audit::AuditLog;
use proto::pb;
use tests::{Area, BrokerProcess, BrokerSettings, InProcessBroker, example, metric_value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";
const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

async fn http_get(address: SocketAddr, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

async fn send_f1(client: &mut tests::Client, key: &str) -> Result<pb::SendResponse> {
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = key.to_owned();
    Ok(client.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_standard_clients() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let channel = area.channel(POLICE, broker.address).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "safeguarding.v1.Broker"] {
        let answer =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.to_owned() }).await?.into_inner();
        assert_eq!(answer.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await?.into_inner();
    let response = tokio_stream::StreamExt::next(&mut responses).await.unwrap()?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("no service list")
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|service| service.name).collect();
    assert!(names.contains("safeguarding.v1.Broker"), "{names:?}");
    broker.stop().await
}

/// At shutdown the server as a whole (the empty service name, which probes ask about) turns NOT_SERVING, as the
/// Broker service does; and a client watching health, whose call never ends by itself, does not hold the shutdown
/// open: the broker stops within its drain time, its store closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_health_not_serving_and_is_not_held_open_by_a_watcher() -> Result<()> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut health = HealthClient::new(area.channel(POLICE, broker.address).await?);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message()).await??.expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(broker.stop());
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await??.expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32, "the whole server is not serving once shutdown begins");
    tokio::time::timeout(Duration::from_secs(15), stopping).await???;
    assert!(started.elapsed() < Duration::from_secs(15), "stopped within the drain time: {:?}", started.elapsed());
    // In a process of its own the broker now exits. Here, the watcher's connection outlives `run` until the client
    // lets it go; then the data directory is free and opens again.
    drop(watch);
    drop(health);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match InProcessBroker::start(&area).await?.stop().await {
            Ok(()) => return Ok(()),
            Err(error) if tokio::time::Instant::now() < deadline && format!("{error:#}").contains("in use") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_without_personal_data() -> Result<()> {
    let metrics_address = free_port();
    let area =
        Area::with_settings(BrokerSettings { metrics_listen: Some(metrics_address), ..BrokerSettings::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    send_f1(&mut police, "metrics-1").await?;
    send_f1(&mut police, "metrics-2").await?;
    let mut refused = example("operation-encompass-notification.json")?;
    refused.recipients = vec!["luton-womens-aid".to_owned()];
    let _ = police.send(pb::SendRequest { envelope: Some(refused) }).await;

    let scrape = http_get(metrics_address, "/metrics").await?;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(
        scrape.contains(r#"broker_messages_total{kind="MESSAGE_KIND_DOMESTIC_ABUSE_NOTIFICATION",outcome="accepted"}"#),
        "{scrape}"
    );
    assert!(scrape.contains("broker_refusals_total{reason_code="), "{scrape}");
    assert!(scrape.contains(&format!(r#"broker_queue_depth{{recipient="{SCHOOL}"}} 2"#)), "{scrape}");
    assert!(scrape.contains(&format!(r#"broker_queue_oldest_age_seconds{{recipient="{SCHOOL}"}}"#)), "{scrape}");
    assert!(scrape.contains("broker_commit_seconds_bucket"), "{scrape}");
    assert!(scrape.contains("broker_apply_seconds_count"), "{scrape}");
    assert!(!scrape.contains("broker_apply_seconds_count 0\n"), "applying to the index is timed: {scrape}");
    assert!(!scrape.contains("broker_journal_sync_seconds_count 0\n"), "the journal's fdatasync is timed: {scrape}");
    assert!(scrape.contains("broker_journal_sync_seconds_count"), "{scrape}");
    assert!(!scrape.contains("broker_commit_wait_seconds_count 0\n"), "waiting for the committer is timed: {scrape}");
    assert!(scrape.contains("broker_commit_wait_seconds_count"), "{scrape}");
    assert!(!scrape.contains("broker_audit_log_bytes 0"), "the audit log's size is reported: {scrape}");
    assert!(scrape.contains("broker_policy_set{hash="), "{scrape}");
    for personal in ["Maisie", "Exampleton", "Fictional Close", "Sampleford"] {
        assert!(!scrape.contains(personal), "metrics must not carry `{personal}`");
    }

    // An acknowledged copy leaves the queue's depth; one sent and not yet acknowledged stays in it.
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await??.expect("a delivery");
    school.acknowledge(pb::AcknowledgeRequest { delivery_id: first.delivery_id }).await?;
    let scrape = http_get(metrics_address, "/metrics").await?;
    assert!(scrape.contains(&format!(r#"broker_queue_depth{{recipient="{SCHOOL}"}} 1"#)), "{scrape}");
    broker.stop().await
}

/// A message to an idle recipient whose agent is connected takes two commits, the send's (which records the copy's
/// delivery) and the acknowledgement's, not three: the copy goes to the stream without a commit of the actor's
/// own (`Deliveries::reserve_direct`). The broker runs as its own process, so its commit count is this test's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_to_an_idle_connected_agent_goes_out_with_its_send_s_commit() -> Result<()> {
    let metrics_address = free_port();
    let area =
        Area::with_settings(BrokerSettings { metrics_listen: Some(metrics_address), ..BrokerSettings::default() })?;
    let broker = BrokerProcess::start(BROKER, &area, "127.0.0.1:0".parse()?)?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let mut commits = Vec::new();
    for key in ["direct-1", "direct-2", "direct-3"] {
        // Idle: the last copy acknowledged, and time for the actor to say it has room again.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = metric_value(&http_get(metrics_address, "/metrics").await?, "broker_commit_seconds_count");
        send_f1(&mut police, key).await?;
        let copy = tokio::time::timeout(Duration::from_secs(10), stream.message()).await??.expect("a delivery");
        assert_eq!(copy.attempt, 1);
        school.acknowledge(pb::AcknowledgeRequest { delivery_id: copy.delivery_id }).await?;
        let after = metric_value(&http_get(metrics_address, "/metrics").await?, "broker_commit_seconds_count");
        commits.push(after.zip(before).map(|(after, before)| after - before));
    }
    // The first may find the agent's stream not yet taken in by its actor.
    assert_eq!(commits[1..], [Some(2.0), Some(2.0)], "commits per message: {commits:?}");
    broker.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_sends_loses_nothing_that_was_acknowledged() -> Result<()> {
    let area = Area::new()?;
    let broker = BrokerProcess::start(BROKER, &area, "127.0.0.1:0".parse()?)?;
    let address = broker.address;
    let mut senders = Vec::new();
    for task in 0..4 {
        let mut client = area.client(POLICE, address).await?;
        senders.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for index in 0..200 {
                match send_f1(&mut client, &format!("term-{task}-{index}")).await {
                    Ok(receipt) => acknowledged.push(receipt.message_id),
                    Err(_) => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = tokio::task::spawn_blocking(move || broker.terminate()).await??;
    assert!(status.success(), "graceful shutdown exits cleanly: {status:?}");
    let mut acknowledged = BTreeSet::new();
    for sender in senders {
        acknowledged.extend(sender.await?);
    }
    assert!(!acknowledged.is_empty());

    let broker = BrokerProcess::start(BROKER, &area, address)?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let mut delivered = BTreeSet::new();
    while delivered.len() < acknowledged.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), tokio_stream::StreamExt::next(&mut stream))
            .await?
            .unwrap()?;
        school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id.clone() }).await?;
        delivered.insert(delivery.message_id);
    }
    assert!(acknowledged.is_subset(&delivered), "every acknowledged send was delivered after the restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_running_restores_queue_and_audit_log() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let address = broker.address;
    let mut police = area.client(POLICE, address).await?;
    let receipt = send_f1(&mut police, "backup").await?;
    let backup_file = area.path().join("backup.tar");
    broker::backup::backup(&area.data_dir(), &backup_file)?;
    // Counted without opening the log (which would cut what it takes for a torn tail under the running broker).
    let mut counted = 0u64;
    let entries_at_backup = broker::store::log::read_all(&AuditLog::path(&area.data_dir().join("audit")), |_, _| {
        counted += 1;
        Ok(())
    })
    .ok()
    .map(|_| counted);
    broker.stop().await?;

    // Restore into the data directory of a fresh area that shares the same certificates and keys.
    let original = area.data_dir();
    std::fs::rename(&original, area.path().join("data-before-restore"))?;
    broker::backup::restore(&backup_file, &original)?;
    let restored_entries = AuditLog::open(&original.join("audit"))?.len();
    assert!(restored_entries >= 1);
    if let Some(expected) = entries_at_backup {
        assert!(restored_entries <= expected);
    }
    let broker = InProcessBroker::start_on(&area, address).await?;
    let mut school = area.client(SCHOOL, address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery =
        tokio::time::timeout(Duration::from_secs(5), tokio_stream::StreamExt::next(&mut stream)).await?.unwrap()?;
    assert_eq!(delivery.message_id, receipt.message_id, "the queued copy survived backup and restore");
    let mut police = area.client(POLICE, address).await?;
    let again = send_f1(&mut police, "backup").await?;
    assert!(again.duplicate, "the idempotency record survived too");
    broker.stop().await
}

#[test]
fn the_deploy_example_configurations_parse() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let config = broker::config::Config::load(&deploy.join("broker.toml"), |_| None)
        .unwrap_or_else(|errors| panic!("deploy/broker.toml: {errors}"));
    assert!(!config.tokens.issuers.is_empty());
    // The agent checks its certificate files exist: point them at files that do.
    let files = tempfile::tempdir().unwrap();
    for name in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::write(files.path().join(name), "placeholder").unwrap();
    }
    let path_of = |name: &str| files.path().join(name).display().to_string();
    let agent = agent::AgentConfig::load_with_environment(deploy.join("agent.toml"), |name| match name {
        "AGENT_CA_CERT" => Some(path_of("ca.pem")),
        "AGENT_CERT" => Some(path_of("agent.pem")),
        "AGENT_KEY" => Some(path_of("agent.key")),
        _ => None,
    });
    assert!(agent.is_ok(), "deploy/agent.toml: {agent:?}");
}

/// With its log going to a device that is always full (`/dev/full`: every write fails with ENOSPC, as on a full
/// disk), the broker still takes sends, delivers and records acknowledgements, and stops cleanly: a log line that
/// cannot be written is dropped. (tracing-subscriber's fallback, `eprintln!`, panicked on the same full device:
/// sends failed with an HTTP/2 error and the committer thread stopped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_does_not_stop_the_broker() -> Result<()> {
    let area = Area::new()?;
    let broker = BrokerProcess::start_logged(BROKER, &area, "127.0.0.1:0".parse()?, std::path::Path::new("/dev/full"))?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    for round in 0..3 {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = format!("full-log-{round}");
        let receipt = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();
        let accepted = pb::RecipientOutcome::Accepted as i32;
        assert!(receipt.recipients.iter().all(|recipient| recipient.outcome == accepted), "{receipt:?}");
        let delivery = tokio::time::timeout(Duration::from_secs(10), tokio_stream::StreamExt::next(&mut stream))
            .await?
            .ok_or_else(|| anyhow::anyhow!("the delivery stream ended"))??;
        assert_eq!(delivery.message_id, receipt.message_id);
        school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id }).await?;
        let track = police.track(pb::TrackRequest { message_id: receipt.message_id }).await?.into_inner();
        assert_eq!(track.recipients[0].state, pb::DeliveryState::Acknowledged as i32);
    }
    drop(stream);
    let stopping = tokio::task::spawn_blocking(move || broker.terminate());
    let status = tokio::time::timeout(Duration::from_secs(30), stopping).await???;
    assert!(status.success(), "the broker exited with {status}");
    Ok(())
}

/// The journal segment size of the file-size-limit tests.
const JOURNAL_SEGMENT: u64 = 1024 * 1024;

/// Sends from the police to the offline school under a file-size limit (`RLIMIT_FSIZE`) set on the running broker
/// to `limit(size of sled's file)` bytes, until a send is refused or the broker stops; then expects the broker to stop
/// by itself with a failure status (so that its supervisor starts it again), starts it again without the limit, and
/// expects every send it acknowledged before to reach the school. Returns how many were acknowledged.
///
/// A file-size limit makes writes past it fail (EFBIG), which is what a full disk does to the files that still need
/// room, without the root privileges a small filesystem needs; unlike a full disk it also refuses writes into the
/// journal's segments, which were filled ahead of use, once they lie past the limit.
async fn limited_then_restarted(limit: impl FnOnce(u64) -> u64) -> Result<usize> {
    // The tests' limits are set against 1 MiB journal segments.
    let area =
        Area::with_settings(BrokerSettings { journal_segment_bytes: JOURNAL_SEGMENT, ..BrokerSettings::default() })?;
    // Its log, at debug level, is under the limit too, as on a full disk: it soon cannot be written either.
    let log = area.path().join("broker.log");
    let mut broker = BrokerProcess::start_logged(BROKER, &area, "127.0.0.1:0".parse()?, &log)?;
    let mut police = area.client(POLICE, broker.address).await?;
    // Serving (storage open, the journal's first segment filled) before the limit.
    let mut accepted = BTreeSet::new();
    accepted.insert(send_f1(&mut police, "before-the-limit").await?.message_id);
    broker.limit_file_size(limit(std::fs::metadata(area.data_dir().join("index").join("db"))?.len()))?;
    let mut refusals = Vec::new();
    let mut exited = None;
    for round in 0..20_000 {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = format!("limited-{round}");
        let request = pb::SendRequest { envelope: Some(envelope) };
        match tokio::time::timeout(Duration::from_secs(10), police.send(request)).await? {
            Ok(receipt) => {
                accepted.insert(receipt.into_inner().message_id);
            }
            Err(status) => refusals.push(status.code()),
        }
        // Once refused, the broker is about to stop (it checks four times a second).
        let wait = if refusals.is_empty() { Duration::ZERO } else { Duration::from_secs(30) };
        exited = broker.exited_within(wait).await?;
        if exited.is_some() || !refusals.is_empty() {
            break;
        }
    }
    let status = exited.ok_or_else(|| anyhow::anyhow!("the broker did not stop; refusals: {refusals:?}"))?;
    // 1: not a panic's 101 (`eprintln!` of the final error panicked on the unwritable log), nor death by the signal a
    // file-size limit sends by default.
    assert_eq!(status.code(), Some(1), "it stops with a failure status for its supervisor: {status}");
    assert!(
        refusals.iter().all(|code| matches!(code, tonic::Code::Unavailable | tonic::Code::ResourceExhausted)),
        "refusals say to retry: {refusals:?}"
    );

    // The next start, with room again, recovers from the journal: every acknowledged send reaches the school.
    let broker = BrokerProcess::start(BROKER, &area, "127.0.0.1:0".parse()?)?;
    let mut school = area.client(SCHOOL, broker.address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let mut delivered = BTreeSet::new();
    while !accepted.is_subset(&delivered) {
        let delivery = tokio::time::timeout(Duration::from_secs(20), tokio_stream::StreamExt::next(&mut stream))
            .await
            .map_err(|_| anyhow::anyhow!("{} of {} acknowledged sends delivered", delivered.len(), accepted.len()))?
            .ok_or_else(|| anyhow::anyhow!("the delivery stream ended"))??;
        school.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id }).await?;
        delivered.insert(delivery.message_id);
    }
    drop(stream);
    tokio::task::spawn_blocking(move || broker.terminate()).await??;
    Ok(accepted.len())
}

/// sled meets the limit first (the journal's 1 MiB segments lie below it): its write fails, and it answers every
/// later call with that failure. The broker stops whether a change failed to apply or a send's first read met it
/// first (it stayed up, refusing every send, until the store marked a failed read as needing a restart too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_index_cannot_grow_stops_and_its_next_start_loses_nothing() -> Result<()> {
    let accepted = limited_then_restarted(|sled_file| sled_file.max(JOURNAL_SEGMENT) + 256 * 1024).await?;
    assert!(accepted > 1, "sends were taken under the limit until sled met it");
    Ok(())
}

/// The journal meets the limit first: a commit's write fails and cannot be taken back (the zeros that would cover it
/// lie past the limit too), so the committer stops taking changes and the broker stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_whose_journal_cannot_be_written_stops_and_its_next_start_loses_nothing() -> Result<()> {
    // Below the current segment's end, and far below where sled writes: the journal's next group meets it.
    let accepted = limited_then_restarted(|sled_file| (sled_file + 64 * 1024).min(JOURNAL_SEGMENT / 2)).await?;
    assert!(accepted > 1, "sends were taken under the limit until the journal met it");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_log_of_real_traffic_holds_no_personal_data() -> Result<()> {
    let area = Area::new()?;
    let log = area.path().join("broker.log");
    let broker = BrokerProcess::start_logged(BROKER, &area, "127.0.0.1:0".parse()?, &log)?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.subject.as_mut().unwrap().nhs_number = "943 476 5919".to_owned();
    envelope.idempotency_key = "logs".to_owned();
    police.send(pb::SendRequest { envelope: Some(envelope) }).await?;
    let mut school_client = area.client(SCHOOL, broker.address).await?;
    let referral = example("school-referral-to-front-door.json")?;
    school_client.send(pb::SendRequest { envelope: Some(referral) }).await?;
    let mut stream = school_client.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery = tokio_stream::StreamExt::next(&mut stream).await.unwrap()?;
    school_client.acknowledge(pb::AcknowledgeRequest { delivery_id: delivery.delivery_id }).await?;
    let _ = area
        .client_with_token(POLICE, broker.address, Some("garbage"))
        .await?
        .send(pb::SendRequest { envelope: None })
        .await;
    drop(stream);
    tokio::task::spawn_blocking(move || broker.terminate()).await??;

    let text = std::fs::read_to_string(&log)?;
    assert!(text.contains("message decided"), "the log has the run's events: {text}");
    for personal in [
        "Maisie",
        "Exampleton",
        "Tyler",
        "Fakename",
        "9434765919",
        "943 476 5919",
        "Fictional Close",
        "Imaginary Road",
        "scared by the shouting",
    ] {
        assert!(!text.contains(personal), "the log must not carry `{personal}`");
    }
    Ok(())
}
