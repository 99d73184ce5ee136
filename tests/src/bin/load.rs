//! The load generator: drives realistic messages through the whole path (mutual TLS, tokens, policy with field
//! minimisation, audit, durable storage, streamed delivery, the recipient's durable inbox write and acknowledgement)
//! and reports throughput, latency, the broker's CPU, memory and disk, as ratios to references measured in the same
//! run on the same machine: the disk's raw and group-commit fsync rates, and a bare tonic unary call over the same
//! mutual-TLS setup.
//!
//! Usage: `cargo run --release -p tests --bin load -- [--scenario NAME ...] [--messages M] [--in-flight K]
//! [--rate R] [--target ADDR --dev-dir DIR]`. Each scenario starts its own broker as a child process (this same
//! executable in `serve-broker` mode, so the CPU and RSS read from `/proc/<pid>` are the broker's alone) in a fresh
//! temporary area, unless `--target` names a running broker. The receiving side writes each delivery with the
//! agent's own `write_delivery_durably` (write, fsync, rename, fsync folder), timestamps the moment that write
//! completes, and only then acknowledges. Every loop is bounded in count and time; all traffic goes to 127.0.0.1.

use std::{
    collections::HashMap,
    io::Write as _,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use proto::pb::{self, broker_server::Broker};
use tests::{Area, BrokerSettings, metric_value};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

/// The scenarios, in the order they run when none is named.
const ALL_SCENARIOS: &[&str] = &[
    "one-in-flight",
    "sixty-four-in-flight",
    "fan-out-5",
    "open-loop",
    "offline-drain",
    "connections-1000",
    "restart",
];

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Load generator for the safeguarding broker: the whole path, with references measured in the same run"
)]
struct Args {
    /// Scenarios to run (repeat the flag); all when none is given.
    #[arg(long = "scenario", value_parser = clap::builder::PossibleValuesParser::new(ALL_SCENARIOS))]
    scenarios: Vec<String>,
    /// Messages per throughput scenario (one-in-flight uses a fifth of this).
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Sends in flight for the closed-loop scenarios that do not fix it (sixty-four-in-flight, fan-out-5).
    #[arg(long = "in-flight", default_value_t = 64)]
    in_flight: usize,
    /// Sends per second in the open-loop scenario.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds the open-loop scenario runs.
    #[arg(long = "open-loop-seconds", default_value_t = 10)]
    open_loop_seconds: u64,
    /// Messages queued for the offline agent in offline-drain.
    #[arg(long, default_value_t = 100_000)]
    queued: u64,
    /// Messages stored before the restart scenario restarts the broker.
    #[arg(long, default_value_t = 100_000)]
    stored: u64,
    /// Messages the restart scenario sends (64 in flight, to the same offline agency) while each restarted broker's
    /// stored queues load; their copies wait behind the whole stored queue.
    #[arg(long = "send-while-loading", default_value_t = 0)]
    send_while_loading: u64,
    /// Concurrent agent connections in connections-1000.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Deliveries one receiving agent writes and acknowledges concurrently (the real agent does one at a time).
    #[arg(long = "agent-concurrency", default_value_t = 64)]
    agent_concurrency: usize,
    /// TLS connections per sending agency.
    #[arg(long = "connections-per-sender", default_value_t = 4)]
    connections_per_sender: usize,
    /// A running broker to measure instead of starting one (its CPU and RSS are then read only with --target-pid).
    #[arg(long)]
    target: Option<SocketAddr>,
    /// With --target: the `.dev/` folder written by `broker serve --dev` (agent configs under `agents/`).
    #[arg(long = "dev-dir")]
    dev_dir: Option<PathBuf>,
    /// With --target: the broker's process id, to read its CPU and memory.
    #[arg(long = "target-pid")]
    target_pid: Option<u32>,
    /// With --target: the broker's data folder, for bytes on disk per message.
    #[arg(long = "target-data-dir")]
    target_data_dir: Option<PathBuf>,
    /// Seconds any one phase may take before it is abandoned.
    #[arg(long = "phase-timeout", default_value_t = 600)]
    phase_timeout: u64,
    /// Folder for the scenarios' data, inboxes and certificates (the brokers' data is removed at the end of the run,
    /// the inbox files are kept). Not the system's temporary folder by default: on ext4 without a journal, creating a
    /// file in a folder whose inode group saw many deletions in the last minutes scans the inode table
    /// (`find_inode_bit`/`recently_deleted`); in a busy /tmp that made each agent inbox write cost ~0.6 ms of CPU
    /// instead of ~0.04 ms, and the load generator measured /tmp's history. Use a fresh folder per run to be sure.
    #[arg(long = "work-dir", default_value = "target/load")]
    work_dir: PathBuf,
    /// Folder for the receiving agents' inboxes instead of each scenario's folder: another disk, to measure the
    /// broker without the receivers' `fsync`s on its disk (as when agents run on their own machines). On a tmpfs
    /// (`/dev/shm/...`) the receivers' writes are not durable, so end-to-end figures are then not the target's.
    #[arg(long = "inbox-dir")]
    inbox_dir: Option<PathBuf>,
    /// Appends one CSV line per copy written in the throughput scenarios (scenario, seconds from the phase's start
    /// to the send's due time, then end-to-end, send due -> received by the agent, and received -> durable write, in
    /// microseconds), to see when slow copies happened.
    #[arg(long = "latency-log")]
    latency_log: Option<PathBuf>,
    /// The brokers' `storage.journal_segment_bytes` (the broker's default when not given).
    #[arg(long = "journal-segment-bytes")]
    journal_segment_bytes: Option<u64>,
    /// The brokers' `storage.index_cache_bytes`, sled's cache (the broker's default when not given).
    #[arg(long = "index-cache-bytes")]
    index_cache_bytes: Option<u64>,
}

impl Args {
    fn storage_settings(&self) -> StorageSettings {
        StorageSettings { journal_segment_bytes: self.journal_segment_bytes, index_cache_bytes: self.index_cache_bytes }
    }

    /// Where a scenario's receiving agents write their inboxes.
    fn inbox_root(&self, subject: &Subject) -> PathBuf {
        match &self.inbox_dir {
            Some(dir) => dir.join(subject.area.path().file_name().unwrap_or_default()),
            None => subject.area.path().join("inbox"),
        }
    }
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().collect();
    let result = match arguments.get(1).map(String::as_str) {
        Some("serve-broker") => serve(arguments.get(2), false),
        Some("serve-bare") => serve(arguments.get(2), true),
        _ => run_load(Args::parse()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Child processes: the broker under test and the bare reference server.

/// Serves the real broker (or the bare reference service) on the configured address; prints `LISTENING <addr>`.
fn serve(config_path: Option<&String>, bare: bool) -> Result<()> {
    let path = config_path.context("usage: load serve-broker|serve-bare CONFIG.toml")?;
    // Warnings only, unless RUST_LOG asks for more (`RUST_LOG=broker=info` shows how long each start-up step took).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    broker::init_logging(false, filter);
    let config = broker::config::Config::load(Path::new(path), |_| None).map_err(|errors| anyhow!("{errors}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        println!("LISTENING {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let signal = async {
            let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        if bare {
            let tls = broker::transport::server_tls(&config.tls)?;
            tonic::transport::Server::builder()
                .tls_config(tls)?
                .add_service(pb::broker_server::BrokerServer::new(BareBroker))
                .serve_with_incoming_shutdown(
                    // TCP_NODELAY as tonic's own `serve` sets it (an incoming built from a listener leaves it off).
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                    signal,
                )
                .await?;
            Ok(())
        } else {
            broker::run(config, listener, signal).await.map_err(anyhow::Error::from)
        }
    })
}

/// The reference: the same service definition and TLS setup, answering at once without any work.
struct BareBroker;

#[tonic::async_trait]
impl Broker for BareBroker {
    async fn send(&self, request: Request<pb::SendRequest>) -> Result<Response<pb::SendResponse>, Status> {
        let recipients = request
            .into_inner()
            .envelope
            .map(|envelope| envelope.recipients)
            .unwrap_or_default()
            .into_iter()
            .map(|recipient| pb::RecipientReceipt {
                recipient,
                outcome: pb::RecipientOutcome::Accepted as i32,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::SendResponse { message_id: "bare".to_owned(), recipients, ..Default::default() }))
    }

    type DeliveriesStream = tokio_stream::Empty<Result<pb::Delivery, Status>>;

    async fn deliveries(&self, _: Request<pb::DeliveriesRequest>) -> Result<Response<Self::DeliveriesStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }

    async fn acknowledge(
        &self,
        _: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        Ok(Response::new(pb::AcknowledgeResponse {}))
    }

    async fn negative_acknowledge(
        &self,
        _: Request<pb::NegativeAcknowledgeRequest>,
    ) -> Result<Response<pb::NegativeAcknowledgeResponse>, Status> {
        Ok(Response::new(pb::NegativeAcknowledgeResponse::default()))
    }

    async fn track(&self, _: Request<pb::TrackRequest>) -> Result<Response<pb::TrackResponse>, Status> {
        Ok(Response::new(pb::TrackResponse::default()))
    }
}

/// A child process serving on 127.0.0.1 (the broker or the bare reference).
struct Server {
    address: SocketAddr,
    child: Option<Child>,
    pid: Option<u32>,
    data_dir: Option<PathBuf>,
    /// Whether it runs under `LOAD_BROKER_WRAPPER`.
    wrapped: bool,
}

impl Server {
    /// Starts `load <mode> <config>`. With `LOAD_BROKER_WRAPPER` set (for example
    /// `LOAD_BROKER_WRAPPER="valgrind --tool=massif --massif-out-file=/tmp/massif.%p"`), the broker under test (not
    /// the bare reference) runs under that command, to profile it; its CPU and RSS figures are then the wrapper's.
    fn spawn(mode: &str, config: &Path, data_dir: Option<PathBuf>) -> Result<Self> {
        let executable = std::env::current_exe()?;
        let wrapper: Vec<String> = match std::env::var("LOAD_BROKER_WRAPPER") {
            Ok(wrapper) if mode == "serve-broker" => wrapper.split_whitespace().map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(executable);
                command
            }
            None => Command::new(executable),
        };
        let mut child = command
            .arg(mode)
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("could not start `{mode}`"))?;
        let address = tests::listening_address(&mut child, mode)?;
        let pid = Some(child.id());
        Ok(Self { address, child: Some(child), pid, data_dir, wrapped: !wrapper.is_empty() })
    }

    fn stats(&self) -> Option<ProcessStats> {
        self.pid.and_then(process_stats)
    }

    /// SIGTERM and wait (graceful), or SIGKILL.
    fn stop(&mut self, graceful: bool) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if graceful {
                let status = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
                if !status.success() {
                    bail!("could not signal the broker");
                }
                let deadline = Instant::now() + Duration::from_secs(60);
                while child.try_wait()?.is_none() {
                    if Instant::now() > deadline {
                        child.kill()?;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            } else {
                child.kill()?;
            }
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A wrapper (a profiler) killed outright writes nothing and leaves the broker running on its own: SIGTERM
        // reaches the broker through it (valgrind runs in the broker's process; `perf record` passes it on), and the
        // wrapper writes its output as the broker exits.
        if self.wrapped {
            let _ = self.stop(true);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Measurements of a process and a folder.

#[derive(Clone, Copy, Debug, Default)]
struct ProcessStats {
    cpu_seconds: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

fn process_stats(pid: u32) -> Option<ProcessStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after its closing parenthesis are fixed.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / clock_ticks_per_second(),
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}

/// What a broker's data directory takes on disk, in bytes.
struct DiskUse {
    total: u64,
    /// Journal segments' zeros written ahead of use.
    zeros: u64,
    /// sled's index (`index/`; its log, which it replays on its first open after a long run).
    index: u64,
}

impl DiskUse {
    fn describe(&self) -> String {
        format!(
            "{:.1} MiB, of which {:.1} MiB journal segments' zeros written ahead of use and {:.1} MiB sled's index",
            self.total as f64 / 1048576.0,
            self.zeros as f64 / 1048576.0,
            self.index as f64 / 1048576.0
        )
    }
}

/// Bytes of the journal's segments that are zeros written ahead of use (the broker fills each segment before it
/// writes records into it; see `broker::store::journal`): reported apart, since they are a fixed amount (up to two
/// segments), not a cost per message.
fn zeros_ahead(data_dir: &Path) -> u64 {
    let mut total = 0;
    let segments = broker::store::journal::segment_files(data_dir).unwrap_or_default();
    for (_, path) in segments.iter().filter(|(_, path)| path.extension().is_some_and(|extension| extension == "seg")) {
        let (Ok(metadata), Ok(records)) = (std::fs::metadata(path), broker::store::journal::whole_records_len(path))
        else {
            continue;
        };
        total += (metadata.blocks() * 512).saturating_sub(records);
    }
    if let Ok(metadata) = std::fs::metadata(data_dir.join(broker::store::journal::DIR).join("next.ready")) {
        total += metadata.blocks() * 512;
    }
    total
}

/// Bytes allocated on disk under `dir` (what `du` counts).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    let mut visited = 0;
    while let Some(folder) = pending.pop() {
        visited += 1;
        if visited > 100_000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.blocks() * 512;
            }
        }
    }
    total
}

/// Latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Percentiles {
    count: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn percentiles(mut samples: Vec<u64>) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    samples.sort_unstable();
    let at = |quantile: f64| {
        let index = ((samples.len() as f64) * quantile).ceil() as usize;
        samples[index.saturating_sub(1).min(samples.len() - 1)]
    };
    Percentiles { count: samples.len(), p50: at(0.50), p99: at(0.99), p999: at(0.999), max: samples[samples.len() - 1] }
}

fn millis(micros: u64) -> String {
    format!("{:.3} ms", micros as f64 / 1000.0)
}

fn describe(name: &str, latency: &Percentiles) -> String {
    format!(
        "{name}: n={} p50={} p99={} p99.9={} max={}",
        latency.count,
        millis(latency.p50),
        millis(latency.p99),
        millis(latency.p999),
        millis(latency.max)
    )
}

// ---------------------------------------------------------------------------------------------------------------
// References: the disk and a bare mutual-TLS unary call.

#[derive(Clone, Copy, Debug, Default)]
struct References {
    fsyncs_per_second: f64,
    group_records_per_second: f64,
    bare_one_per_second: f64,
    bare_one_latency: Percentiles,
    bare_sixty_four_per_second: f64,
}

/// fdatasync rate with 1 KiB records, `per_sync` records per sync, for at most `limit` or `syncs` syncs.
fn fsync_rate(dir: &Path, per_sync: usize, syncs: usize, limit: Duration) -> Result<f64> {
    let path = dir.join(format!("fsync-reference-{per_sync}.bin"));
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&path)?;
    let record = vec![0x5au8; 1024];
    let start = Instant::now();
    let mut records = 0u64;
    for _ in 0..syncs {
        for _ in 0..per_sync {
            file.write_all(&record)?;
            records += 1;
        }
        file.sync_data()?;
        if start.elapsed() > limit {
            break;
        }
    }
    let rate = records as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

async fn measure_references(args: &Args, area: &Area, workload: &Workload) -> Result<References> {
    println!("== references (same machine, same run)");
    let dir = area.path().to_path_buf();
    let fsyncs_per_second = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || fsync_rate(&dir, 1, 20_000, Duration::from_secs(3))
    })
    .await??;
    let group_records_per_second =
        tokio::task::spawn_blocking(move || fsync_rate(&dir, 64, 5_000, Duration::from_secs(3))).await??;
    println!("disk: {fsyncs_per_second:.0} fsyncs/s (1 KiB, 1 per fdatasync)");
    println!("disk: {group_records_per_second:.0} records/s (1 KiB, 64 per fdatasync)");

    let config = write_config(area, "127.0.0.1:0".parse()?, &tests::sample_policy_dir(), &StorageSettings::default())?;
    let bare = Server::spawn("serve-bare", &config, None)?;
    let senders = Senders::connect(area, bare.address, workload, args.connections_per_sender, None).await?;
    let one = closed_loop(&senders, workload, (args.messages / 5).max(100), 1, args.phase_timeout).await?;
    let sixty_four = closed_loop(&senders, workload, args.messages, 64, args.phase_timeout).await?;
    let references = References {
        fsyncs_per_second,
        group_records_per_second,
        bare_one_per_second: one.rate(),
        bare_one_latency: percentiles(one.latencies.clone()),
        bare_sixty_four_per_second: sixty_four.rate(),
    };
    println!(
        "bare tonic mTLS unary (same envelopes), 1 in flight: {:.0}/s; {}",
        one.rate(),
        describe("latency", &references.bare_one_latency)
    );
    println!(
        "bare tonic mTLS unary (same envelopes), 64 in flight: {:.0}/s; {}",
        sixty_four.rate(),
        describe("latency", &percentiles(sixty_four.latencies.clone()))
    );
    Ok(references)
}

// ---------------------------------------------------------------------------------------------------------------
// The area and the broker's configuration.

/// The brokers' `[storage]` settings the load generator's options give (the broker's defaults where not given).
#[derive(Debug, Default, Clone, Copy)]
struct StorageSettings {
    journal_segment_bytes: Option<u64>,
    index_cache_bytes: Option<u64>,
}

/// Writes a broker configuration for `listen` using the policy folder `policy_dir` and returns its path.
fn write_config(area: &Area, listen: SocketAddr, policy_dir: &Path, storage: &StorageSettings) -> Result<PathBuf> {
    let settings = &area.settings;
    let mut issuers = String::new();
    for (agency, _) in &area.agencies {
        let (issuer, public) = broker::dev::dev_issuer(area.path(), agency)?;
        issuers.push_str(&format!(
            "[[tokens.issuers]]\nagency = \"{agency}\"\nissuer = \"{}\"\nalgorithms = [\"EdDSA\"]\npublic_keys = [{{ kid = \"{}\", pem = \"{}\" }}]\n",
            issuer.issuer,
            issuer.kid,
            public.display()
        ));
    }
    let metrics =
        settings.metrics_listen.map(|address| format!("metrics_listen = \"{address}\"\n")).unwrap_or_default();
    let text = format!(
        "listen = \"{listen}\"\n{metrics}data_dir = \"data\"\npolicy_dir = \"{policy}\"\n[tls]\nca_cert = \"pki/ca.pem\"\ncert = \"pki/server.pem\"\nkey = \"pki/server.key\"\n[limits]\nmax_message_bytes = {max}\n[delivery]\nack_wait_seconds = {ack}\nmax_attempts = {attempts}\ndefault_retry_delay_millis = {retry}\n{issuers}",
        policy = policy_dir.display(),
        max = settings.max_message_bytes,
        ack = settings.ack_wait_seconds,
        attempts = settings.max_attempts,
        retry = settings.default_retry_delay_millis,
    );
    let mut text = text + "[storage]\n";
    if let Some(bytes) = storage.journal_segment_bytes {
        text.push_str(&format!("journal_segment_bytes = {bytes}\n"));
    }
    if let Some(bytes) = storage.index_cache_bytes {
        text.push_str(&format!("index_cache_bytes = {bytes}\n"));
    }
    let path = area.path().join("broker.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Copies the sample policy folder into the area and adds `count` synthetic agencies to its registry (for the
/// connection scenario: a delivery stream per agency). Returns the folder and the new agency ids.
fn policy_with_extra_agencies(area: &Area, count: usize) -> Result<(PathBuf, Vec<String>)> {
    let source = tests::sample_policy_dir();
    let target = area.path().join("policies");
    copy_folder(&source, &target, 0)?;
    let registry_path = target.join("registry.yaml");
    let registry = std::fs::read_to_string(&registry_path)?;
    let mut extra = String::from("agencies:\n");
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        let id = format!("load-hub-{index:05}");
        extra.push_str(&format!("  - id: {id}\n    name: Load test family hub {index}\n    kind: family-hub\n"));
        ids.push(id);
    }
    let Some(position) = registry.find("\nagencies:\n") else { bail!("the sample registry has no `agencies:` list") };
    let updated = format!("{}\n{}{}", &registry[..position], extra, &registry[position + "\nagencies:\n".len()..]);
    std::fs::write(&registry_path, updated)?;
    Ok((target, ids))
}

fn copy_folder(source: &Path, target: &Path, depth: usize) -> Result<()> {
    if depth > 8 {
        bail!("policy folder too deep");
    }
    std::fs::create_dir_all(target)?;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            copy_folder(&path, &target.join(entry.file_name()), depth + 1)?;
        } else {
            std::fs::copy(&path, target.join(entry.file_name()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Clients: from the area (local broker) or from a `.dev/` folder (--target).

#[derive(Clone)]
enum Credentials<'a> {
    Area(&'a Area),
    DevDir(&'a Path),
}

async fn connect_client(
    credentials: &Credentials<'_>,
    agency: &str,
    address: SocketAddr,
) -> Result<agent::BrokerClient> {
    let config = agent_config(credentials, agency, address)?;
    agent::connect(&config).await.map_err(|error| anyhow!("{error}"))
}

fn agent_config(credentials: &Credentials<'_>, agency: &str, address: SocketAddr) -> Result<agent::AgentConfig> {
    match credentials {
        Credentials::Area(area) => area.agent_config(agency, address),
        Credentials::DevDir(dir) => {
            let mut config = agent::AgentConfig::load(dir.join("agents").join(format!("{agency}.toml")))
                .map_err(|error| anyhow!("{error}"))?;
            config.broker_url = format!("https://{address}");
            Ok(config)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The workload: realistic envelopes from examples/, each with its sender.

struct Workload {
    /// (sending agency, envelope template); message `i` uses template `i % len`.
    templates: Vec<(String, pb::Envelope)>,
    run: String,
}

impl Workload {
    fn new(templates: Vec<(String, pb::Envelope)>) -> Self {
        let run = format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        );
        Self { templates, run }
    }

    fn envelope(&self, index: u64) -> (&str, pb::Envelope) {
        let (sender, template) = &self.templates[(index % self.templates.len() as u64) as usize];
        let mut envelope = template.clone();
        envelope.idempotency_key = format!("load-{}-{index}", self.run);
        (sender, envelope)
    }

    fn senders(&self) -> Vec<String> {
        let mut senders: Vec<String> = self.templates.iter().map(|(sender, _)| sender.clone()).collect();
        senders.sort();
        senders.dedup();
        senders
    }

    fn recipients(&self) -> Vec<String> {
        let mut recipients: Vec<String> =
            self.templates.iter().flat_map(|(_, envelope)| envelope.recipients.clone()).collect();
        recipients.sort();
        recipients.dedup();
        recipients
    }
}

fn example(name: &str) -> Result<pb::Envelope> {
    tests::example(name)
}

/// F1, F3, F4 and F8 (two recipients) in turn: the sample flows' mix.
fn mixed_workload() -> Result<Workload> {
    Ok(Workload::new(vec![
        ("beds-police".to_owned(), example("operation-encompass-notification.json")?),
        ("luton-oakwood-primary".to_owned(), example("school-referral-to-front-door.json")?),
        ("luton-csc".to_owned(), example("referral-outcome-feedback.json")?),
        ("luton-csc".to_owned(), example("child-protection-plan-notification.json")?),
    ]))
}

/// F1 only: police to one school.
fn encompass_workload() -> Result<Workload> {
    Ok(Workload::new(vec![("beds-police".to_owned(), example("operation-encompass-notification.json")?)]))
}

/// F8 to five recipients: acute care, GP, health visiting and two schools.
fn fan_out_workload() -> Result<Workload> {
    let mut envelope = example("child-protection-plan-notification.json")?;
    envelope.recipients = [
        "ldh-hospital",
        "luton-bury-park-gp",
        "luton-health-visiting",
        "luton-oakwood-primary",
        "luton-lea-manor-high",
    ]
    .iter()
    .map(|id| (*id).to_owned())
    .collect();
    Ok(Workload::new(vec![("luton-csc".to_owned(), envelope)]))
}

// ---------------------------------------------------------------------------------------------------------------
// Sending: closed loop at K in flight, open loop at a fixed rate.

struct Senders {
    by_agency: HashMap<String, Vec<agent::BrokerClient>>,
}

impl Senders {
    async fn connect(
        area: &Area,
        address: SocketAddr,
        workload: &Workload,
        connections: usize,
        dev_dir: Option<&Path>,
    ) -> Result<Self> {
        let credentials = match dev_dir {
            Some(dir) => Credentials::DevDir(dir),
            None => Credentials::Area(area),
        };
        let mut by_agency = HashMap::new();
        for agency in workload.senders() {
            let mut clients = Vec::new();
            for _ in 0..connections.max(1) {
                clients.push(connect_client(&credentials, &agency, address).await?);
            }
            by_agency.insert(agency, clients);
        }
        Ok(Self { by_agency })
    }

    fn client(&self, agency: &str, index: u64) -> Result<agent::BrokerClient> {
        let clients = self.by_agency.get(agency).ok_or_else(|| anyhow!("no client for `{agency}`"))?;
        Ok(clients[(index % clients.len() as u64) as usize].clone())
    }
}

#[derive(Default)]
struct SendResults {
    /// Send-acknowledged latency, microseconds (from the scheduled time in open loop).
    latencies: Vec<u64>,
    /// Message id and the time its send was due, for end-to-end latency.
    sent_at: Vec<(String, Instant)>,
    accepted_copies: u64,
    refused_copies: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Open loop only: how late each send started after its due time (microseconds), the load generator's own delay.
    lateness: Vec<u64>,
}

impl SendResults {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// `<n> <what> in <s> s (<rate>/s), <errors> errors`, with the first problem if there was one.
    fn summary(&self, what: &str) -> String {
        format!(
            "{} {what} in {:.2} s ({:.0}/s), {} errors{}",
            self.latencies.len(),
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.errors,
            self.first_error.as_ref().map(|error| format!(" (first problem: {error})")).unwrap_or_default()
        )
    }

    fn merge(&mut self, other: SendResults) {
        self.latencies.extend(other.latencies);
        self.sent_at.extend(other.sent_at);
        self.accepted_copies += other.accepted_copies;
        self.refused_copies += other.refused_copies;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn record(&mut self, due: Instant, outcome: Result<Response<pb::SendResponse>, Status>) {
        match outcome {
            Ok(response) => {
                self.latencies.push(due.elapsed().as_micros() as u64);
                let receipt = response.into_inner();
                for recipient in &receipt.recipients {
                    if recipient.outcome == pb::RecipientOutcome::Accepted as i32 {
                        self.accepted_copies += 1;
                    } else {
                        self.refused_copies += 1;
                        if self.first_error.is_none() {
                            self.first_error =
                                Some(format!("`{}` refused: {}", recipient.recipient, recipient.reason_code));
                        }
                    }
                }
                self.sent_at.push((receipt.message_id, due));
            }
            Err(status) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{:?}: {}", status.code(), status.message()));
                }
            }
        }
    }
}

async fn closed_loop(
    senders: &Senders,
    workload: &Workload,
    messages: u64,
    in_flight: usize,
    timeout: u64,
) -> Result<SendResults> {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..in_flight.max(1) {
        let next = next.clone();
        let templates: Vec<(String, pb::Envelope)> = workload.templates.clone();
        let run = workload.run.clone();
        let clients = senders.by_agency.clone();
        workers.push(tokio::spawn(async move {
            let local = Workload { templates, run };
            let senders = Senders { by_agency: clients };
            let mut results = SendResults::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= messages || Instant::now() > deadline {
                    break;
                }
                let (sender, envelope) = local.envelope(index);
                let mut client = senders.client(sender, index)?;
                let due = Instant::now();
                let outcome = client.send(pb::SendRequest { envelope: Some(envelope) }).await;
                results.record(due, outcome);
            }
            Ok::<_, anyhow::Error>(results)
        }));
    }
    let mut total = SendResults::default();
    for worker in workers {
        total.merge(worker.await??);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn open_loop(
    senders: &Senders,
    workload: &Workload,
    rate: u64,
    messages: u64,
    timeout: u64,
) -> Result<SendResults> {
    let results = Arc::new(Mutex::new(SendResults::default()));
    let outstanding = Arc::new(Semaphore::new(20_000));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(timeout);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    // A thread of its own keeps the schedule and starts each send on the runtime: tokio's timer fires on whole
    // milliseconds, so sends scheduled with it started 0.6 ms late at the median and 1.1 ms at p99 (measured), and
    // that delay counted in every latency as though it were the broker's. The delay left is reported.
    let runtime = tokio::runtime::Handle::current();
    let senders = Senders { by_agency: senders.by_agency.clone() };
    let workload = Workload { templates: workload.templates.clone(), run: workload.run.clone() };
    let schedule = results.clone();
    let scheduler = std::thread::Builder::new().name("open-loop-schedule".to_owned()).spawn(move || {
        let mut tasks = Vec::new();
        for index in 0..messages {
            let due = start + interval.mul_f64(index as f64);
            if due > deadline {
                break;
            }
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let (sender, envelope) = workload.envelope(index);
            let mut client = senders.client(sender, index)?;
            let (results, outstanding) = (schedule.clone(), outstanding.clone());
            tasks.push(runtime.spawn(async move {
                let late = due.elapsed().as_micros() as u64;
                let Ok(permit) = outstanding.acquire_owned().await else { return };
                let outcome = client.send(pb::SendRequest { envelope: Some(envelope) }).await;
                if let Ok(mut results) = results.lock() {
                    results.record(due, outcome);
                    results.lateness.push(late);
                }
                drop(permit);
            }));
        }
        Ok::<_, anyhow::Error>(tasks)
    })?;
    let tasks = tokio::task::spawn_blocking(move || scheduler.join())
        .await?
        .map_err(|_| anyhow!("the open-loop scheduler panicked"))??;
    for task in tasks {
        task.await?;
    }
    let mut total = std::mem::take(&mut *results.lock().map_err(|_| anyhow!("poisoned"))?);
    total.elapsed = start.elapsed();
    Ok(total)
}

// ---------------------------------------------------------------------------------------------------------------
// Receiving: agents that write each delivery durably, timestamp it, and acknowledge.

struct Receivers {
    written: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<Written>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Receivers {
    async fn start(
        credentials: &Credentials<'_>,
        address: SocketAddr,
        agencies: &[String],
        inbox_root: &Path,
        concurrency: usize,
    ) -> Result<Self> {
        let written = Arc::new(AtomicU64::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for agency in agencies {
            let client = connect_client(credentials, agency, address).await?;
            let inbox = inbox_root.join(agency);
            std::fs::create_dir_all(&inbox)?;
            tasks.push(tokio::spawn(receive(client, inbox, concurrency, written.clone(), times.clone(), stop.clone())));
        }
        Ok(Self { written, times, stop, tasks })
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Waits until `expected` deliveries are written or `limit` passes; returns whether they were.
    async fn wait_for(&self, expected: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.written() < expected {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn stop(self) -> Vec<Written> {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        self.times.lock().map(|mut times| std::mem::take(&mut *times)).unwrap_or_default()
    }
}

async fn receive(
    client: agent::BrokerClient,
    inbox: PathBuf,
    concurrency: usize,
    written: Arc<AtomicU64>,
    times: Arc<Mutex<Vec<Written>>>,
    stop: Arc<AtomicBool>,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    // Bounded: reconnects at most this many times.
    for _ in 0..1000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(response) = client.clone().deliveries(pb::DeliveriesRequest {}).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(delivery)) = stream.message().await {
            let received = Instant::now();
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let inbox = inbox.clone();
            let mut client = client.clone();
            let written = written.clone();
            let times = times.clone();
            tokio::spawn(async move {
                let delivery_id = delivery.delivery_id.clone();
                let outcome =
                    tokio::task::spawn_blocking(move || agent::write_delivery_durably(&inbox, &delivery)).await;
                if let Ok(Ok(outcome)) = outcome {
                    if outcome == agent::WriteOutcome::Written {
                        let at = Instant::now();
                        written.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut times) = times.lock() {
                            times.push(Written { delivery_id: delivery_id.clone(), received, written: at });
                        }
                    }
                    let _ = client.acknowledge(pb::AcknowledgeRequest { delivery_id }).await;
                }
                drop(permit);
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One copy a receiving agent wrote durably: when its stream yielded it, and when the write completed.
struct Written {
    delivery_id: String,
    received: Instant,
    written: Instant,
}

/// End-to-end latencies (microseconds), from each message's due send time to each recipient's durable write, and
/// the two parts of each: until the copy reached the receiving agent (the broker's part, with the network), and from
/// there to the durable write (the agent's part).
struct EndToEnd {
    due: Vec<Instant>,
    whole: Vec<u64>,
    to_agent: Vec<u64>,
    writing: Vec<u64>,
}

fn write_latency_log(path: &Path, scenario: &str, start: Instant, parts: &EndToEnd) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?);
    for (index, due) in parts.due.iter().enumerate() {
        writeln!(
            out,
            "{scenario},{:.6},{},{},{}",
            due.saturating_duration_since(start).as_secs_f64(),
            parts.whole[index],
            parts.to_agent[index],
            parts.writing[index]
        )?;
    }
    out.flush()?;
    Ok(())
}

fn end_to_end(sent_at: &[(String, Instant)], written: &[Written]) -> EndToEnd {
    let due: HashMap<&str, Instant> = sent_at.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    let micros = |from: Instant, to: Instant| to.saturating_duration_since(from).as_micros() as u64;
    let mut parts = EndToEnd { due: Vec::new(), whole: Vec::new(), to_agent: Vec::new(), writing: Vec::new() };
    for copy in written {
        let Some((message_id, _)) = copy.delivery_id.split_once('.') else { continue };
        let Some(sent) = due.get(message_id) else { continue };
        parts.due.push(*sent);
        parts.whole.push(micros(*sent, copy.written));
        parts.to_agent.push(micros(*sent, copy.received));
        parts.writing.push(micros(copy.received, copy.written));
    }
    parts
}

// ---------------------------------------------------------------------------------------------------------------
// Scenarios.

struct RunContext<'a> {
    args: &'a Args,
    references: References,
}

/// A broker for one scenario: a child process in a fresh area, or the --target.
struct Subject {
    area: Area,
    server: Option<Server>,
    address: SocketAddr,
    pid: Option<u32>,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
}

impl Subject {
    fn start(args: &Args, extra_agencies: usize) -> Result<(Self, Vec<String>)> {
        // Metrics on a free port, so scenarios can read the broker's own gauges (queues still loading after a restart).
        let metrics_listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let settings = BrokerSettings { metrics_listen: Some(metrics_listen), ..BrokerSettings::default() };
        let mut area = Area::with_settings_in(&args.work_dir, settings)?;
        retire_at_exit(&mut area);
        if let Some(target) = args.target {
            return Ok((
                Self {
                    area,
                    server: None,
                    address: target,
                    pid: args.target_pid,
                    data_dir: args.target_data_dir.clone(),
                    config: None,
                },
                Vec::new(),
            ));
        }
        let (policy_dir, extra) = if extra_agencies > 0 {
            policy_with_extra_agencies(&area, extra_agencies)?
        } else {
            (tests::sample_policy_dir(), Vec::new())
        };
        for id in &extra {
            area.agencies.push((id.clone(), "practitioner".to_owned()));
        }
        let config = write_config(&area, "127.0.0.1:0".parse()?, &policy_dir, &args.storage_settings())?;
        let server = Server::spawn("serve-broker", &config, Some(area.data_dir()))?;
        let address = server.address;
        let pid = server.pid;
        let data_dir = server.data_dir.clone();
        Ok((Self { area, server: Some(server), address, pid, data_dir, config: Some(config) }, extra))
    }

    fn credentials<'a>(&'a self, args: &'a Args) -> Credentials<'a> {
        match (&args.target, &args.dev_dir) {
            (Some(_), Some(dir)) => Credentials::DevDir(dir),
            _ => Credentials::Area(&self.area),
        }
    }

    fn stats(&self) -> Option<ProcessStats> {
        self.server.as_ref().and_then(Server::stats).or_else(|| self.pid.and_then(process_stats))
    }

    /// What the data directory takes on disk.
    fn disk(&self) -> Option<DiskUse> {
        self.data_dir.as_deref().map(|dir| DiskUse {
            total: disk_usage(dir),
            zeros: zeros_ahead(dir),
            index: disk_usage(&dir.join("index")),
        })
    }

    /// Stops the broker (gracefully or with SIGKILL) and starts it again on the same port and data.
    fn restart(&mut self, graceful: bool) -> Result<Instant> {
        let config = self.config.clone().context("cannot restart a --target broker")?;
        if let Some(server) = self.server.as_mut() {
            server.stop(graceful)?;
        }
        // The same port, so clients' addresses stay right.
        let config_text = std::fs::read_to_string(&config)?.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", self.address),
            1,
        );
        std::fs::write(&config, config_text)?;
        let started = Instant::now();
        let server = Server::spawn("serve-broker", &config, self.data_dir.clone())?;
        self.pid = server.pid;
        self.server = Some(server);
        Ok(started)
    }
}

/// The load generator's own CPU (senders and receiving agents, on the same machine as the broker), so that a
/// reader can see how much of the machine was left for the broker.
/// `broker_cpu`: the broker's CPU seconds over the same interval, as [`report_costs`] returned them.
fn report_load_generator_cost(before: Option<ProcessStats>, broker_cpu: f64, messages: u64, elapsed: Duration) {
    let (Some(before), Some(after)) = (before, process_stats(std::process::id())) else { return };
    let cpu = after.cpu_seconds - before.cpu_seconds;
    let wall = elapsed.as_secs_f64().max(1e-9);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!(
        "load generator CPU (senders and receiving agents): {cpu:.2} s ({:.0}% of one core); {:.1} µs CPU per message; machine busy with broker + load generator: {:.0}% of {cores:.0} cores",
        100.0 * cpu / wall,
        1e6 * cpu / messages.max(1) as f64,
        100.0 * (cpu + broker_cpu) / wall / cores,
    );
}

/// Prints the broker's CPU, memory and disk per message; returns its CPU seconds since `before` (0 if unknown).
fn report_costs(subject: &Subject, before: Option<ProcessStats>, messages: u64, copies: u64, elapsed: Duration) -> f64 {
    let mut broker_cpu = 0.0;
    if let (Some(before), Some(after)) = (before, subject.stats()) {
        let cpu = after.cpu_seconds - before.cpu_seconds;
        broker_cpu = cpu;
        println!(
            "broker CPU: {cpu:.2} s over {:.2} s wall ({:.0}% of one core); {:.1} µs CPU per message; peak RSS (VmHWM) {:.1} MiB; RSS now {:.1} MiB",
            elapsed.as_secs_f64(),
            100.0 * cpu / elapsed.as_secs_f64().max(1e-9),
            1e6 * cpu / messages.max(1) as f64,
            after.hwm_kib as f64 / 1024.0,
            after.rss_kib as f64 / 1024.0,
        );
    }
    if let Some(disk) = subject.disk() {
        let bytes = disk.total.saturating_sub(disk.zeros);
        println!(
            "data dir: {}; without the zeros {:.0} bytes per message, {:.0} bytes per copy (sled's {:.0} per message)",
            disk.describe(),
            bytes as f64 / messages.max(1) as f64,
            bytes as f64 / copies.max(1) as f64,
            disk.index as f64 / messages.max(1) as f64
        );
    }
    broker_cpu
}

/// Closed or open loop through the full path with receiving agents; prints everything.
async fn throughput_scenario(
    context: &RunContext<'_>,
    name: &str,
    workload: Workload,
    messages: u64,
    pacing: Pacing,
) -> Result<()> {
    let args = context.args;
    println!(
        "== {name}: {messages} messages, {pacing:?}, {} templates, agent concurrency {}",
        workload.templates.len(),
        args.agent_concurrency
    );
    let (subject, _) = Subject::start(args, 0)?;
    eprintln!("[{name}] broker started at {}", subject.address);
    let credentials = subject.credentials(args);
    let receivers = Receivers::start(
        &credentials,
        subject.address,
        &workload.recipients(),
        &args.inbox_root(&subject),
        args.agent_concurrency,
    )
    .await?;
    let dev_dir = match credentials {
        Credentials::DevDir(dir) => Some(dir),
        Credentials::Area(_) => None,
    };
    let senders =
        Senders::connect(&subject.area, subject.address, &workload, args.connections_per_sender, dev_dir).await?;
    eprintln!("[{name}] receivers and senders connected");
    // Warm up: connections, TLS sessions, the broker's actors.
    let warm_workload = Workload { templates: workload.templates.clone(), run: format!("{}-warm", workload.run) };
    let warm = closed_loop(&senders, &warm_workload, 50, 4, 30).await?;
    eprintln!("[{name}] warm-up: {} sent, {} errors {:?}", warm.latencies.len(), warm.errors, warm.first_error);
    let warm_copies = 50 * workload.templates.iter().map(|(_, e)| e.recipients.len() as u64).sum::<u64>()
        / workload.templates.len() as u64;
    receivers.wait_for(warm_copies, Duration::from_secs(30)).await;
    eprintln!("[{name}] warm-up deliveries written: {}", receivers.written());
    let base = receivers.written();
    let metrics_before = scrape_metrics(&subject).await;
    let before = subject.stats();
    let load_before = process_stats(std::process::id());
    let start = Instant::now();
    let results = match pacing {
        Pacing::Closed(in_flight) => closed_loop(&senders, &workload, messages, in_flight, args.phase_timeout).await?,
        Pacing::Open(rate) => open_loop(&senders, &workload, rate, messages, args.phase_timeout).await?,
    };
    let all_delivered =
        receivers.wait_for(base + results.accepted_copies, Duration::from_secs(args.phase_timeout)).await;
    let end_to_end_elapsed = start.elapsed();
    let delivered = receivers.written() - base;
    let metrics_after = scrape_metrics(&subject).await;
    let written = receivers.stop();
    let send = percentiles(results.latencies.clone());
    let parts = end_to_end(&results.sent_at, &written);
    if let Some(path) = &args.latency_log {
        write_latency_log(path, name, start, &parts)?;
    }
    let e2e = percentiles(parts.whole);
    println!(
        "sends: {} ok, {} errors, {} copies accepted, {} refused{}",
        results.latencies.len(),
        results.errors,
        results.accepted_copies,
        results.refused_copies,
        results.first_error.as_ref().map(|error| format!(" (first problem: {error})")).unwrap_or_default()
    );
    println!("sends/s: {:.0} (over {:.2} s)", results.rate(), results.elapsed.as_secs_f64());
    println!(
        "end-to-end deliveries/s: {:.0} ({delivered} durable inbox writes in {:.2} s{})",
        delivered as f64 / end_to_end_elapsed.as_secs_f64(),
        end_to_end_elapsed.as_secs_f64(),
        if all_delivered { "" } else { "; NOT ALL DELIVERED before the timeout" }
    );
    println!("{}", describe("send-acknowledged latency", &send));
    if !results.lateness.is_empty() {
        println!(
            "{}",
            describe(
                "  the load generator's own lateness (send started after its due time; in both latencies)",
                &percentiles(results.lateness.clone())
            )
        );
    }
    println!("{}", describe("end-to-end latency (send due -> recipient's durable write)", &e2e));
    println!("{}", describe("  of which send due -> copy received by the agent", &percentiles(parts.to_agent)));
    println!("{}", describe("  of which copy received -> agent's durable write", &percentiles(parts.writing)));
    let references = &context.references;
    match pacing {
        Pacing::Closed(1) => println!(
            "ratios: sends/s = {:.3} x bare mTLS unary at 1 in flight ({:.0}/s); p50 = {:.2} x bare p50 ({}); send rate = {:.3} x raw fsync rate ({:.0}/s)",
            results.rate() / references.bare_one_per_second.max(1e-9),
            references.bare_one_per_second,
            send.p50 as f64 / references.bare_one_latency.p50.max(1) as f64,
            millis(references.bare_one_latency.p50),
            results.rate() / references.fsyncs_per_second.max(1e-9),
            references.fsyncs_per_second,
        ),
        _ => println!(
            "ratios: sends/s = {:.3} x bare mTLS unary at 64 in flight ({:.0}/s); copies/s = {:.3} x disk group-commit records/s ({:.0}/s); sends/s = {:.2} x raw fsync rate ({:.0}/s)",
            results.rate() / references.bare_sixty_four_per_second.max(1e-9),
            references.bare_sixty_four_per_second,
            results.accepted_copies as f64
                / results.elapsed.as_secs_f64()
                / references.group_records_per_second.max(1e-9),
            references.group_records_per_second,
            results.rate() / references.fsyncs_per_second.max(1e-9),
            references.fsyncs_per_second,
        ),
    }
    let elapsed = start.elapsed();
    let broker_cpu = report_costs(&subject, before, results.latencies.len() as u64, results.accepted_copies, elapsed);
    report_load_generator_cost(load_before, broker_cpu, results.latencies.len() as u64, elapsed);
    report_flushes(
        metrics_before.as_deref(),
        metrics_after.as_deref(),
        (results.latencies.len() as u64, delivered),
        args.inbox_dir.is_none(),
        end_to_end_elapsed,
        references.fsyncs_per_second,
    );
    report_commit_stages(&subject).await;
    Ok(())
}

/// The broker's metrics page, if it serves one.
async fn scrape_metrics(subject: &Subject) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = subject.area.settings.metrics_listen?;
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let mut text = String::new();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: broker\r\n\r\n").await.ok()?;
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// A sample's value on a metrics page (the first line with exactly that name, no labels).
/// Prints how many device flushes the phase cost per message: the broker's journal `fdatasync`s (from its metrics,
/// scraped before and after) and the receiving agents' two `fsync`s per durable write, and what share of the
/// disk's raw `fdatasync` rate (measured at the start of the run) they came to. Near the disk's rate, commits queue
/// behind one another on the device, and that queueing is the latency's tail. With `--inbox-dir` the agents' writes
/// go elsewhere and are not counted.
fn report_flushes(
    before: Option<&str>,
    after: Option<&str>,
    (messages, writes): (u64, u64),
    agents_here: bool,
    elapsed: Duration,
    raw: f64,
) {
    let count = |text: Option<&str>| text.and_then(|text| metric_value(text, "broker_journal_sync_seconds_count"));
    let (Some(before), Some(after)) = (count(before), count(after)) else { return };
    let broker = after - before;
    let agents = if agents_here { 2.0 * writes as f64 } else { 0.0 };
    let per_second = (broker + agents) / elapsed.as_secs_f64().max(1e-9);
    let agents_shown = if agents_here {
        format!("{:.2} per message", agents / messages.max(1) as f64)
    } else {
        "not counted (their inboxes are elsewhere)".to_owned()
    };
    println!(
        "device flushes: broker journal {:.2} per message, receiving agents {agents_shown}; together {per_second:.0}/s = {:.2} x the disk's raw fdatasync rate ({raw:.0}/s)",
        broker / messages.max(1) as f64,
        per_second / raw.max(1e-9),
    );
}

/// Prints where the broker's commits spent their time, from its own histograms (means since it started, the warm-up
/// included): waiting for the committer, the journal's `fdatasync`, the whole group commit, applying to the index.
async fn report_commit_stages(subject: &Subject) {
    let Some(text) = scrape_metrics(subject).await else { return };
    let value = |name: &str| metric_value(&text, name);
    let mean_micros = |histogram: &str| {
        let sum = value(&format!("broker_{histogram}_sum"))?;
        let count = value(&format!("broker_{histogram}_count"))?;
        (count > 0.0).then(|| 1e6 * sum / count)
    };
    let shown = |micros: Option<f64>| micros.map(|micros| format!("{micros:.0} µs")).unwrap_or_else(|| "-".to_owned());
    let per_group = match (value("broker_commit_group_size_sum"), value("broker_commit_group_size_count")) {
        (Some(sum), Some(count)) if count > 0.0 => format!("{:.1}", sum / count),
        _ => "-".to_owned(),
    };
    println!(
        "broker's commits (its own histograms, means since it started): waiting for the committer {}, journal fdatasync {}, group commit until answered {} ({per_group} commits per group), applying to the index {}",
        shown(mean_micros("commit_wait_seconds")),
        shown(mean_micros("journal_sync_seconds")),
        shown(mean_micros("commit_seconds")),
        shown(mean_micros("apply_seconds")),
    );
}

#[derive(Clone, Copy, Debug)]
enum Pacing {
    Closed(usize),
    Open(u64),
}

/// Queues messages for an agent that is offline, then connects it and measures the drain.
async fn offline_drain(context: &RunContext<'_>) -> Result<()> {
    let args = context.args;
    let queued = args.queued;
    println!("== offline-drain: {queued} messages queued for an offline school, then it connects");
    let workload = encompass_workload()?;
    let (subject, _) = Subject::start(args, 0)?;
    let credentials = subject.credentials(args);
    let dev_dir = match credentials {
        Credentials::DevDir(dir) => Some(dir),
        Credentials::Area(_) => None,
    };
    let senders =
        Senders::connect(&subject.area, subject.address, &workload, args.connections_per_sender, dev_dir).await?;
    let before = subject.stats();
    let results = closed_loop(&senders, &workload, queued, 64, args.phase_timeout).await?;
    println!("queued: {}", results.summary("sends"));
    println!("{}", describe("send-acknowledged latency while queueing", &percentiles(results.latencies.clone())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Some(stats) = subject.stats() {
        println!(
            "broker RSS with {} queued: {:.1} MiB (peak so far {:.1} MiB)",
            results.accepted_copies,
            stats.rss_kib as f64 / 1024.0,
            stats.hwm_kib as f64 / 1024.0
        );
    }
    report_costs(&subject, before, results.latencies.len() as u64, results.accepted_copies, results.elapsed);
    report_commit_stages(&subject).await;
    let start = Instant::now();
    let receivers = Receivers::start(
        &credentials,
        subject.address,
        &workload.recipients(),
        &args.inbox_root(&subject),
        args.agent_concurrency,
    )
    .await?;
    let all = receivers.wait_for(results.accepted_copies, Duration::from_secs(args.phase_timeout)).await;
    let elapsed = start.elapsed();
    let drained = receivers.written();
    let _ = receivers.stop();
    println!(
        "drain: {drained} durable inbox writes in {:.2} s = {:.0}/s{}",
        elapsed.as_secs_f64(),
        drained as f64 / elapsed.as_secs_f64(),
        if all { "" } else { "; NOT ALL DRAINED before the timeout" }
    );
    if let Some(stats) = subject.stats() {
        println!("broker peak RSS (VmHWM) over queueing and drain: {:.1} MiB", stats.hwm_kib as f64 / 1024.0);
    }
    Ok(())
}

/// Many agent connections, each holding a delivery stream, and a sender measured while they are held.
async fn connections(context: &RunContext<'_>) -> Result<()> {
    let args = context.args;
    let count = args.connections;
    println!(
        "== connections-1000: {count} agent connections each holding a delivery stream (one synthetic agency each)"
    );
    if args.target.is_some() {
        println!("skipped: needs {count} agencies in the registry, which only a local broker gets");
        return Ok(());
    }
    let (subject, extra) = Subject::start(args, count)?;
    let credentials = subject.credentials(args);
    // The broker listens before it has loaded its policy and storage: its baseline is read once it serves (reading
    // it earlier counted the compiled policy, ~50 MB for this registry, as connections' memory).
    if !wait_until_serving(&subject, "", args.phase_timeout).await {
        bail!("the broker did not start serving");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = subject.stats();
    let open = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut holders = Vec::new();
    let mut configs = Vec::new();
    for agency in &extra {
        configs.push(agent_config(&credentials, agency, subject.address)?);
    }
    let connect_limit = Arc::new(Semaphore::new(32));
    for config in configs {
        let open = open.clone();
        let ended = ended.clone();
        let connect_limit = connect_limit.clone();
        holders.push(tokio::spawn(async move {
            let permit = connect_limit.acquire_owned().await;
            let Ok(mut client) = agent::connect(&config).await else { return };
            let Ok(response) = client.deliveries(pb::DeliveriesRequest {}).await else { return };
            drop(permit);
            open.fetch_add(1, Ordering::Relaxed);
            let mut stream = response.into_inner();
            // Holds the stream until the broker ends it or the scenario aborts this task.
            while let Ok(Some(_)) = stream.message().await {}
            ended.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while open.load(Ordering::Relaxed) < count as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "opened {} of {count} delivery streams in {:.2} s ({:.0} mTLS connections + streams per second)",
        open.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64(),
        open.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(idle), Some(now)) = (idle, subject.stats()) {
        println!(
            "broker RSS: {:.1} MiB before, {:.1} MiB holding the streams ({:.1} KiB per connection); CPU while idle-holding measured below",
            idle.rss_kib as f64 / 1024.0,
            now.rss_kib as f64 / 1024.0,
            (now.rss_kib.saturating_sub(idle.rss_kib)) as f64 / count.max(1) as f64
        );
    }
    let before = subject.stats();
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let (Some(before), Some(after)) = (before, subject.stats()) {
        println!(
            "broker CPU holding {count} idle streams: {:.1}% of one core",
            100.0 * (after.cpu_seconds - before.cpu_seconds) / 2.0
        );
    }
    // One in flight through the full path while the streams are held.
    let workload = encompass_workload()?;
    let receivers = Receivers::start(
        &credentials,
        subject.address,
        &workload.recipients(),
        &args.inbox_root(&subject),
        args.agent_concurrency,
    )
    .await?;
    let senders = Senders::connect(&subject.area, subject.address, &workload, 1, None).await?;
    let results = closed_loop(&senders, &workload, (args.messages / 10).max(100), 1, args.phase_timeout).await?;
    receivers.wait_for(results.accepted_copies, Duration::from_secs(60)).await;
    let written = receivers.stop();
    println!(
        "{}",
        describe("one in flight while holding them: send-acknowledged", &percentiles(results.latencies.clone()))
    );
    println!(
        "{}",
        describe(
            "one in flight while holding them: end-to-end",
            &percentiles(end_to_end(&results.sent_at, &written).whole)
        )
    );
    println!("streams still open at the end: {}", open.load(Ordering::Relaxed) - ended.load(Ordering::Relaxed));
    for holder in holders {
        holder.abort();
    }
    Ok(())
}

/// Waits until the broker answers a `Track` for `message_id` through TLS and token checks (an unknown id counts when
/// `message_id` is empty: the answer "not found" also comes from a broker that is serving). False on timeout.
async fn wait_until_serving(subject: &Subject, message_id: &str, timeout_seconds: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(timeout_seconds);
    while Instant::now() < deadline {
        if let Ok(mut client) = connect_client(&Credentials::Area(&subject.area), "beds-police", subject.address).await
        {
            match client.track(pb::TrackRequest { message_id: message_id.to_owned() }).await {
                Ok(_) => return true,
                Err(status) if message_id.is_empty() && status.code() != tonic::Code::Unavailable => return true,
                Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Waits until the broker's `broker_queues_loading` gauge reads 0 (scraping its metrics over plain HTTP).
async fn queues_loaded(subject: &Subject, timeout_seconds: u64) -> Option<()> {
    subject.area.settings.metrics_listen?;
    let deadline = Instant::now() + Duration::from_secs(timeout_seconds);
    while Instant::now() < deadline {
        if let Some(text) = scrape_metrics(subject).await
            && metric_value(&text, "broker_queues_loading") == Some(0.0)
        {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Stores many messages (queued for an offline agent), restarts the broker, and measures how long until it serves.
async fn restart(context: &RunContext<'_>) -> Result<()> {
    let args = context.args;
    let stored = args.stored;
    println!("== restart: {stored} stored messages, then SIGTERM + start, then SIGKILL + start");
    if args.target.is_some() {
        println!("skipped: cannot restart a --target broker");
        return Ok(());
    }
    let workload = encompass_workload()?;
    let (mut subject, _) = Subject::start(args, 0)?;
    let senders =
        Senders::connect(&subject.area, subject.address, &workload, args.connections_per_sender, None).await?;
    let results = closed_loop(&senders, &workload, stored, 64, args.phase_timeout).await?;
    println!("stored: {}", results.summary("messages"));
    if let Some(disk) = subject.disk() {
        println!(
            "data dir: {}; sled's {:.0} bytes per message",
            disk.describe(),
            disk.index as f64 / stored.max(1) as f64
        );
    }
    let probe_id = results.sent_at.first().map(|(id, _)| id.clone()).unwrap_or_default();
    drop(senders);
    for graceful in [true, false] {
        let started = subject.restart(graceful)?;
        let listening = started.elapsed();
        // Ready when a Track call through TLS and token checks succeeds.
        let ready = wait_until_serving(&subject, &probe_id, args.phase_timeout).await.then(|| started.elapsed());
        let rss = subject.stats().map(|stats| stats.rss_kib as f64 / 1024.0).unwrap_or_default();
        println!(
            "restart after {}: process up in {}, serving (Track answered) after {} with {stored} stored; RSS {rss:.1} MiB",
            if graceful { "SIGTERM" } else { "SIGKILL" },
            millis(listening.as_micros() as u64),
            ready.map(|ready| millis(ready.as_micros() as u64)).unwrap_or_else(|| "never (timeout)".to_owned())
        );
        // The stored queues load in the background once the broker serves, sends meanwhile if asked.
        let loaded = if args.send_while_loading > 0 {
            let senders =
                Senders::connect(&subject.area, subject.address, &workload, args.connections_per_sender, None).await?;
            let sending = closed_loop(&senders, &workload, args.send_while_loading, 64, args.phase_timeout);
            let (loaded, sent) = tokio::join!(queues_loaded(&subject, args.phase_timeout), sending);
            let sent = sent?;
            println!(
                "  sent meanwhile: {}; {}",
                sent.summary("messages"),
                describe("send latency", &percentiles(sent.latencies.clone()))
            );
            loaded
        } else {
            queues_loaded(&subject, args.phase_timeout).await
        };
        match loaded {
            Some(()) => {
                let rss = subject.stats().map(|stats| stats.rss_kib as f64 / 1024.0).unwrap_or_default();
                println!(
                    "  stored queues all loaded {} after start; RSS then {rss:.1} MiB",
                    millis(started.elapsed().as_micros() as u64)
                );
            }
            None => println!("  stored queues not loaded within the phase timeout"),
        }
    }
    // The first delivery after the restart: the stored queue is live.
    let receivers = Receivers::start(
        &Credentials::Area(&subject.area),
        subject.address,
        &workload.recipients(),
        &args.inbox_root(&subject),
        args.agent_concurrency,
    )
    .await?;
    let start = Instant::now();
    let first = receivers.wait_for(1, Duration::from_secs(60)).await;
    println!(
        "first stored delivery written {} after the agent connected",
        if first { millis(start.elapsed().as_micros() as u64) } else { "never".to_owned() }
    );
    let _ = receivers.stop();
    Ok(())
}

/// Scenario folders, whose broker data is removed when the whole run ends and whose inbox files are kept.
///
/// Removing tens of thousands of inbox files made later file creation slow on a filesystem without a journal: ext4
/// then skips the inodes of its group deleted in the last minutes, reading the inode table for each
/// (`find_inode_bit`/`recently_deleted` took 15–48% of the machine's CPU in profiles), which measured the cleanup,
/// not the broker or the agent.
static RETIRED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn retire_at_exit(area: &mut Area) {
    area.dir.disable_cleanup(true);
    if let Ok(mut retired) = RETIRED.lock() {
        retired.push(area.dir.path().to_owned());
    }
}

fn run_load(args: Args) -> Result<()> {
    let work_dir = args.work_dir.clone();
    let result = run_scenarios(args);
    // The brokers' data folders go (a few large files); the receivers' inboxes (many small files) stay, so that the
    // next run does not create its files among thousands of just-deleted inodes (see `--work-dir`).
    let retired = RETIRED.lock().map(|mut retired| std::mem::take(&mut *retired)).unwrap_or_default();
    for dir in retired {
        let _ = std::fs::remove_dir_all(dir.join("data"));
    }
    println!(
        "the receivers' inbox files are kept under {}; remove that folder when no run follows soon",
        work_dir.display()
    );
    result
}

fn run_scenarios(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let scenarios: Vec<String> = if args.scenarios.is_empty() {
            ALL_SCENARIOS.iter().map(|name| (*name).to_owned()).collect()
        } else {
            args.scenarios.clone()
        };
        if args.target.is_some() && args.dev_dir.is_none() {
            bail!("--target needs --dev-dir (the `.dev/` folder of `broker serve --dev`) for certificates and tokens");
        }
        println!(
            "machine: {} cores, {}; load average {}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model(),
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        );
        let mut reference_area = Area::with_settings_in(&args.work_dir, BrokerSettings::default())?;
        retire_at_exit(&mut reference_area);
        let references = measure_references(&args, &reference_area, &mixed_workload()?).await?;
        let context = RunContext { args: &args, references };
        for scenario in &scenarios {
            let outcome = match scenario.as_str() {
                "one-in-flight" => {
                    throughput_scenario(
                        &context,
                        scenario,
                        encompass_workload()?,
                        (args.messages / 5).max(100),
                        Pacing::Closed(1),
                    )
                    .await
                }
                "sixty-four-in-flight" => {
                    throughput_scenario(
                        &context,
                        scenario,
                        mixed_workload()?,
                        args.messages,
                        Pacing::Closed(args.in_flight),
                    )
                    .await
                }
                "fan-out-5" => {
                    throughput_scenario(
                        &context,
                        scenario,
                        fan_out_workload()?,
                        args.messages / 2,
                        Pacing::Closed(args.in_flight),
                    )
                    .await
                }
                "open-loop" => {
                    let messages = args.rate * args.open_loop_seconds;
                    throughput_scenario(&context, scenario, encompass_workload()?, messages, Pacing::Open(args.rate))
                        .await
                }
                "offline-drain" => offline_drain(&context).await,
                "connections-1000" => connections(&context).await,
                "restart" => restart(&context).await,
                other => Err(anyhow!("unknown scenario `{other}`")),
            };
            if let Err(error) = outcome {
                println!("scenario `{scenario}` failed: {error:#}");
            }
        }
        Ok(())
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}
