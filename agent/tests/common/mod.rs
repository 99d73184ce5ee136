//! Set-up shared by the agent's integration tests.

#![allow(clippy::unwrap_used, dead_code)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent::AgentConfig;

/// Writes a CA-less self-signed certificate set: enough for the TLS settings to load. The broker address refuses
/// connections, so no handshake happens.
pub fn write_certificates(folder: &Path) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(folder.join("ca.pem"), certified.cert.pem()).unwrap();
    std::fs::write(folder.join("agent.pem"), certified.cert.pem()).unwrap();
    std::fs::write(folder.join("agent.key"), certified.signing_key.serialize_pem()).unwrap();
}

/// A local port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

pub async fn wait_until(deadline: Duration, condition: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    condition()
}

/// The police agent's configuration in `folder` (certificates written), with an inbox and an outbox (made), aimed
/// at a port where no broker listens.
pub fn agent_without_broker(folder: &Path) -> AgentConfig {
    write_certificates(folder);
    let config_text = format!(
        r#"
        agency = "beds-police"
        broker_url = "https://127.0.0.1:{}"
        server_name = "localhost"
        ca_cert = "ca.pem"
        cert = "agent.pem"
        key = "agent.key"
        inbox = "inbox"
        outbox = "outbox"
        [delivery]
        reconnect_initial_millis = 20
        reconnect_max_millis = 100
        "#,
        closed_port()
    );
    let config_path = folder.join("agent.toml");
    std::fs::write(&config_path, config_text).unwrap();
    std::fs::create_dir_all(folder.join("outbox")).unwrap();
    AgentConfig::load_with_environment(&config_path, |_| None).unwrap()
}
