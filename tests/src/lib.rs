//! The test harness: a development area made per test, the real broker in-process or as its own process, and
//! real agents and tonic clients over mutual TLS.
//!
//! - [`Area`] makes a temporary folder with a fresh CA (rcgen), the broker's server certificate, and one client
//!   certificate per agency on demand; it writes the broker's configuration using the repository's sample policies.
//! - [`InProcessBroker`] runs `broker::run` on `127.0.0.1:0` in this test's runtime and stops it gracefully.
//! - [`BrokerProcess`] runs the broker as a child process (`broker-under-test`) so a test can kill it with SIGKILL
//!   and start it again on the same port and data.
//! - [`Area::client`] is a raw tonic client for one agency; [`Area::agent_config`] configures a real agent.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use broker::pki::CertificateAuthority;
use proto::pb::{self, broker_client::BrokerClient};
use tokio::sync::oneshot;
use tonic::{
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// A client that presents an agency's certificate and a practitioner's bearer token.
pub type Client = BrokerClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call (or nothing, for the tests of a missing token).
#[derive(Clone)]
pub struct Bearer(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The repository's sample policy set.
pub fn sample_policy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// Copies the sample policy set into `target` (for tests that change it).
pub fn copy_sample_policies(target: &Path) -> Result<()> {
    let source = sample_policy_dir();
    let mut folders = vec![PathBuf::new()];
    while let Some(relative) = folders.pop() {
        std::fs::create_dir_all(target.join(&relative))?;
        for entry in std::fs::read_dir(source.join(&relative))? {
            let entry = entry?;
            let name = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                folders.push(name);
            } else {
                std::fs::copy(entry.path(), target.join(&name))?;
            }
        }
    }
    Ok(())
}

/// The repository's example messages.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Delivery settings a test can shorten.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub ack_wait_seconds: u64,
    pub max_attempts: u32,
    pub max_message_bytes: usize,
    pub default_retry_delay_millis: u64,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The policy directory (default: the repository's sample set).
    pub policy_dir: Option<PathBuf>,
    /// The journal's segment size (default 1 MiB, not the broker's 64 MiB: tests then move between segments, and
    /// each broker they start fills little disk with zeros ahead of use).
    pub journal_segment_bytes: u64,
    /// The audit log's checkpoint origin (`audit.checkpoint_origin`); the broker's default when `None`.
    pub checkpoint_origin: Option<String>,
    /// Certificate revocation lists (`tls.crls`), relative to the area's folder.
    pub crls: Vec<PathBuf>,
    /// The agencies trusted to audit (`audit.auditor_agencies`; default the sample area's local authority).
    pub auditor_agencies: Vec<String>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            ack_wait_seconds: 30,
            max_attempts: 5,
            max_message_bytes: 4 * 1024 * 1024,
            default_retry_delay_millis: 200,
            metrics_listen: None,
            policy_dir: None,
            journal_segment_bytes: 1024 * 1024,
            checkpoint_origin: None,
            crls: Vec::new(),
            auditor_agencies: vec!["luton-csc".to_owned()],
        }
    }
}

/// A temporary development area: CA, certificates, token issuers, data directory.
pub struct Area {
    pub dir: tempfile::TempDir,
    pub ca: CertificateAuthority,
    pub settings: BrokerSettings,
    /// The sample registry's agencies and the role their development tokens carry.
    pub agencies: Vec<(String, String)>,
}

impl Area {
    pub fn new() -> Result<Self> {
        Self::with_settings(BrokerSettings::default())
    }

    pub fn with_settings(settings: BrokerSettings) -> Result<Self> {
        Self::with_settings_in(&std::env::temp_dir(), settings)
    }

    /// An area in a fresh folder under `parent`.
    pub fn with_settings_in(parent: &Path, settings: BrokerSettings) -> Result<Self> {
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::tempdir_in(parent)?;
        let ca = CertificateAuthority::generate("Test area")?;
        broker::pki::write_file(&dir.path().join("pki/ca.pem"), ca.cert_pem())?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        broker::pki::write_file(&dir.path().join("pki/server.pem"), &server.cert_pem)?;
        broker::pki::write_file(&dir.path().join("pki/server.key"), &server.key_pem)?;
        let policy = broker::policy::PolicySet::load_dir(&sample_policy_dir()).map_err(|errors| anyhow!("{errors}"))?;
        let agencies = policy
            .agencies()
            .map(|agency| (agency.id.clone(), broker::dev::default_role(agency.kind).to_owned()))
            .collect();
        Ok(Self { dir, ca, settings, agencies })
    }

    /// The development identity provider of `agency` in this area (made on first use).
    pub fn issuer(&self, agency: &str) -> Result<broker::auth::token::DevIssuer> {
        Ok(broker::dev::dev_issuer(self.path(), agency)?.0)
    }

    /// A token for `subject` of `agency` with `roles`, valid for ten minutes.
    pub fn token(&self, agency: &str, subject: &str, roles: &[&str]) -> Result<String> {
        let roles: Vec<String> = roles.iter().map(|role| (*role).to_owned()).collect();
        self.issuer(agency)?.mint(subject, &roles, Duration::from_secs(600)).map_err(|error| anyhow!(error))
    }

    /// The usual token of an agency: its default role.
    pub fn default_token(&self, agency: &str) -> Result<String> {
        let role = self.agencies.iter().find(|(id, _)| id == agency).map_or("practitioner", |(_, role)| role.as_str());
        self.token(agency, &format!("test-{role}"), &[role])
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    /// Writes `broker.toml` for `listen` and returns its path.
    pub fn write_broker_config(&self, listen: SocketAddr) -> Result<PathBuf> {
        let settings = &self.settings;
        let metrics =
            settings.metrics_listen.map(|address| format!("metrics_listen = \"{address}\"\n")).unwrap_or_default();
        let text = format!(
            r#"listen = "{listen}"
{metrics}data_dir = "data"
policy_dir = "{policy}"
[tls]
ca_cert = "pki/ca.pem"
cert = "pki/server.pem"
key = "pki/server.key"
crls = {crls:?}
[limits]
max_message_bytes = {max_message_bytes}
[delivery]
ack_wait_seconds = {ack_wait}
max_attempts = {max_attempts}
default_retry_delay_millis = {retry}
[storage]
journal_segment_bytes = {segment}
[audit]
auditor_agencies = {auditors:?}
{origin}{issuers}
"#,
            policy = settings.policy_dir.clone().unwrap_or_else(sample_policy_dir).display(),
            max_message_bytes = settings.max_message_bytes,
            ack_wait = settings.ack_wait_seconds,
            max_attempts = settings.max_attempts,
            retry = settings.default_retry_delay_millis,
            segment = settings.journal_segment_bytes,
            crls = settings.crls.iter().map(|path| path.display().to_string()).collect::<Vec<_>>(),
            auditors = settings.auditor_agencies,
            origin = settings
                .checkpoint_origin
                .as_ref()
                .map(|origin| format!("checkpoint_origin = \"{origin}\"\n"))
                .unwrap_or_default(),
            issuers = self.issuers_toml()?,
        );
        let path = self.path().join("broker.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn issuers_toml(&self) -> Result<String> {
        let mut text = String::new();
        for (agency, _) in &self.agencies {
            let (issuer, public) = broker::dev::dev_issuer(self.path(), agency)?;
            text.push_str(&format!(
                "[[tokens.issuers]]\nagency = \"{agency}\"\nissuer = \"{}\"\nalgorithms = [\"EdDSA\"]\npublic_keys = [{{ kid = \"{}\", pem = \"{}\" }}]\n",
                issuer.issuer,
                issuer.kid,
                public.display()
            ));
        }
        Ok(text)
    }

    pub fn broker_config(&self, listen: SocketAddr) -> Result<broker::config::Config> {
        let path = self.write_broker_config(listen)?;
        broker::config::Config::load(&path, |_| None).map_err(|errors| anyhow!("{errors}"))
    }

    /// Issues (once) and returns the paths of an agency's certificate and key.
    pub fn agency_credentials(&self, agency: &str) -> Result<(PathBuf, PathBuf)> {
        let cert = self.path().join(format!("pki/agents/{agency}.pem"));
        let key = self.path().join(format!("pki/agents/{agency}.key"));
        if !cert.exists() {
            let issued = self.ca.issue_agency(agency)?;
            broker::pki::write_file(&cert, &issued.cert_pem)?;
            broker::pki::write_file(&key, &issued.key_pem)?;
        }
        Ok((cert, key))
    }

    /// A raw tonic client presenting `agency`'s certificate and a token of its default role.
    pub async fn client(&self, agency: &str, broker: SocketAddr) -> Result<Client> {
        let token = self.default_token(agency)?;
        self.client_with_token(agency, broker, Some(&token)).await
    }

    /// A raw tonic client presenting `agency`'s certificate and the given bearer token (or none).
    pub async fn client_with_token(&self, agency: &str, broker: SocketAddr, token: Option<&str>) -> Result<Client> {
        let value = match token {
            Some(token) => Some(format!("Bearer {token}").parse()?),
            None => None,
        };
        Ok(BrokerClient::with_interceptor(self.channel(agency, broker).await?, Bearer(value))
            .max_decoding_message_size(64 * 1024 * 1024))
    }

    /// A mutual-TLS channel presenting `agency`'s certificate.
    pub async fn channel(&self, agency: &str, broker: SocketAddr) -> Result<Channel> {
        let (cert, key) = self.agency_credentials(agency)?;
        channel_with(
            &std::fs::read(self.path().join("pki/ca.pem"))?,
            &std::fs::read(cert)?,
            &std::fs::read(key)?,
            broker,
        )
        .await
    }

    /// A real agent's configuration for `agency`, with its inbox under this area.
    pub fn agent_config(&self, agency: &str, broker: SocketAddr) -> Result<agent::AgentConfig> {
        let (cert, key) = self.agency_credentials(agency)?;
        let token_file = self.path().join(format!("tokens/{agency}.jwt"));
        broker::pki::write_file(&token_file, &self.default_token(agency)?)?;
        Ok(agent::AgentConfig {
            agency: agency.to_owned(),
            broker_url: format!("https://{broker}"),
            server_name: "localhost".to_owned(),
            ca_cert: self.path().join("pki/ca.pem"),
            cert,
            key,
            inbox: self.inbox(agency),
            outbox: None,
            token: agent::TokenSetting::File(token_file),
            delivery: agent::DeliverySettings {
                reconnect_initial: Duration::from_millis(50),
                reconnect_max: Duration::from_millis(500),
                retry_after: Duration::from_millis(200),
            },
        })
    }

    pub fn inbox(&self, agency: &str) -> PathBuf {
        self.path().join("inbox").join(agency)
    }
}

/// A tonic client with the given PEM CA, certificate and key.
pub async fn client_with(ca: &[u8], cert: &[u8], key: &[u8], broker: SocketAddr) -> Result<BrokerClient<Channel>> {
    Ok(BrokerClient::new(channel_with(ca, cert, key, broker).await?))
}

/// A mutual-TLS channel with the given PEM CA, certificate and key.
pub async fn channel_with(ca: &[u8], cert: &[u8], key: &[u8], broker: SocketAddr) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{broker}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .context("could not connect to the broker")?;
    Ok(channel)
}

/// The broker running inside the test's runtime.
pub struct InProcessBroker {
    pub address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), broker::BrokerError>>>,
}

impl InProcessBroker {
    pub async fn start(area: &Area) -> Result<Self> {
        Self::start_on(area, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(area: &Area, listen: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let config = area.broker_config(address)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(broker::run(config, listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self { address, stop: Some(stop), task: Some(task) })
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("the broker did not stop within 20 s")??
                .map_err(anyhow::Error::from),
            None => Ok(()),
        }
    }
}

impl Drop for InProcessBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Reads the `LISTENING <address>` line a child broker prints on standard output once it has bound its port.
pub fn listening_address(child: &mut Child, name: &str) -> Result<SocketAddr> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let address = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| anyhow!("`{name}` said `{}` instead of its address", line.trim()))?
        .parse()?;
    Ok(address)
}

/// The broker as a child process, for kill -9.
pub struct BrokerProcess {
    pub address: SocketAddr,
    child: Child,
}

impl BrokerProcess {
    /// `executable` is `env!("CARGO_BIN_EXE_broker-under-test")`, which only integration tests can name.
    pub fn start(executable: &str, area: &Area, listen: SocketAddr) -> Result<Self> {
        Self::spawn(executable, area, listen, None)
    }

    /// Like [`BrokerProcess::start`], logging at debug level as JSON into `log`.
    pub fn start_logged(executable: &str, area: &Area, listen: SocketAddr, log: &Path) -> Result<Self> {
        Self::spawn(executable, area, listen, Some(log))
    }

    fn spawn(executable: &str, area: &Area, listen: SocketAddr, log: Option<&Path>) -> Result<Self> {
        let config = area.write_broker_config(listen)?;
        let mut command = Command::new(executable);
        command.arg(&config).stdout(Stdio::piped());
        match log {
            Some(log) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
                command.stderr(file).env("BROKER_TEST_LOG", "debug");
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        let mut child = command.spawn().context("could not start broker-under-test")?;
        let address = listening_address(&mut child, "broker-under-test")?;
        Ok(Self { address, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `within` for the process to exit by itself (without holding up the runtime's worker); its status
    /// if it did.
    pub async fn exited_within(&mut self, within: std::time::Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Limits the size any file the process writes may reach (`RLIMIT_FSIZE`, as `ulimit -f` would), so that its
    /// files cannot grow past `bytes`: what a full disk does to the files that still need room, without the root
    /// privileges a small filesystem needs.
    pub fn limit_file_size(&self, bytes: u64) -> Result<()> {
        use rustix::process::{Pid, Resource, Rlimit, getrlimit, prlimit};
        let pid = Pid::from_raw(self.child.id() as i32).ok_or_else(|| anyhow!("no such process"))?;
        // The hard limit stays as it is (this process's, which the child inherited).
        let maximum = getrlimit(Resource::Fsize).maximum;
        prlimit(Some(pid), Resource::Fsize, Rlimit { current: Some(bytes), maximum })?;
        Ok(())
    }

    /// SIGTERM, then waits for the process to exit (graceful shutdown).
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(self.child.wait()?)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an example message as an envelope.
pub fn example(name: &str) -> Result<pb::Envelope> {
    let bytes = std::fs::read(examples_dir().join(name)).with_context(|| format!("example `{name}`"))?;
    agent::read_envelope_json(&bytes).map_err(|error| anyhow!("{error}"))
}

/// The `.json` files in an inbox, read as deliveries.
pub fn inbox_deliveries(inbox: &Path) -> Result<Vec<serde_json::Value>> {
    let mut found = Vec::new();
    if !inbox.exists() {
        return Ok(found);
    }
    for entry in std::fs::read_dir(inbox)? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "json") {
            found.push(serde_json::from_slice(&std::fs::read(&path)?)?);
        }
    }
    Ok(found)
}

/// Waits until `condition` holds, checking every 20 ms, for at most `limit`.
pub async fn eventually<F: FnMut() -> bool>(limit: Duration, mut condition: F) -> bool {
    let start = tokio::time::Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The reason in a status's `google.rpc.ErrorInfo`, if any.
pub fn error_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_details_error_info().map(|info| info.reason)
}

/// The value of an unlabelled metric (a counter, gauge or histogram count) in a Prometheus text scrape.
pub fn metric_value(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
}
