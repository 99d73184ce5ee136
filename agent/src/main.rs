//! The `agent` command line: `run` (the long-running agent), `send` (one message from a JSON file) and `track` (a sent
//! message's state per recipient). A thin layer over the `agent` library; see its documentation and
//! `agent --help`.

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use agent::{
    AgentConfig, AgentError,
    json::{SEND_RESPONSE_MESSAGE, TRACK_RESPONSE_MESSAGE, message_to_json},
    send::{format_receipt, format_track, prepare_envelope, send_envelope, track_message},
};
use anyhow::Context;
use clap::{Parser, Subcommand};

/// The safeguarding broker's agency agent.
///
/// Settings come from the configuration file; `AGENT_*` environment variables override them (AGENT_AGENCY,
/// AGENT_BROKER_URL, AGENT_SERVER_NAME, AGENT_CA_CERT, AGENT_CERT, AGENT_KEY, AGENT_INBOX, AGENT_OUTBOX,
/// AGENT_TOKEN_FILE, AGENT_TOKEN_COMMAND, AGENT_RECONNECT_INITIAL_MILLIS, AGENT_RECONNECT_MAX_MILLIS,
/// AGENT_RETRY_AFTER_MILLIS). Logging is controlled by RUST_LOG (default `info`).
#[derive(Parser)]
#[command(name = "agent", version, about, long_about)]
struct Arguments {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Receive deliveries into the inbox (and send the outbox, if configured) until interrupted.
    Run {
        /// The agent's configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Send one message written as a JSON envelope (proto3 JSON mapping) and print the receipt.
    Send {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the receipt as proto3 JSON.
        #[arg(long)]
        json: bool,
        /// The envelope to send.
        #[arg(value_name = "MESSAGE.json")]
        message: PathBuf,
    },
    /// Show the state of a sent message per recipient.
    Track {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Print the answer as proto3 JSON.
        #[arg(long)]
        json: bool,
        #[arg(value_name = "MESSAGE_ID")]
        message_id: String,
    },
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written (a full disk) is dropped instead of panicking the task that logged it.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(arguments.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Not `eprintln!`, which panics (exit status 101) when standard error cannot be written: a log file on
            // the full disk that stopped the process, say. The exit status still tells the supervisor.
            let _ = writeln!(std::io::stderr(), "error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            agent::run(config, shutdown_signal()).await?;
        }
        Command::Send { config, json, message } => {
            let config = AgentConfig::load(&config)?;
            let bytes = std::fs::read(&message).with_context(|| format!("cannot read `{}`", message.display()))?;
            let envelope = prepare_envelope(&bytes).with_context(|| format!("`{}`", message.display()))?;
            let mut client = agent::connect(&config).await?;
            let receipt = send_envelope(&mut client, envelope).await.map_err(refused)?;
            if json {
                print_bytes(&message_to_json(SEND_RESPONSE_MESSAGE, &receipt)?);
            } else {
                print!("{}", format_receipt(&receipt));
            }
        }
        Command::Track { config, json, message_id } => {
            let config = AgentConfig::load(&config)?;
            let mut client = agent::connect(&config).await?;
            let track = track_message(&mut client, &message_id).await.map_err(refused)?;
            if json {
                print_bytes(&message_to_json(TRACK_RESPONSE_MESSAGE, &track)?);
            } else {
                print!("{}", format_track(&track));
            }
        }
    }
    Ok(())
}

/// Labels a refused call so the status and its details read as the broker's answer.
fn refused(error: AgentError) -> anyhow::Error {
    match error {
        AgentError::Rpc(_) => anyhow::anyhow!("the broker refused the call: {error}"),
        other => other.into(),
    }
}

fn print_bytes(bytes: &[u8]) {
    print!("{}", String::from_utf8_lossy(bytes));
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM: only Ctrl-C stops the agent");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
