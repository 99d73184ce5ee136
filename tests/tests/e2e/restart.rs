//! The broker killed (SIGKILL, the process, not a task) and restarted: every acknowledged send is still delivered,
//! exactly once into the recipient's inbox, and the audit log reopens intact; also when the journal has moved
//! between segments.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Result;
use proto::pb;
use tests::{Area, BrokerProcess, BrokerSettings, eventually, example};

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";
const BROKER: &str = env!("CARGO_BIN_EXE_broker-under-test");

fn inbox_message_ids(inbox: &std::path::Path) -> BTreeSet<String> {
    let Ok(entries) = std::fs::read_dir(inbox) else { return BTreeSet::new() };
    entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .filter_map(|path| std::fs::read(path).ok())
        .filter_map(|bytes| agent::json::read_message_json::<pb::Delivery>(agent::json::DELIVERY_MESSAGE, &bytes).ok())
        .map(|delivery| delivery.message_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_survive_kill_9_and_are_all_delivered_after_restart() -> Result<()> {
    // The smallest journal segments, so that the messages span several and the kills come after moves between them.
    let segment_bytes = broker::store::journal::MIN_SEGMENT_BYTES;
    let area =
        Area::with_settings(BrokerSettings { journal_segment_bytes: segment_bytes, ..BrokerSettings::default() })?;
    let broker = BrokerProcess::start(BROKER, &area, "127.0.0.1:0".parse()?)?;
    let address = broker.address;
    let mut police = area.client(POLICE, address).await?;
    let mut acknowledged = BTreeSet::new();
    for index in 0..60 {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = format!("kill-{index}");
        let receipt = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();
        acknowledged.insert(receipt.message_id);
    }
    // Killed straight after the last answer: no shutdown code runs.
    broker.kill()?;
    let segments = broker::store::journal::segment_files(&area.data_dir())?;
    assert!(segments.len() >= 2, "the journal moved between segments: {segments:?}");

    let broker = BrokerProcess::start(BROKER, &area, address)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(area.agent_config(SCHOOL, broker.address)?, async move {
        let _ = stopped.await;
    }));
    let inbox = area.inbox(SCHOOL);
    let arrived = eventually(Duration::from_secs(20), || inbox_message_ids(&inbox) == acknowledged).await;
    assert!(
        arrived,
        "missing after restart: {:?}",
        acknowledged.difference(&inbox_message_ids(&inbox)).collect::<Vec<_>>()
    );

    // Kill again while the agent is connected, then restart: nothing is written twice.
    broker.kill()?;
    let broker = BrokerProcess::start(BROKER, &area, address)?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "after-second-restart".to_owned();
    let receipt = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();
    acknowledged.insert(receipt.message_id);
    assert!(eventually(Duration::from_secs(20), || inbox_message_ids(&inbox) == acknowledged).await);
    let files = std::fs::read_dir(&inbox)?
        .filter(|entry| entry.as_ref().is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "json")));
    assert_eq!(files.count(), acknowledged.len(), "each message written once");

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    drop(broker);
    // The audit log reopens with consecutive sequence numbers and no gap.
    let audit = broker::audit::AuditLog::open(&area.data_dir().join("audit"))?;
    assert!(audit.len() >= 26 * 3, "decision, delivery and acknowledgement per message: {}", audit.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_the_queue() -> Result<()> {
    let area = Area::new()?;
    let broker = tests::InProcessBroker::start(&area).await?;
    let address = broker.address;
    let mut police = area.client(POLICE, address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "graceful".to_owned();
    let receipt = police.send(pb::SendRequest { envelope: Some(envelope.clone()) }).await?.into_inner();
    drop(police);
    broker.stop().await?;

    let broker = tests::InProcessBroker::start_on(&area, address).await?;
    let mut police = area.client(POLICE, address).await?;
    // The idempotency record survived too.
    let again = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();
    assert_eq!(again.message_id, receipt.message_id);
    assert!(again.duplicate);
    let mut school = area.client(SCHOOL, address).await?;
    let mut stream = school.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery =
        tokio::time::timeout(Duration::from_secs(5), tokio_stream::StreamExt::next(&mut stream)).await?.unwrap()?;
    assert_eq!(delivery.message_id, receipt.message_id);
    broker.stop().await
}
