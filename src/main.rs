//! The `roomcast` binary: config → tracing → bind → [`roomcast::run`] → exit code.
//!
//! Signals: SIGTERM, SIGINT and SIGQUIT drain the node (close 1012 spread
//! over `shutdown.drain`) and exit 0; a second one during the drain exits at
//! once with 130. SIGHUP is logged and ignored (a closed terminal or a
//! supervisor's reload must not drop every client). SIGUSR1 logs a status
//! line. See README, "Signals".

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::io::IsTerminal;
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
    /// Validate the configuration, print it as TOML (secrets redacted), and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Ask the running node on `server.listen` (from the same configuration)
    /// for its health: exit 0 if it answers 200 within 2 s, else 1. For
    /// container health checks: the image needs no curl.
    Healthcheck {
        /// The endpoint to ask: /healthz (alive) or /readyz (ready for clients).
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
}

/// How long `roomcast healthcheck` waits for each step.
const HEALTHCHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Exit code of a second stop signal during the drain (128 + SIGINT, as shells do).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    let args = Args::parse();
    // `vars_os`, not `vars`: a variable that is not UTF-8 must not panic here.
    let env = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    let config = match Config::load(args.config.as_deref(), env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("roomcast: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    if args.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Healthcheck { path }) = args.command {
        return healthcheck(config.listen, &path);
    }
    // RUST_LOG, when set, was validated with the configuration.
    let filter = match std::env::var("RUST_LOG") {
        Ok(filter) => EnvFilter::new(filter),
        Err(_) => EnvFilter::new(&config.log.level),
    };
    // A log write that fails (say, stdout is a pipe whose reader died) must
    // never take a task down: by default tracing-subscriber reports it with
    // eprintln!, which panics when stderr is that same broken pipe.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
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

/// `roomcast healthcheck`: one HTTP/1.1 GET of `path` on `listen` (its
/// loopback address when it listens on every address).
fn healthcheck(listen: std::net::SocketAddr, path: &str) -> ExitCode {
    use std::io::{Read, Write};
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let ask = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, HEALTHCHECK_TIMEOUT)?;
        stream.set_read_timeout(Some(HEALTHCHECK_TIMEOUT))?;
        stream.set_write_timeout(Some(HEALTHCHECK_TIMEOUT))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 512];
        let n = stream.read(&mut head)?;
        let text = String::from_utf8_lossy(&head[..n]);
        Ok(text.lines().next().unwrap_or("").to_owned())
    };
    match ask() {
        Ok(status) if status.split(' ').nth(1) == Some("200") => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("roomcast healthcheck: {addr}{path} answered {status:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("roomcast healthcheck: {addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
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
    let registry = prometheus::Registry::new();
    let node = tokio::spawn(roomcast::run(
        listener,
        config,
        registry.clone(),
        shutdown.clone(),
    ));
    tokio::select! {
        result = node => match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "roomcast failed");
                ExitCode::FAILURE
            }
            Err(e) => {
                tracing::error!(error = %e, "roomcast task failed");
                ExitCode::FAILURE
            }
        },
        forced = signals(shutdown, registry) => {
            tracing::warn!(signal = forced, "second stop signal during the drain: exiting now");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

/// Handle signals for the life of the process. Returns only when a second
/// stop signal arrives during the drain (the caller then exits at once).
async fn signals(shutdown: CancellationToken, registry: prometheus::Registry) -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let watch = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::warn!(error = %e, signal = name, "cannot watch signal"))
                .ok()
        };
        let mut term = watch(SignalKind::terminate(), "SIGTERM");
        let mut int = watch(SignalKind::interrupt(), "SIGINT");
        let mut quit = watch(SignalKind::quit(), "SIGQUIT");
        let mut hup = watch(SignalKind::hangup(), "SIGHUP");
        let mut usr1 = watch(SignalKind::user_defined1(), "SIGUSR1");
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        loop {
            let stop = tokio::select! {
                _ = next(&mut term) => "SIGTERM",
                _ = next(&mut int) => "SIGINT",
                _ = next(&mut quit) => "SIGQUIT",
                _ = next(&mut hup) => {
                    tracing::info!(signal = "SIGHUP", "ignored: roomcast keeps serving (send SIGTERM to drain and stop)");
                    continue;
                }
                _ = next(&mut usr1) => {
                    log_status(&registry);
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                return stop;
            }
            shutdown.cancel();
            tracing::info!(
                signal = stop,
                "shutting down (a second signal exits at once)"
            );
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
        tracing::info!(
            signal = "ctrl-c",
            "shutting down (a second one exits at once)"
        );
        let _ = tokio::signal::ctrl_c().await;
        "ctrl-c"
    }
}

/// One log line with the node's vital signs, read from its metrics.
fn log_status(registry: &prometheus::Registry) {
    let value = |name: &str| -> f64 {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == name)
            .and_then(|f| f.get_metric().first().map(|m| m.get_gauge().get_value()))
            .unwrap_or(0.0)
    };
    tracing::info!(
        signal = "SIGUSR1",
        connections = value("roomcast_connections") as i64,
        rooms = value("roomcast_rooms") as i64,
        pending_connections = value("roomcast_pending_connections") as i64,
        bus_up = value("roomcast_bus_up") == 1.0,
        "status"
    );
}
