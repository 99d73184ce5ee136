//! The long-running agent against a broker that is not there: it must keep going (no exit on a transient error),
//! keep the outbox file it could not send, move an invalid one to `failed/`, and stop promptly on shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, time::Duration};

use agent::{AgentConfig, outbox::FAILED_FOLDER};

mod common;

use common::{agent_without_broker, wait_until, write_certificates};

#[tokio::test]
async fn agent_survives_an_absent_broker_and_sorts_its_outbox() {
    let folder = tempfile::tempdir().unwrap();
    let config = agent_without_broker(folder.path());
    let outbox = folder.path().join("outbox");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/operation-encompass-notification.json");
    std::fs::copy(example, outbox.join("encompass.json")).unwrap();
    std::fs::write(outbox.join("broken.json"), br#"{"kind": "MESSAGE_KIND_REFERRAL", "recipents": []}"#).unwrap();
    std::fs::create_dir_all(folder.path().join("inbox")).unwrap();
    std::fs::write(folder.path().join("inbox/.tmp-1-1"), b"left by a killed run").unwrap();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(config, async {
        let _ = stopped.await;
    }));

    let failed = outbox.join(FAILED_FOLDER);
    assert!(wait_until(Duration::from_secs(10), || failed.join("broken.error.txt").exists()).await);
    let error_text = std::fs::read_to_string(failed.join("broken.error.txt")).unwrap();
    assert!(error_text.contains("recipents"), "{error_text}");
    assert!(failed.join("broken.json").exists());
    assert!(!folder.path().join("inbox/.tmp-1-1").exists());

    // Several reconnection rounds later the agent is still running and the valid file still waits, claimed for
    // sending (hidden from the case system as `.sending-<name>.json`), neither sent nor filed as failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!agent.is_finished());
    assert!(outbox.join(".sending-encompass.json").exists());
    assert!(!outbox.join("sent/encompass.json").exists());
    assert!(!failed.join("encompass.json").exists());

    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), agent).await.unwrap().unwrap();
    assert!(result.is_ok(), "{result:?}");
}

#[tokio::test]
async fn run_fails_when_certificates_cannot_be_read() {
    let folder = tempfile::tempdir().unwrap();
    write_certificates(folder.path());
    let config_path = folder.path().join("agent.toml");
    std::fs::write(
        &config_path,
        r#"
        agency = "beds-police"
        broker_url = "https://127.0.0.1:1"
        server_name = "localhost"
        ca_cert = "ca.pem"
        cert = "agent.pem"
        key = "agent.key"
        inbox = "inbox"
        "#,
    )
    .unwrap();
    let config = AgentConfig::load_with_environment(&config_path, |_| None).unwrap();
    std::fs::remove_file(folder.path().join("agent.key")).unwrap();
    let error = agent::run(config, std::future::pending()).await.unwrap_err();
    assert!(error.to_string().contains("agent.key"), "{error}");
}
