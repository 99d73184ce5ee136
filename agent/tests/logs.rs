//! What the agent writes to its logs. In a test binary of its own: a tracing subscriber set for one thread is
//! missed by callsites another test's thread registered first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{path::Path, time::Duration};

mod common;

use common::{agent_without_broker, wait_until};

/// Logs a `MakeWriter` keeps in memory.
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A case system may name outbox files after the child. The agent's logs (kept at the agency, often shipped to a
/// central log service) name them by a fingerprint instead, the same on every pass, for a file filed as failed and
/// for one that waits.
#[tokio::test]
async fn logs_never_name_an_outbox_file() {
    let folder = tempfile::tempdir().unwrap();
    let config = agent_without_broker(folder.path());
    let outbox = folder.path().join("outbox");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/operation-encompass-notification.json");
    std::fs::copy(example, outbox.join("jones-amelia-2015-03-02.json")).unwrap();
    std::fs::write(outbox.join("brown-oliver.json"), b"{ not json").unwrap();

    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(config, async {
        let _ = stopped.await;
    }));
    assert!(wait_until(Duration::from_secs(10), || outbox.join("failed/brown-oliver.error.txt").exists()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent).await.unwrap().unwrap().unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("moved to failed") && text.contains("will retry"), "{text}");
    for name in ["amelia", "jones", "oliver", "brown"] {
        assert!(!text.to_lowercase().contains(name), "the logs name `{name}`:\n{text}");
    }
    let fingerprint = |stem: &str| {
        use sha2::Digest;
        format!("file-{}", hex::encode(&sha2::Sha256::digest(stem.as_bytes())[..8]))
    };
    assert!(text.contains(&fingerprint("brown-oliver")), "{text}");
    assert!(text.contains(&fingerprint("jones-amelia-2015-03-02")), "{text}");
}
