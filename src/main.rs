//! The `roomcast` binary: config → tracing → bind → [`roomcast::run`] → exit code.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use roomcast::Config;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Horizontally scalable WebSocket broadcast gateway for live-streaming rooms.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML file overriding config/default.toml (environment variables ROOMCAST__SECTION__KEY override both).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("roomcast: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // A log write that fails (say, stdout is a pipe whose reader died) must
    // never take a task down: by default tracing-subscriber reports it with
    // eprintln!, which panics when stderr is that same broken pipe.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    if config.log.json {
        logs.json().init();
    } else {
        logs.init();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roomcast: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot listen (server.listen)");
            return ExitCode::from(69);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    match roomcast::run(listener, config, prometheus::Registry::new(), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "roomcast failed");
            ExitCode::FAILURE
        }
    }
}

/// Cancel `shutdown` on SIGTERM or SIGINT (cancel first, then log).
async fn signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    let received = {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops roomcast");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    };
    #[cfg(not(unix))]
    let received = {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    };
    shutdown.cancel();
    tracing::info!(signal = received, "shutting down");
}
