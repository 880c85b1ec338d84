//! roomcast-bench: load generator for the roomcast WebSocket broadcast gateway.
//!
//! Modes: `fanout` (one measured window), `ramp` (rising rate until latency
//! or loss thresholds break), `idle` (many quiet connections, server memory
//! per connection), `floor` (the kernel's cost of one small `send` on this
//! machine, no server involved). Each prints a human summary on stderr and one JSON line
//! per report on stdout.

mod conn;
mod engine;
mod fanout;
mod floor;
mod idle;
mod payload;
mod procfs;
mod report;
mod stats;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use conn::{Protocol, Target};
use engine::LoadCfg;

/// Hard caps, whatever the flags say.
const MAX_SECONDS: f64 = 3600.0;
const MAX_CONNECTIONS: usize = 200_000;
const MAX_RATE: f64 = 100_000.0;

#[derive(Parser, Debug)]
#[command(
    name = "roomcast-bench",
    version,
    about = "Load generator / benchmark for the roomcast WebSocket broadcast gateway (loopback only by default)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Subscribers in rooms, publishers at a fixed rate: one measured window
    Fanout(FanoutArgs),
    /// Like fanout, raising the rate step by step until p99 or loss breaks
    Ramp(RampArgs),
    /// Many idle connections: server RSS per connection
    Idle(IdleArgs),
    /// No server: the CPU one small send() costs on this machine, the floor under any gateway
    Floor(FloorArgs),
}

#[derive(Args, Debug, Clone)]
struct CommonArgs {
    /// Base URL of a gateway node (repeatable; every room's subscribers and the publishers are spread evenly over the nodes)
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "ws://127.0.0.1:8080"
    )]
    urls: Vec<String>,
    /// How to connect and speak
    #[arg(long, value_enum, default_value_t = Protocol::Json)]
    protocol: Protocol,
    /// Server process id for CPU/RSS measurement (repeatable; summed)
    #[arg(long = "server-pid", value_name = "PID")]
    server_pids: Vec<u32>,
    /// Tokio worker threads for the generator
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connection attempts in flight at once
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds allowed for TCP connect + handshake (+ welcome in json mode)
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// Allow non-loopback hosts (off by default: this tool is a load generator)
    #[arg(long)]
    allow_remote: bool,
    /// A JWT every connection presents (roomcast's `?token=`), to measure with auth on
    #[arg(long)]
    token: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct FanoutArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Subscriber connections (round-robin over rooms)
    #[arg(long, default_value_t = 2000)]
    subscribers: usize,
    /// Number of rooms
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Publisher connections; publisher i sends to room i % rooms
    #[arg(long, default_value_t = 20)]
    publishers: usize,
    /// Messages per second per publisher
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Payload size in bytes
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Warm-up seconds before the measured window
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Measured window in seconds
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Seconds to wait for in-flight messages after the window (publishers paused)
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Room name prefix (rooms are PREFIX0..PREFIX{R-1}); point it at a server namespace
    /// (e.g. `h.`, one with history on) to measure that namespace's rules
    #[arg(long, default_value = "bench-")]
    room_prefix: String,
    /// Spread client sockets over source addresses 127.0.0.1..=127.0.0.K
    #[arg(long, default_value_t = 1)]
    sources: usize,
    /// The rooms have history (`--room-prefix` names a namespace with `history` on the
    /// server): fail the run unless every `msg` frame carries a server `seq` and none is
    /// skipped or repeated. Seqs are counted and reported without it too (json protocol).
    #[arg(long)]
    check_seq: bool,
    /// Redis process id, for Redis's CPU in the measured window (repeatable; summed)
    #[arg(long = "redis-pid", value_name = "PID")]
    redis_pids: Vec<u32>,
}

#[derive(Args, Debug, Clone)]
struct RampArgs {
    #[command(flatten)]
    fanout: FanoutArgs,
    /// Rate of the first step (messages/s per publisher; default: --rate)
    #[arg(long)]
    start_rate: Option<f64>,
    /// Factor the rate is multiplied by at each step
    #[arg(long, default_value_t = 1.5)]
    step: f64,
    /// Measured window of each step, seconds
    #[arg(long, default_value_t = 10.0)]
    step_duration: f64,
    /// Settle time at the new rate before each step's window after the first
    /// (the first uses --warmup), seconds
    #[arg(long, default_value_t = 2.0)]
    step_settle: f64,
    /// Stop when p99 latency exceeds this (ms)
    #[arg(long, default_value_t = 50.0)]
    max_p99_ms: f64,
    /// Stop when the loss fraction exceeds this
    #[arg(long, default_value_t = 0.001)]
    max_loss: f64,
    /// Maximum number of steps
    #[arg(long, default_value_t = 12)]
    max_steps: usize,
    /// Measure a failing step again this many times before stopping (noisy machines)
    #[arg(long, default_value_t = 1)]
    retries: usize,
}

#[derive(Args, Debug, Clone)]
struct IdleArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Connections to open
    #[arg(long)]
    connections: usize,
    /// Source addresses: connection i binds to 127.0.0.(1 + i % K)
    #[arg(long, default_value_t = 1)]
    sources: usize,
    /// Seconds to hold the connections open after they are all up
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Seconds to wait after connecting before reading the server RSS
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Number of rooms
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Room name prefix
    #[arg(long, default_value = "idle-")]
    room_prefix: String,
}

#[derive(Args, Debug, Clone)]
struct FloorArgs {
    /// Loopback TCP connections (each end is a file descriptor: 2 per connection)
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Sockets written per burst (one "room"); bursts move round-robin over the groups
    #[arg(long, default_value_t = 100)]
    group: usize,
    /// Bursts to send
    #[arg(long, default_value_t = 4000)]
    bursts: usize,
    /// Microseconds between bursts
    #[arg(long, default_value_t = 2500)]
    interval_us: u64,
    /// Bytes per send (a 100-byte payload framed: 102 B plain, about 180 B as roomcast's JSON msg)
    #[arg(long, default_value_t = 150)]
    size: usize,
    /// How the sender writes
    #[arg(long, value_enum, default_value_t = floor::SendMode::Send)]
    send_mode: floor::SendMode,
    /// Core to pin the sender to (-1: no pinning)
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    sender_cpu: i64,
    /// Core to pin the reader to (-1: no pinning)
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    reader_cpu: i64,
}

/// A usage / safety error: printed, exit code 2.
struct UsageError(String);

fn secs(name: &str, v: f64, allow_zero: bool) -> Result<Duration, UsageError> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > MAX_SECONDS {
        let lo = if allow_zero { "0" } else { "> 0" };
        return Err(UsageError(format!(
            "--{name} must be {lo} and <= {MAX_SECONDS} seconds (got {v})"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

fn count(name: &str, v: usize, min: usize, max: usize) -> Result<usize, UsageError> {
    if v < min || v > max {
        return Err(UsageError(format!(
            "--{name} must be between {min} and {max} (got {v})"
        )));
    }
    Ok(v)
}

fn check_rate(name: &str, v: f64) -> Result<f64, UsageError> {
    if !v.is_finite() || v <= 0.0 || v > MAX_RATE {
        return Err(UsageError(format!(
            "--{name} must be > 0 and <= {MAX_RATE} msg/s (got {v})"
        )));
    }
    Ok(v)
}

fn check_common(c: &CommonArgs) -> Result<Vec<Target>, UsageError> {
    count("threads", c.threads, 1, 64)?;
    count("connect-concurrency", c.connect_concurrency, 1, 10_000)?;
    secs("connect-timeout", c.connect_timeout, false)?;
    if c.urls.is_empty() || c.urls.len() > 64 {
        return Err(UsageError("give between 1 and 64 --url".into()));
    }
    let mut targets = Vec::new();
    for u in &c.urls {
        let mut t = Target::parse(u).map_err(UsageError)?;
        t.token = c.token.clone();
        if !c.allow_remote && !t.is_loopback() {
            return Err(UsageError(format!(
                "refusing non-loopback URL {u}: only 127.0.0.0/8, ::1 and localhost are allowed (pass --allow-remote to override)"
            )));
        }
        targets.push(t);
    }
    check_pids("server-pid", &c.server_pids)?;
    Ok(targets)
}

fn check_pids(flag: &str, pids: &[u32]) -> Result<(), UsageError> {
    for pid in pids {
        if procfs::cpu_ticks(&pid.to_string()).is_none() {
            return Err(UsageError(format!(
                "--{flag} {pid}: cannot read /proc/{pid}/stat (no such process?)"
            )));
        }
    }
    Ok(())
}

fn check_prefix(p: &str) -> Result<(), UsageError> {
    if conn::valid_room_prefix(p) {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--room-prefix {p:?}: use at most 64 of [A-Za-z0-9_.:@-]"
        )))
    }
}

fn load_cfg(a: &FanoutArgs) -> Result<LoadCfg, UsageError> {
    let targets = check_common(&a.common)?;
    count("subscribers", a.subscribers, 1, MAX_CONNECTIONS)?;
    count("publishers", a.publishers, 1, MAX_CONNECTIONS)?;
    if a.subscribers + a.publishers > MAX_CONNECTIONS {
        return Err(UsageError(format!(
            "subscribers + publishers must be <= {MAX_CONNECTIONS}"
        )));
    }
    count("rooms", a.rooms, 1, 100_000)?;
    count("size", a.size, payload::MIN_SIZE, payload::MAX_SIZE)?;
    count("sources", a.sources, 1, 254)?;
    check_prefix(&a.room_prefix)?;
    check_pids("redis-pid", &a.redis_pids)?;
    if a.check_seq && a.common.protocol != Protocol::Json {
        return Err(UsageError(
            "--check-seq needs --protocol json: only roomcast's JSON msg frames carry a seq".into(),
        ));
    }
    if a.rooms > a.publishers {
        eprintln!(
            "note: {} rooms but only {} publishers: rooms {}.. get no messages",
            a.rooms, a.publishers, a.publishers
        );
    }
    Ok(LoadCfg {
        targets,
        protocol: a.common.protocol,
        subscribers: a.subscribers,
        rooms: a.rooms,
        publishers: a.publishers,
        size: a.size,
        room_prefix: a.room_prefix.clone(),
        connect_concurrency: a.common.connect_concurrency,
        connect_timeout: secs("connect-timeout", a.common.connect_timeout, false)?,
        server_pids: a.common.server_pids.clone(),
        redis_pids: a.redis_pids.clone(),
        sources: a.sources,
        check_seq: a.check_seq,
    })
}

enum Job {
    Fanout(LoadCfg, fanout::FanoutPlan),
    Ramp(LoadCfg, fanout::RampPlan),
    Idle(idle::IdleCfg),
    Floor(floor::FloorCfg),
}

impl Job {
    fn threads(&self) -> usize {
        match self {
            Job::Fanout(_, p) => p.threads,
            Job::Ramp(_, p) => p.threads,
            Job::Idle(c) => c.threads,
            Job::Floor(_) => 1,
        }
    }

    fn targets_mut(&mut self) -> &mut [Target] {
        match self {
            Job::Fanout(c, _) | Job::Ramp(c, _) => &mut c.targets,
            Job::Idle(c) => &mut c.targets,
            Job::Floor(_) => &mut [],
        }
    }
}

fn plan(cli: Cli) -> Result<(Job, bool), UsageError> {
    match cli.cmd {
        Cmd::Fanout(a) => {
            let cfg = load_cfg(&a)?;
            let p = fanout::FanoutPlan {
                rate: check_rate("rate", a.rate)?,
                warmup: secs("warmup", a.warmup, true)?,
                duration: secs("duration", a.duration, false)?,
                drain: secs("drain", a.drain, true)?,
                threads: a.common.threads,
            };
            Ok((Job::Fanout(cfg, p), a.common.allow_remote))
        }
        Cmd::Ramp(r) => {
            let a = &r.fanout;
            let cfg = load_cfg(a)?;
            let start_rate = check_rate("start-rate", r.start_rate.unwrap_or(a.rate))?;
            if !r.step.is_finite() || r.step <= 1.0 || r.step > 10.0 {
                return Err(UsageError(format!(
                    "--step must be > 1 and <= 10 (got {})",
                    r.step
                )));
            }
            let max_steps = count("max-steps", r.max_steps, 1, stats::MAX_WINDOWS)?;
            let top = start_rate * r.step.powi(max_steps as i32 - 1);
            if top > MAX_RATE {
                eprintln!("note: the last steps would exceed {MAX_RATE} msg/s per publisher; rates are capped there");
            }
            if !r.max_p99_ms.is_finite() || r.max_p99_ms <= 0.0 {
                return Err(UsageError("--max-p99-ms must be > 0".into()));
            }
            if !r.max_loss.is_finite() || !(0.0..=1.0).contains(&r.max_loss) {
                return Err(UsageError("--max-loss must be between 0 and 1".into()));
            }
            let p = fanout::RampPlan {
                start_rate,
                step: r.step,
                step_duration: secs("step-duration", r.step_duration, false)?,
                warmup: secs("warmup", a.warmup, true)?,
                step_settle: secs("step-settle", r.step_settle, true)?,
                drain: secs("drain", a.drain, true)?,
                max_p99_ms: r.max_p99_ms,
                max_loss: r.max_loss,
                max_steps,
                retries: count("retries", r.retries, 0, 5)?,
                threads: a.common.threads,
            };
            Ok((Job::Ramp(cfg, p), a.common.allow_remote))
        }
        Cmd::Idle(a) => {
            let targets = check_common(&a.common)?;
            check_prefix(&a.room_prefix)?;
            let cfg = idle::IdleCfg {
                targets,
                protocol: a.common.protocol,
                connections: count("connections", a.connections, 1, MAX_CONNECTIONS)?,
                rooms: count("rooms", a.rooms, 1, 100_000)?,
                room_prefix: a.room_prefix.clone(),
                sources: count("sources", a.sources, 1, 254)?,
                connect_concurrency: a.common.connect_concurrency,
                connect_timeout: secs("connect-timeout", a.common.connect_timeout, false)?,
                server_pids: a.common.server_pids.clone(),
                hold: secs("hold", a.hold, true)?,
                settle: secs("settle", a.settle, true)?,
                threads: a.common.threads,
            };
            Ok((Job::Idle(cfg), a.common.allow_remote))
        }
        Cmd::Floor(a) => {
            let connections = count("connections", a.connections, 1, MAX_CONNECTIONS / 2)?;
            let cpu = |v: i64| usize::try_from(v).ok();
            let cfg = floor::FloorCfg {
                connections,
                group: count("group", a.group, 1, connections)?,
                bursts: count("bursts", a.bursts, 1, 1_000_000)?,
                interval: secs("interval-us", a.interval_us as f64 / 1e6, true)?,
                size: count("size", a.size, 1, 1 << 20)?,
                mode: a.send_mode,
                sender_cpu: cpu(a.sender_cpu),
                reader_cpu: cpu(a.reader_cpu),
            };
            Ok((Job::Floor(cfg), false))
        }
    }
}

fn main() {
    payload::init_clock();
    let cli = Cli::parse();
    let (mut job, allow_remote) = match plan(cli) {
        Ok(j) => j,
        Err(UsageError(msg)) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    };
    if let Job::Floor(cfg) = job {
        std::process::exit(floor::run_floor(cfg));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(job.threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        for t in job.targets_mut() {
            if let Err(msg) = t.resolve(allow_remote).await {
                eprintln!("error: {msg}");
                return 2;
            }
        }
        match job {
            Job::Fanout(cfg, p) => fanout::run_fanout(cfg, p).await,
            Job::Ramp(cfg, p) => fanout::run_ramp(cfg, p).await,
            Job::Idle(cfg) => idle::run_idle(cfg).await,
            Job::Floor(_) => 2, // run above, without a runtime
        }
    });
    // Don't wait for stragglers (connections being torn down).
    rt.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<(Job, bool), UsageError> {
        let mut v = vec!["roomcast-bench"];
        v.extend_from_slice(args);
        plan(Cli::try_parse_from(v).map_err(|e| UsageError(e.to_string()))?)
    }

    #[test]
    fn defaults_and_contract_flags() {
        let (job, _) = parse(&["fanout"]).ok().unwrap();
        let Job::Fanout(cfg, p) = job else { panic!() };
        assert_eq!(
            (cfg.subscribers, cfg.rooms, cfg.publishers, cfg.size),
            (2000, 20, 20, 100)
        );
        assert_eq!(cfg.targets[0].url, "ws://127.0.0.1:8080");
        assert_eq!(cfg.protocol, Protocol::Json);
        assert_eq!(p.rate, 20.0);
        assert_eq!(p.warmup, Duration::from_secs(5));
        assert_eq!(p.duration, Duration::from_secs(20));
        assert_eq!(p.drain, Duration::from_secs(3));
        assert_eq!(p.threads, 1);

        let (job, _) = parse(&[
            "fanout",
            "--url",
            "ws://127.0.0.1:1",
            "--url",
            "ws://[::1]:2",
            "--protocol",
            "plain",
            "--subscribers",
            "10",
            "--rooms",
            "2",
            "--publishers",
            "3",
            "--rate",
            "5",
            "--size",
            "64",
            "--warmup",
            "0",
            "--duration",
            "1",
            "--drain",
            "0",
            "--room-prefix",
            "r",
            "--server-pid",
            &std::process::id().to_string(),
            "--redis-pid",
            &std::process::id().to_string(),
            "--threads",
            "2",
            "--connect-concurrency",
            "8",
        ])
        .ok()
        .unwrap();
        let Job::Fanout(cfg, _) = job else { panic!() };
        assert_eq!(cfg.targets.len(), 2);
        assert_eq!(cfg.redis_pids, [std::process::id()]);
        assert_eq!(cfg.protocol, Protocol::Plain);
        assert_eq!(cfg.room_name(1), "r1");

        // A history namespace's prefix (server config `[[namespaces]] prefix = "h."`).
        for prefix in ["h.", "live:"] {
            let (job, _) = parse(&["fanout", "--room-prefix", prefix]).ok().unwrap();
            let Job::Fanout(cfg, _) = job else { panic!() };
            assert_eq!(cfg.room_name(3), format!("{prefix}3"));
            assert!(!cfg.check_seq);
        }
        let (job, _) = parse(&["ramp", "--room-prefix", "h.", "--check-seq"])
            .ok()
            .unwrap();
        let Job::Ramp(cfg, _) = job else { panic!() };
        assert!(cfg.check_seq);

        let (job, _) = parse(&[
            "ramp",
            "--start-rate",
            "10",
            "--step",
            "2",
            "--step-duration",
            "5",
            "--max-p99-ms",
            "20",
            "--max-loss",
            "0.01",
            "--max-steps",
            "3",
        ])
        .ok()
        .unwrap();
        let Job::Ramp(_, p) = job else { panic!() };
        assert_eq!((p.start_rate, p.step, p.max_steps), (10.0, 2.0, 3));

        let (job, _) = parse(&[
            "idle",
            "--connections",
            "100",
            "--sources",
            "4",
            "--hold",
            "1",
            "--protocol",
            "raw",
        ])
        .ok()
        .unwrap();
        let Job::Idle(c) = job else { panic!() };
        assert_eq!((c.connections, c.sources, c.rooms), (100, 4, 100));
        assert_eq!(c.room_prefix, "idle-");
    }

    #[test]
    fn safety_refusals() {
        assert!(parse(&["fanout", "--url", "ws://10.1.2.3:8080"]).is_err());
        assert!(parse(&["fanout", "--url", "ws://example.com"]).is_err());
        assert!(parse(&["fanout", "--url", "ws://10.1.2.3:8080", "--allow-remote"]).is_ok());
        assert!(parse(&["fanout", "--duration", "4000"]).is_err());
        assert!(parse(&["fanout", "--duration", "0"]).is_err());
        assert!(parse(&["fanout", "--subscribers", "300000"]).is_err());
        assert!(parse(&["fanout", "--size", "10"]).is_err());
        assert!(parse(&["fanout", "--rate", "0"]).is_err());
        assert!(parse(&["fanout", "--room-prefix", "a&b="]).is_err());
        assert!(parse(&["fanout", "--check-seq", "--protocol", "raw"]).is_err());
        assert!(parse(&["fanout", "--redis-pid", "4000000000"]).is_err());
        assert!(parse(&["fanout", "--check-seq", "--protocol", "plain"]).is_err());
        assert!(parse(&["idle", "--connections", "200001"]).is_err());
        assert!(parse(&["ramp", "--step", "1"]).is_err());
        assert!(parse(&["ramp", "--max-steps", "100"]).is_err());
    }
}
