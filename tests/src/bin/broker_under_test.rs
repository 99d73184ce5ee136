//! Runs the real broker as its own process for the tests that kill it (`kill -9`) and start it again.
//!
//! Usage: `broker-under-test CONFIG.toml`. Binds the configured address (port 0 picks a free one), prints
//! `LISTENING <address>` on standard output once bound, and serves until SIGTERM or SIGINT.

use std::{io::Write as _, process::ExitCode};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: broker-under-test CONFIG.toml");
        return ExitCode::FAILURE;
    };
    // BROKER_TEST_LOG sets the level; the log is JSON lines, as `broker serve --log-json` writes it.
    let level = std::env::var("BROKER_TEST_LOG").unwrap_or_else(|_| "warn".to_owned());
    broker::init_logging(true, tracing_subscriber::EnvFilter::new(level));
    let config = match broker::config::Config::load(std::path::Path::new(&path), |_| None) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        println!("LISTENING {}", listener.local_addr()?);
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
        broker::run(config, listener, signal).await.map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Not `eprintln!`, which panics (exit status 101) when standard error cannot be written: a log file on
            // the full disk that stopped the process, say. The exit status still tells the supervisor.
            let _ = writeln!(std::io::stderr(), "error: {}", broker::error_report(&error));
            ExitCode::FAILURE
        }
    }
}
