//! The `broker` command: `serve` runs the broker; other subcommands are tools for information-governance leads,
//! auditors and operators. Kept thin: the work is in the library.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "broker", version, about = "Secure information-sharing broker for children's safeguarding")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Tools for information-governance leads: validate, test, explain, diff and matrix of a policy set.
    Policy {
        #[command(subcommand)]
        command: broker::policy::cli::PolicyCommand,
    },
    /// Development helpers.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Take a consistent copy of a data directory, while the broker runs.
    Backup {
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup file to write (a tar file); `-` writes it to standard output.
        #[arg(long)]
        out: PathBuf,
    },
    /// Audit log tools: verify, checkpoint, prove, query.
    #[command(subcommand)]
    Audit(broker::audit::cli::AuditCommand),
    /// Unpack a backup into an empty data directory; the index is rebuilt when the broker starts.
    Restore {
        #[arg(long)]
        backup: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Mint a short-lived practitioner token with an agency's development signing key (made by `serve --dev`).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The agency id (from policies/registry.yaml).
    #[arg(long)]
    agency: String,
    /// The practitioner's subject, e.g. a staff number.
    #[arg(long)]
    sub: String,
    /// A role the practitioner holds; repeat for several.
    #[arg(long = "role", required = true)]
    roles: Vec<String>,
    /// Minutes the token stays valid.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// The development folder.
    #[arg(long, default_value = ".dev")]
    dev_dir: PathBuf,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Development mode: sled under ./.dev/data, development certificates and agent configs generated under ./.dev
    /// on first run, the sample policies in ./policies loaded.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// The broker's configuration file (see deploy/broker.toml).
    #[arg(long, env = "BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// With --dev: where to listen.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// With --dev: where to serve Prometheus metrics (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// With --dev: the policy directory.
    #[arg(long, default_value = "policies")]
    policy_dir: PathBuf,
    /// With --dev: the development folder.
    #[arg(long, default_value = ".dev")]
    dev_dir: PathBuf,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Audit(command) => broker::audit::cli::run(command),
        Command::Policy { command } => Ok(ExitCode::from(clamp_exit(broker::policy::cli::run(&command)))),
        Command::Dev(DevCommand::Token(args)) => dev_token(args),
        Command::Backup { data_dir, out } if out.as_os_str() == "-" => {
            broker::backup::backup_to(&data_dir, std::io::stdout().lock())
                .map(|_| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
        Command::Backup { data_dir, out } => broker::backup::backup(&data_dir, &out)
            .map(|report| {
                for (name, bytes) in report.files {
                    println!("{name}\t{bytes} bytes");
                }
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Restore { backup, data_dir } => broker::backup::restore(&backup, &data_dir)
            .map(|report| {
                println!(
                    "restored {} files into {}; the index is rebuilt at the next start",
                    report.files.len(),
                    data_dir.display()
                );
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // Not `eprintln!`, which panics (exit status 101) when standard error cannot be written: a log file on
            // the full disk that stopped the process, say. The exit status still tells the supervisor.
            let _ = writeln!(std::io::stderr(), "error: {}", broker::error_report(&error));
            ExitCode::FAILURE
        }
    }
}

/// Exit codes above 255 do not exist on Unix.
fn clamp_exit(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    broker::init_logging(json, filter);
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    init_logging(args.log_json);
    let config = if args.dev {
        let policy = broker::policy::PolicySet::load_dir(&args.policy_dir).map_err(|errors| {
            anyhow::anyhow!("the policy set in `{}` is not valid:\n{errors}", args.policy_dir.display())
        })?;
        let (mut config, agencies) = broker::dev::prepare(&args.dev_dir, &args.policy_dir, &policy, args.listen)
            .context("could not prepare the development folder")?;
        config.metrics_listen = Some(args.metrics_listen);
        print_dev_instructions(&args.dev_dir, &agencies);
        config
    } else {
        let path = args.config.context("give --config FILE, or --dev for a development broker")?;
        broker::config::Config::load(&path, |name| std::env::var(name).ok())
            .map_err(|errors| anyhow::anyhow!("configuration `{}`:\n{errors}", path.display()))?
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("could not listen on {}", config.listen))?;
        broker::run(config, listener, shutdown_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn dev_token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    if !broker::pki::is_valid_agency_id(&args.agency) {
        anyhow::bail!("`{}` is not an agency id", args.agency);
    }
    let key = args.dev_dir.join("tokens").join("keys").join(format!("{}.key", args.agency));
    let pem = std::fs::read_to_string(&key).with_context(|| {
        format!(
            "no development signing key for `{}` at `{}`: run `broker serve --dev` first",
            args.agency,
            key.display()
        )
    })?;
    let issuer = broker::auth::token::DevIssuer::from_private_pem(&args.agency, &pem).map_err(anyhow::Error::msg)?;
    let token = issuer
        .mint(&args.sub, &args.roles, std::time::Duration::from_secs(args.minutes * 60))
        .map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

fn print_dev_instructions(dev_dir: &std::path::Path, agencies: &[String]) {
    let dir = dev_dir.display();
    eprintln!("Development broker. Agent configurations are in {dir}/agents/. In other terminals:");
    eprintln!("  cargo run -p agent -- run --config {dir}/agents/luton-oakwood-primary.toml");
    eprintln!(
        "  cargo run -p agent -- send --config {dir}/agents/beds-police.toml examples/operation-encompass-notification.json"
    );
    eprintln!("Agencies: {}", agencies.join(", "));
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM; only SIGINT will stop the broker");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
