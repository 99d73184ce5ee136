//! The real agent against the real broker: the outbox folder, and a crash between the inbox write and the
//! acknowledgement (the redelivered copy is recognised, acknowledged and not written twice).

use std::time::Duration;

use anyhow::Result;
use proto::pb;
use tests::{Area, InProcessBroker, eventually, example};
use tokio_stream::StreamExt;

const POLICE: &str = "beds-police";
const SCHOOL: &str = "luton-oakwood-primary";

fn json_files(folder: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    let mut files: Vec<_> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

/// A broker, and the police agent's configuration with an outbox folder (made) under the area.
async fn broker_and_police_with_outbox(
    area: &Area,
) -> Result<(InProcessBroker, agent::AgentConfig, std::path::PathBuf)> {
    let broker = InProcessBroker::start(area).await?;
    let mut police_config = area.agent_config(POLICE, broker.address)?;
    let outbox = area.path().join("outbox").join(POLICE);
    std::fs::create_dir_all(&outbox)?;
    police_config.outbox = Some(outbox.clone());
    Ok((broker, police_config, outbox))
}

fn start(
    config: agent::AgentConfig,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<(), agent::AgentError>>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agent::run(config, async move {
        let _ = stopped.await;
    }));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_dropped_in_the_outbox_are_sent_and_filed_with_their_receipts() -> Result<()> {
    let area = Area::new()?;
    let (broker, police_config, outbox) = broker_and_police_with_outbox(&area).await?;
    std::fs::copy(tests::examples_dir().join("operation-encompass-notification.json"), outbox.join("f1.json"))?;
    std::fs::write(outbox.join("broken.json"), b"{ \"kind\": \"not a kind\" }")?;
    let (stop_police, police) = start(police_config);
    let (stop_school, school) = start(area.agent_config(SCHOOL, broker.address)?);

    let inbox = area.inbox(SCHOOL);
    assert!(eventually(Duration::from_secs(10), || json_files(&inbox).len() == 1).await, "nothing arrived");
    assert!(eventually(Duration::from_secs(5), || outbox.join("sent/f1.json").exists()).await);
    assert!(outbox.join("sent/f1.receipt.json").exists());
    assert!(eventually(Duration::from_secs(5), || outbox.join("failed/broken.json").exists()).await);
    assert!(outbox.join("failed/broken.error.txt").exists());
    assert!(json_files(&outbox).is_empty(), "the outbox is empty once every file is filed");
    let _ = stop_police.send(());
    let _ = stop_school.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), police).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), school).await;
    broker.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_crashed_before_acknowledging_does_not_write_twice() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "crash".to_owned();
    let receipt = police.send(pb::SendRequest { envelope: Some(envelope) }).await?.into_inner();

    // The "crashed" agent: took the delivery, wrote it durably, died before acknowledging.
    let mut first = area.client(SCHOOL, broker.address).await?;
    let mut stream = first.deliveries(pb::DeliveriesRequest {}).await?.into_inner();
    let delivery = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?.unwrap()?;
    let inbox = area.inbox(SCHOOL);
    std::fs::create_dir_all(&inbox)?;
    assert_eq!(agent::write_delivery_durably(&inbox, &delivery)?, agent::WriteOutcome::Written);
    let written = std::fs::read(&json_files(&inbox)[0])?;
    drop(stream);

    // The restarted real agent gets the copy again, recognises it, acknowledges it, and writes nothing new.
    let (stop, task) = start(area.agent_config(SCHOOL, broker.address)?);
    let mut acknowledged = false;
    for _ in 0..200 {
        let track = police.track(pb::TrackRequest { message_id: receipt.message_id.clone() }).await?.into_inner();
        if track.recipients[0].state == pb::DeliveryState::Acknowledged as i32 {
            assert_eq!(track.recipients[0].attempts, 2, "it was delivered twice");
            acknowledged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(acknowledged, "the redelivered copy was never acknowledged");
    let files = json_files(&inbox);
    assert_eq!(files.len(), 1, "written once");
    assert_eq!(std::fs::read(&files[0])?, written, "the first write was kept as it was");
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    broker.stop().await
}

/// The agent's own token is refused (expired, or not yet refreshed by the agency's identity system): the outbox's
/// files are not filed as failed but wait, and go once a token the broker accepts is in the token file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_files_wait_while_the_agent_s_token_is_refused() -> Result<()> {
    let area = Area::new()?;
    let (broker, police_config, outbox) = broker_and_police_with_outbox(&area).await?;
    let agent::TokenSetting::File(token_file) = police_config.token.clone() else { panic!("a token file") };
    std::fs::write(&token_file, "not-a-token-the-broker-accepts")?;
    std::fs::copy(tests::examples_dir().join("operation-encompass-notification.json"), outbox.join("f1.json"))?;
    let (stop_police, police) = start(police_config);

    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(json_files(&outbox.join("failed")).is_empty(), "nothing filed as failed");
    assert!(json_files(&outbox.join("sent")).is_empty());
    let waiting = std::fs::read_dir(&outbox)?.filter_map(|entry| entry.ok()).filter(|entry| entry.path().is_file());
    assert_eq!(waiting.count(), 1, "the file still waits in the outbox (claimed or not)");

    std::fs::write(&token_file, area.default_token(POLICE)?)?;
    assert!(eventually(Duration::from_secs(10), || outbox.join("sent/f1.json").exists()).await, "sent once mended");
    assert!(outbox.join("sent/f1.receipt.json").exists());
    let _ = stop_police.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), police).await;
    broker.stop().await
}

/// The inbox cannot be written (here its folder is replaced by a file; in life a full disk, a read-only mount): the
/// agent closes its delivery stream instead of negatively acknowledging each copy, which would use up the copy's
/// attempts until it is dead-lettered, and opens it again once a write succeeds; the copy then arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_inbox_pauses_deliveries_until_it_can_be_written() -> Result<()> {
    let area = Area::with_settings(tests::BrokerSettings { max_attempts: 2, ..Default::default() })?;
    let broker = InProcessBroker::start(&area).await?;
    let inbox = area.inbox(SCHOOL);
    let (stop_school, school) = start(area.agent_config(SCHOOL, broker.address)?);
    assert!(eventually(Duration::from_secs(5), || inbox.is_dir()).await);
    std::fs::remove_dir_all(&inbox)?;
    std::fs::write(&inbox, b"not a folder")?;

    let mut police = area.client(POLICE, broker.address).await?;
    let mut envelope = example("operation-encompass-notification.json")?;
    envelope.idempotency_key = "unwritable-inbox".into();
    police.send(pb::SendRequest { envelope: Some(envelope) }).await?;
    // Long enough for the old behaviour (a negative acknowledgement, 200 ms, another attempt, dead-lettered).
    tokio::time::sleep(Duration::from_secs(2)).await;

    std::fs::remove_file(&inbox)?;
    std::fs::create_dir_all(&inbox)?;
    assert!(eventually(Duration::from_secs(10), || json_files(&inbox).len() == 1).await, "the copy arrives");
    let _ = stop_school.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), school).await;
    broker.stop().await
}

/// An agent's delivery stream lasts days, its token hours: the stream ends when the token that opened it is no
/// longer accepted (its `exp` plus the broker's leeway), so a copy sent after that waits; the agent reopens the
/// stream with the fresh token its agency's identity system writes, and the copy arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stream_ends_when_its_token_expires_and_reopens_with_the_fresh_one() -> Result<()> {
    let area = Area::new()?;
    let broker = InProcessBroker::start(&area).await?;
    let config = area.agent_config(SCHOOL, broker.address)?;
    let agent::TokenSetting::File(token_file) = config.token.clone() else { panic!("a token file") };
    // Expired 26 s ago: with the broker's 30 s leeway it is accepted for about four seconds more.
    let minted = std::time::Instant::now();
    let issuer = area.issuer(SCHOOL)?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = broker::auth::token::Claims {
        iss: issuer.issuer.clone(),
        sub: "test-dsl".to_owned(),
        aud: broker::auth::token::DEFAULT_AUDIENCE.to_owned(),
        exp: now - 26,
        nbf: None,
        iat: Some(now - 3600),
        agency: SCHOOL.to_owned(),
        name: String::new(),
        roles: vec!["dsl".to_owned()],
        role: None,
    };
    std::fs::write(&token_file, issuer.mint_claims(&claims).map_err(anyhow::Error::msg)?)?;
    let (stop_school, school) = start(config);
    let mut police = area.client(POLICE, broker.address).await?;
    let send = |key: &str| -> Result<pb::SendRequest> {
        let mut envelope = example("operation-encompass-notification.json")?;
        envelope.idempotency_key = key.to_owned();
        Ok(pb::SendRequest { envelope: Some(envelope) })
    };
    police.send(send("before-expiry")?).await?;
    let inbox = area.inbox(SCHOOL);
    assert!(eventually(Duration::from_secs(10), || json_files(&inbox).len() == 1).await, "the first copy arrives");
    assert!(minted.elapsed() < Duration::from_secs(4), "the test ran too slowly to see the token valid");

    tokio::time::sleep(Duration::from_secs(6).saturating_sub(minted.elapsed())).await;
    police.send(send("after-expiry")?).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(json_files(&inbox).len(), 1, "no copy reaches a stream whose token has expired");

    std::fs::write(&token_file, area.token(SCHOOL, "test-dsl", &["dsl"])?)?;
    assert!(eventually(Duration::from_secs(10), || json_files(&inbox).len() == 2).await, "it arrives once renewed");
    let _ = stop_school.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), school).await;
    broker.stop().await
}
