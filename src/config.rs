//! Configuration: layered sources → raw serde structs → a validated [`Config`].
//!
//! Layers, later ones winning: the embedded `config/default.toml` (every key
//! with its default), an optional file given by `--config PATH`, then
//! environment variables `ROOMCAST__SECTION__KEY`. Unknown keys and invalid
//! values are errors that name the key (`bus.kind: expected one of …`).
//! Tests build a [`Config`] from in-memory sources, never through the process
//! environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limit::Rate;
use crate::namespace::{Defaults, Namespaces, RawNamespace, RawRate};

/// The defaults, compiled in so the binary runs without any file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem, always naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{0}")]
    Source(String),
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("cluster", &self.cluster)
            .field("channel_prefix", &self.channel_prefix)
            .field("ping_interval", &self.ping_interval)
            .field("canary_interval", &self.canary_interval)
            .field("wait_replicas", &self.wait_replicas)
            .field("timeout", &self.timeout)
            .field("backoff_min", &self.backoff_min)
            .field("backoff_max", &self.backoff_max)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// `url` with its password (if any) replaced by `***`, for logs and errors
/// (each of a comma-separated list).
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
    match redis::parse_redis_url(url) {
        Some(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Some(_) => url.to_owned(),
        // Not a URL we can parse: do not risk echoing a secret.
        None if url.contains('@') => "<unparsable url with credentials>".to_owned(),
        None => url.to_owned(),
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// The validated configuration the program runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The rest of `[server]`: the internal listener and what a connection
    /// may cost before it is a WebSocket client.
    pub server: ServerConfig,
    /// Empty means "derive from the hostname" (see [`Config::node_id`]).
    pub node_id: String,
    pub bus: BusConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    /// Rules per room-name prefix, resolved with the defaults.
    pub namespaces: Namespaces,
    /// How long aggregated events are summed before they are published.
    pub aggregate_window: Duration,
    pub heartbeat: Heartbeat,
    pub presence: PresenceConfig,
    pub demo: DemoConfig,
    /// Threads that write batches to clients (`fanout.workers`; 0 in the
    /// file = one per core).
    pub fanout_workers: usize,
    /// Period over which clients are closed on shutdown.
    pub drain: Duration,
    pub log: LogConfig,
    /// The layered settings as read (for [`Config::to_toml`]).
    effective: Effective,
}

/// The raw settings a [`Config`] came from; not in its `Debug` output (it
/// would print secrets).
#[derive(Clone)]
struct Effective(Raw);

impl std::fmt::Debug for Effective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Effective { .. }")
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where `/metrics` and `/api/*` are served instead of `listen` (None: on `listen`).
    pub internal_listen: Option<SocketAddr>,
    /// A complete request head must arrive within this time of the accept or
    /// of the previous response (so this is also the keep-alive idle timeout).
    pub header_timeout: Duration,
    /// A connection must have its first response (a 101 for WebSocket) this soon.
    pub handshake_timeout: Duration,
    /// An `/api/publish` body must arrive within this time (else 408).
    pub body_timeout: Duration,
    /// HTTP connections not (yet) upgraded at once; beyond, the oldest is dropped.
    pub max_pending_connections: usize,
    /// Browser origins allowed to open WebSockets (empty: any).
    pub allowed_origins: Vec<String>,
    /// Load balancers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone)]
pub enum BusConfig {
    Memory { capacity: usize },
    Redis(RedisConfig),
}

#[derive(Clone)]
pub struct RedisConfig {
    /// As configured: one URL, or (cluster) seed URLs separated by commas.
    pub url: String,
    /// `bus.kind = "redis-cluster"`: a Redis Cluster, with sharded pub/sub.
    pub cluster: bool,
    /// The URLs of `url`, each checked: the server (or the cluster's seeds).
    pub seeds: Vec<String>,
    pub channel_prefix: String,
    pub ping_interval: Duration,
    /// How often a canary goes round the bus (zero: never); see `bus::redis`.
    pub canary_interval: Duration,
    /// Replicas that must have a history message before it is acked (WAIT).
    pub wait_replicas: u32,
    /// PEM file of the CA(s) a `rediss://` server's certificate must chain
    /// to; `None`: the system's trust store. Read again at every connect.
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// WebSocket clients accepted at once; 0 = unlimited.
    pub max_connections: usize,
    pub max_message_bytes: usize,
    pub max_rooms_per_connection: usize,
    pub outbound_queue_bytes: usize,
    pub read_buffer_bytes: usize,
    /// What one connection may publish (JSON `send`, raw frames).
    pub messages: Rate,
    /// What one connection may ask besides publishing (JSON `join`, `leave`, `ping`).
    pub commands: Rate,
    /// What one user may publish across its connections on the node.
    pub user_messages: Rate,
    /// New connections per second on the node.
    pub connections: Rate,
    /// Connections per client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Refusals in a row before a connection is closed with 4004 (0: never).
    pub abuse_threshold: u32,
}

/// How clients are authenticated (`[auth]`); see `auth.rs`.
#[derive(Clone)]
pub struct AuthConfig {
    /// `None`: tokens are not accepted, every client is anonymous.
    pub algorithm: Option<jsonwebtoken::Algorithm>,
    /// The HS256 secret, or the PEM of the RS256/ES256 public key.
    pub key: Vec<u8>,
    pub leeway: Duration,
    pub anonymous: bool,
    pub anonymous_send: bool,
    pub close_on_expiry: bool,
    pub max_info_bytes: usize,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithm", &self.algorithm)
            .field("key", &"(redacted)")
            .field("leeway", &self.leeway)
            .field("anonymous", &self.anonymous)
            .field("anonymous_send", &self.anonymous_send)
            .field("close_on_expiry", &self.close_on_expiry)
            .field("max_info_bytes", &self.max_info_bytes)
            .finish()
    }
}

/// Who may use `/api/*`.
#[derive(Clone)]
pub struct ApiConfig {
    /// Accepted `Authorization: Bearer` keys (`api.keys`).
    pub keys: Vec<String>,
    /// No key needed (`api.open`); never together with keys.
    pub open: bool,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .field("open", &self.open)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Cluster-wide online counts (`presence/`).
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// How often this node writes its rooms' local counts; other nodes count
    /// a report for 1.5 of these and read every quarter of one.
    pub report_interval: Duration,
    /// Least time between two presence frames to one room's members.
    pub throttle: Duration,
    /// How long a room's watch time is kept after it was last added to.
    pub watch_ttl: Duration,
}

/// The demo page at `/` and its development tokens.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Serve the live-room demo page at `/`.
    pub enabled: bool,
    /// Hand out signed tokens at `/demo/token?user=…` to anyone who asks:
    /// for trying the demo with names, never for production.
    pub dev_tokens: bool,
}

/// Shortest `presence.report_interval`: every node reads its rooms'
/// counts four times per interval.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    pub level: String,
}

// ---- raw shapes, exactly as written in TOML / env ----

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
    server: RawServer,
    node: RawNode,
    bus: RawBus,
    limits: RawLimits,
    auth: RawAuth,
    api: RawApi,
    aggregate: RawAggregate,
    heartbeat: RawHeartbeat,
    presence: RawPresence,
    demo: RawDemo,
    fanout: RawFanout,
    shutdown: RawShutdown,
    log: RawLog,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    internal_listen: String,
    header_timeout: String,
    handshake_timeout: String,
    body_timeout: String,
    max_pending_connections: usize,
    allowed_origins: String,
    trusted_proxies: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawBus {
    kind: String,
    memory_capacity: usize,
    redis: RawRedis,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    channel_prefix: String,
    ping_interval: String,
    canary_interval: String,
    wait_replicas: u32,
    tls_ca_file: String,
    timeout: String,
    backoff_min: String,
    backoff_max: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: usize,
    max_message_bytes: usize,
    max_rooms_per_connection: usize,
    outbound_queue_bytes: usize,
    read_buffer_bytes: usize,
    messages_per_second: u32,
    messages_burst: u32,
    commands_per_second: u32,
    commands_burst: u32,
    #[serde(default)]
    events: std::collections::BTreeMap<String, RawRate>,
    user_messages_per_second: u32,
    user_messages_burst: u32,
    connections_per_second: u32,
    connections_burst: u32,
    max_connections_per_ip: usize,
    abuse_threshold: u32,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    events: Vec<String>,
    window: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    algorithm: String,
    secret: String,
    public_key_file: String,
    leeway: String,
    anonymous: bool,
    anonymous_send: bool,
    close_on_expiry: bool,
    max_info_bytes: usize,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawApi {
    keys: String,
    open: bool,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawHeartbeat {
    interval: String,
    timeout: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawPresence {
    report_interval: String,
    throttle: String,
    watch_ttl: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawFanout {
    workers: usize,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawDemo {
    enabled: bool,
    dev_tokens: bool,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
    level: String,
}

/// A variable that looks meant for roomcast must name a setting
/// (`ROOMCAST__SECTION__KEY`): a typo must not leave a node silently running
/// on defaults. "Looks meant" is: it starts with `ROOMCAST__`, or it starts
/// with `ROOMCAST_` and has a `__` in it, or it spells a setting with other
/// underscores (`ROOMCAST_BUS_KIND`). Other `ROOMCAST_…` names (say a
/// script's `ROOMCAST_BIN`) are not ours to judge.
fn check_env_names(env: &[(String, String)]) -> Result<(), ConfigError> {
    let known = known_keys();
    let squash = |s: &str| s.to_ascii_lowercase().replace(['_', '.'], "");
    for (name, _) in env {
        let Some(rest) = name.strip_prefix("ROOMCAST_") else {
            continue;
        };
        let exact = rest
            .strip_prefix('_')
            .map(|r| r.to_ascii_lowercase().replace("__", "."));
        if exact.as_ref().is_some_and(|k| known.contains(k)) {
            continue;
        }
        // The setting it spells, ignoring how the underscores are placed.
        let meant = known.iter().find(|k| squash(k) == squash(rest));
        if exact.is_none() && !rest.contains("__") && meant.is_none() {
            continue;
        }
        let which = exact
            .filter(|k| !k.is_empty())
            .map(|k| format!("there is no key {k}; "))
            .unwrap_or_default();
        let hint = meant
            .map(|k| {
                format!(
                    "; did you mean ROOMCAST__{}?",
                    k.to_ascii_uppercase().replace('.', "__")
                )
            })
            .unwrap_or_default();
        return Err(ConfigError::Invalid {
            key: name.clone(),
            message: format!(
                "not a roomcast setting ({which}variables are ROOMCAST__SECTION__KEY, with two underscores; keys are in config/default.toml){hint}"
            ),
        });
    }
    Ok(())
}

/// The dotted keys of every setting (from the embedded defaults).
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&key, t, out),
                _ => out.push(key),
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(table) = DEFAULT_TOML.parse::<toml::Table>() {
        walk("", &table, &mut out);
    }
    out
}

/// A log filter is a comma-separated list of levels or `target=level`
/// directives. Stricter than `EnvFilter`, which takes any bare word as a
/// target name — so a typo like "inf" would silence every log line.
fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    let bad = |why: String| {
        invalid(
            key,
            format!("{filter:?} is not a log filter ({why}); use a level (trace, debug, info, warn, error, off) or target=level, comma-separated"),
        )
    };
    if filter.trim().is_empty() {
        return Err(bad("empty".into()));
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() && is_level(level) => {}
            Some(_) => return Err(bad(format!("{directive:?} needs target=level"))),
            None if is_level(directive) => {}
            None => return Err(bad(format!("{directive:?} is not a level"))),
        }
    }
    if tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .is_err()
    {
        return Err(bad("rejected by the filter parser".into()));
    }
    Ok(())
}

impl Config {
    /// Load from the layered sources: defaults, then `file`, then the
    /// `ROOMCAST__…` entries of `env` (pass `std::env::vars()` in `main`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        check_env_names(&env)?;
        if let Some((_, filter)) = env.iter().find(|(k, _)| k == "RUST_LOG") {
            check_log_filter("RUST_LOG", filter)?;
        }
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ROOMCAST__"))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("ROOMCAST")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let layered = builder
            .build()
            .map_err(|e| ConfigError::Source(e.to_string()))?;
        let raw: Raw = serde_path_to_error::deserialize(layered).map_err(|e| {
            let key = e.path().to_string();
            invalid(&key, e.into_inner().to_string())
        })?;
        raw.validate()
    }

    /// The effective configuration as TOML with the file's key names, secrets
    /// redacted: what `--check-config` prints, and a valid `--config` file.
    pub fn to_toml(&self) -> String {
        let mut raw = self.effective.0.clone();
        raw.bus.redis.url = redact_url(&raw.bus.redis.url);
        if !raw.auth.secret.is_empty() {
            raw.auth.secret = "REDACTED_SECRET_".repeat(2);
        }
        // Stand-ins that still read back as keys.
        raw.api.keys = (1..=self.api.keys.len())
            .map(|i| format!("REDACTED_API_KEY_{i}"))
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }

    /// The node id: configured, or the hostname plus a random suffix.
    pub fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let host = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "node".to_owned());
        format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            format!("invalid duration {value:?} ({e}); use e.g. \"250ms\", \"25s\""),
        )
    })
}

fn positive(key: &str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(value)
}

impl Raw {
    fn validate(self) -> Result<Config, ConfigError> {
        let effective = self.clone();
        let address = |key: &str, value: &str| -> Result<SocketAddr, ConfigError> {
            value.parse().map_err(|_| {
                invalid(
                    key,
                    format!("{value:?} is not an address like 127.0.0.1:8080"),
                )
            })
        };
        let s = &self.server;
        let listen = address("server.listen", &s.listen)?;
        let internal_listen = match s.internal_listen.as_str() {
            "" => None,
            addr => {
                let addr = address("server.internal_listen", addr)?;
                if addr == listen {
                    return Err(invalid(
                        "server.internal_listen",
                        "must differ from server.listen (leave it empty to serve everything there)",
                    ));
                }
                Some(addr)
            }
        };
        if s.max_pending_connections == 0 {
            return Err(invalid(
                "server.max_pending_connections",
                "must be at least 1",
            ));
        }
        let server = ServerConfig {
            internal_listen,
            header_timeout: nonzero_duration("server.header_timeout", &s.header_timeout)?,
            handshake_timeout: nonzero_duration("server.handshake_timeout", &s.handshake_timeout)?,
            body_timeout: nonzero_duration("server.body_timeout", &s.body_timeout)?,
            max_pending_connections: s.max_pending_connections,
            allowed_origins: list(&s.allowed_origins),
            trusted_proxies: list(&s.trusted_proxies)
                .iter()
                .map(|ip| {
                    ip.parse().map_err(|_| {
                        invalid(
                            "server.trusted_proxies",
                            format!("{ip:?} is not an IP address"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let node_id = self.node.id;
        if node_id.len() > 64
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "node.id",
                "use at most 64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        let bus = match self.bus.kind.as_str() {
            "memory" => BusConfig::Memory {
                capacity: positive("bus.memory_capacity", self.bus.memory_capacity)?,
            },
            kind @ ("redis" | "redis-cluster") => {
                let r = self.bus.redis;
                let cluster = kind == "redis-cluster";
                let seeds: Vec<String> = match cluster {
                    true => r
                        .url
                        .split(',')
                        .map(|u| u.trim().to_owned())
                        .filter(|u| !u.is_empty())
                        .collect(),
                    false => vec![r.url.clone()],
                };
                let mut parsed = Vec::with_capacity(seeds.len());
                for seed in &seeds {
                    match redis::parse_redis_url(seed) {
                        Some(url) => parsed.push(url),
                        None => {
                            return Err(invalid(
                                "bus.redis.url",
                                format!(
                                    "{:?} is not a redis:// or rediss:// URL{}",
                                    redact_url(seed),
                                    if cluster {
                                        " (seeds are separated by commas)"
                                    } else {
                                        ""
                                    }
                                ),
                            ))
                        }
                    }
                }
                let Some(url) = parsed.first().cloned() else {
                    return Err(invalid(
                        "bus.redis.url",
                        "with bus.kind = \"redis-cluster\", give at least one seed URL",
                    ));
                };
                if parsed.iter().any(|u| u.scheme() != url.scheme()) {
                    return Err(invalid(
                        "bus.redis.url",
                        "every seed must use the same scheme (redis:// or rediss://)",
                    ));
                }
                let tls_ca_file = match r.tls_ca_file.as_str() {
                    "" => None,
                    path => {
                        if url.scheme() != "rediss" {
                            return Err(invalid(
                                "bus.redis.tls_ca_file",
                                "is only used with a rediss:// bus.redis.url",
                            ));
                        }
                        if let Err(e) = std::fs::read(path) {
                            return Err(invalid(
                                "bus.redis.tls_ca_file",
                                format!("cannot read {path:?}: {e}"),
                            ));
                        }
                        Some(std::path::PathBuf::from(path))
                    }
                };
                let backoff_min = duration("bus.redis.backoff_min", &r.backoff_min)?;
                let backoff_max = duration("bus.redis.backoff_max", &r.backoff_max)?;
                if backoff_max < backoff_min {
                    return Err(invalid(
                        "bus.redis.backoff_max",
                        "must be at least bus.redis.backoff_min",
                    ));
                }
                // A brace would make a history room's keys hash apart from
                // its channel in a Redis Cluster (bus/redis/history.rs).
                if r.channel_prefix.contains(['{', '}']) {
                    return Err(invalid(
                        "bus.redis.channel_prefix",
                        "must not contain { or }: a room's channel and history keys share its name as their hash tag",
                    ));
                }
                BusConfig::Redis(RedisConfig {
                    url: r.url,
                    cluster,
                    seeds,
                    channel_prefix: r.channel_prefix,
                    ping_interval: nonzero_duration("bus.redis.ping_interval", &r.ping_interval)?,
                    canary_interval: duration("bus.redis.canary_interval", &r.canary_interval)?,
                    wait_replicas: r.wait_replicas,
                    timeout: nonzero_duration("bus.redis.timeout", &r.timeout)?,
                    backoff_min,
                    backoff_max,
                    tls_ca_file,
                })
            }
            other => {
                return Err(invalid(
                    "bus.kind",
                    format!("{other:?} is not one of \"memory\", \"redis\", \"redis-cluster\""),
                ))
            }
        };
        let l = self.limits;
        let l_events = l.events.clone();
        let limits = Limits {
            max_connections: l.max_connections,
            max_message_bytes: positive("limits.max_message_bytes", l.max_message_bytes)?,
            max_rooms_per_connection: positive(
                "limits.max_rooms_per_connection",
                l.max_rooms_per_connection,
            )?,
            outbound_queue_bytes: positive("limits.outbound_queue_bytes", l.outbound_queue_bytes)?,
            read_buffer_bytes: positive("limits.read_buffer_bytes", l.read_buffer_bytes)?,
            messages: rate(
                "limits.messages_burst",
                l.messages_per_second,
                l.messages_burst,
            )?,
            commands: rate(
                "limits.commands_burst",
                l.commands_per_second,
                l.commands_burst,
            )?,
            user_messages: rate(
                "limits.user_messages_burst",
                l.user_messages_per_second,
                l.user_messages_burst,
            )?,
            connections: rate(
                "limits.connections_burst",
                l.connections_per_second,
                l.connections_burst,
            )?,
            max_connections_per_ip: l.max_connections_per_ip,
            abuse_threshold: l.abuse_threshold,
        };
        let auth = auth(self.auth)?;
        for event in &self.aggregate.events {
            if event.is_empty() || event.len() > crate::protocol::MAX_EVENT_LEN {
                return Err(invalid(
                    "aggregate.events",
                    format!("{event:?} is not an event name (1-128 bytes)"),
                ));
            }
        }
        let aggregate_window = nonzero_duration("aggregate.window", &self.aggregate.window)?;
        let namespaces = Namespaces::new(
            Defaults {
                anonymous_join: auth.anonymous,
                anonymous_send: auth.anonymous_send,
                max_message_bytes: limits.max_message_bytes,
                messages: limits.messages,
                aggregate: &self.aggregate.events,
                events: &l_events,
            },
            &self.namespaces,
        )
        .map_err(|(key, message)| invalid(&key, message))?;
        let api = api(self.api)?;
        let heartbeat = Heartbeat {
            interval: nonzero_duration("heartbeat.interval", &self.heartbeat.interval)?,
            timeout: nonzero_duration("heartbeat.timeout", &self.heartbeat.timeout)?,
        };
        if heartbeat.timeout <= heartbeat.interval {
            return Err(invalid(
                "heartbeat.timeout",
                "must be longer than heartbeat.interval",
            ));
        }
        let presence = presence(&self.presence)?;
        if self.demo.dev_tokens && auth.algorithm != Some(jsonwebtoken::Algorithm::HS256) {
            return Err(invalid(
                "demo.dev_tokens",
                "needs auth.algorithm = \"HS256\" (the node signs the tokens with auth.secret)",
            ));
        }
        let fanout_workers = match self.fanout.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n if n > crate::fanout::MAX_WORKERS => {
                return Err(invalid(
                    "fanout.workers",
                    format!("at most {} (0: one per core)", crate::fanout::MAX_WORKERS),
                ))
            }
            n => n,
        }
        .min(crate::fanout::MAX_WORKERS);
        let demo = DemoConfig {
            enabled: self.demo.enabled,
            dev_tokens: self.demo.dev_tokens,
        };
        let json = match self.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ))
            }
        };
        check_log_filter("log.level", &self.log.level)?;
        Ok(Config {
            listen,
            server,
            node_id,
            bus,
            limits,
            auth,
            api,
            namespaces,
            aggregate_window,
            heartbeat,
            presence,
            demo,
            fanout_workers,
            drain: duration("shutdown.drain", &self.shutdown.drain)?,
            log: LogConfig {
                json,
                level: self.log.level,
            },
            effective: Effective(effective),
        })
    }
}

fn presence(raw: &RawPresence) -> Result<PresenceConfig, ConfigError> {
    let report_interval = nonzero_duration("presence.report_interval", &raw.report_interval)?;
    if report_interval < MIN_REPORT_INTERVAL {
        return Err(invalid(
            "presence.report_interval",
            format!("must be at least {MIN_REPORT_INTERVAL:?}"),
        ));
    }
    let watch_ttl = nonzero_duration("presence.watch_ttl", &raw.watch_ttl)?;
    if watch_ttl <= report_interval {
        return Err(invalid(
            "presence.watch_ttl",
            "must be longer than presence.report_interval",
        ));
    }
    Ok(PresenceConfig {
        report_interval,
        throttle: nonzero_duration("presence.throttle", &raw.throttle)?,
        watch_ttl,
    })
}

/// The non-empty entries of a comma-separated list.
fn list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
const MIN_HS256_SECRET: usize = 32;

fn auth(raw: RawAuth) -> Result<AuthConfig, ConfigError> {
    use jsonwebtoken::Algorithm;
    let algorithm = match raw.algorithm.as_str() {
        "" => None,
        "HS256" => Some(Algorithm::HS256),
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        other => {
            return Err(invalid(
                "auth.algorithm",
                format!("{other:?} is not one of \"\", \"HS256\", \"RS256\", \"ES256\""),
            ))
        }
    };
    let key = match algorithm {
        None => {
            if !raw.anonymous {
                return Err(invalid(
                    "auth.anonymous",
                    "cannot be false without auth.algorithm: no client could connect",
                ));
            }
            Vec::new()
        }
        Some(Algorithm::HS256) => {
            if !raw.public_key_file.is_empty() {
                return Err(invalid(
                    "auth.public_key_file",
                    "is for RS256 / ES256; HS256 uses auth.secret",
                ));
            }
            if raw.secret.len() < MIN_HS256_SECRET {
                return Err(invalid(
                    "auth.secret",
                    format!("HS256 needs a secret of at least {MIN_HS256_SECRET} bytes"),
                ));
            }
            raw.secret.clone().into_bytes()
        }
        Some(_) => {
            if !raw.secret.is_empty() {
                return Err(invalid(
                    "auth.secret",
                    "is for HS256; RS256 / ES256 use auth.public_key_file",
                ));
            }
            if raw.public_key_file.is_empty() {
                return Err(invalid(
                    "auth.public_key_file",
                    format!("{} needs the PEM file of the public key", raw.algorithm),
                ));
            }
            std::fs::read(&raw.public_key_file).map_err(|e| {
                invalid(
                    "auth.public_key_file",
                    format!("cannot read {:?}: {e}", raw.public_key_file),
                )
            })?
        }
    };
    let config = AuthConfig {
        algorithm,
        key,
        leeway: duration("auth.leeway", &raw.leeway)?,
        anonymous: raw.anonymous,
        anonymous_send: raw.anonymous_send,
        close_on_expiry: raw.close_on_expiry,
        max_info_bytes: positive("auth.max_info_bytes", raw.max_info_bytes)?,
    };
    // A key that does not parse is refused now, not at the first client.
    crate::auth::Verifier::new(&config).map_err(|e| invalid("auth.public_key_file", e))?;
    Ok(config)
}

/// Shortest API key accepted.
const MIN_API_KEY_LEN: usize = 16;

fn api(raw: RawApi) -> Result<ApiConfig, ConfigError> {
    let keys: Vec<String> = raw
        .keys
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(i) = keys
        .iter()
        .position(|k| k.len() < MIN_API_KEY_LEN || !k.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid(
            "api.keys",
            format!(
                "key {} (of {}) is not at least {MIN_API_KEY_LEN} printable characters without spaces",
                i + 1,
                keys.len()
            ),
        ));
    }
    if raw.open && !keys.is_empty() {
        return Err(invalid(
            "api.open",
            "cannot be set together with api.keys: either the API needs a key or it does not",
        ));
    }
    Ok(ApiConfig {
        keys,
        open: raw.open,
    })
}

/// A rate and its burst; the burst must allow one message when the rate is set.
fn rate(burst_key: &str, per_second: u32, burst: u32) -> Result<Rate, ConfigError> {
    if per_second > 0 && burst == 0 {
        let rate_key = burst_key.replace("_burst", "_per_second");
        return Err(invalid(
            burst_key,
            format!("must be at least 1 when {rate_key} is set"),
        ));
    }
    Ok(Rate { per_second, burst })
}

fn nonzero_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration(key, value)?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(matches!(c.bus, BusConfig::Memory { .. }));
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.limits.max_rooms_per_connection, 32);
        assert_eq!(c.heartbeat.interval, Duration::from_secs(25));
        assert_eq!(c.drain, Duration::from_secs(10));
        assert_eq!(c.presence.report_interval, Duration::from_secs(2));
        assert_eq!(c.presence.throttle, Duration::from_secs(2));
        assert_eq!(c.presence.watch_ttl, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let c = Config::load(
            None,
            env(&[
                ("ROOMCAST__BUS__KIND", "redis"),
                ("ROOMCAST__BUS__REDIS__URL", "redis://127.0.0.1:7000"),
                ("ROOMCAST__LIMITS__MAX_MESSAGE_BYTES", "1024"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        match c.bus {
            BusConfig::Redis(r) => assert_eq!(r.url, "redis://127.0.0.1:7000"),
            other => panic!("expected redis bus, got {other:?}"),
        }
        assert_eq!(c.limits.max_message_bytes, 1024);
    }

    #[test]
    fn a_redis_cluster_takes_comma_separated_seeds_and_names_the_key_when_they_are_bad() {
        let load = |url: &str| {
            Config::load(
                None,
                env(&[
                    ("ROOMCAST__BUS__KIND", "redis-cluster"),
                    ("ROOMCAST__BUS__REDIS__URL", url),
                ]),
            )
        };
        match load("redis://10.0.0.1:7000, redis://:secret@10.0.0.2:7000")
            .unwrap()
            .bus
        {
            BusConfig::Redis(r) => {
                assert!(r.cluster);
                assert_eq!(
                    r.seeds,
                    ["redis://10.0.0.1:7000", "redis://:secret@10.0.0.2:7000"]
                );
                assert!(!format!("{r:?}").contains("secret"), "{r:?}");
            }
            other => panic!("expected redis bus, got {other:?}"),
        }
        for bad in [
            "",
            " , ",
            "redis://a:1,http://b:2",
            "redis://a:1,rediss://b:2",
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.starts_with("bus.redis.url:"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("ROOMCAST__BUS__KIND", "kafka", "bus.kind"),
            (
                "ROOMCAST__HEARTBEAT__INTERVAL",
                "soon",
                "heartbeat.interval",
            ),
            ("ROOMCAST__SERVER__LISTEN", "nowhere", "server.listen"),
            (
                "ROOMCAST__LIMITS__MAX_MESSAGE_BYTES",
                "lots",
                "limits.max_message_bytes",
            ),
            ("ROOMCAST__SERVER__COLOUR", "blue", "colour"),
            ("ROOMCAST__LOG__FORMAT", "xml", "log.format"),
            (
                "ROOMCAST__PRESENCE__REPORT_INTERVAL",
                "10ms",
                "presence.report_interval",
            ),
            ("ROOMCAST__PRESENCE__THROTTLE", "0s", "presence.throttle"),
            ("ROOMCAST__PRESENCE__WATCH_TTL", "1s", "presence.watch_ttl"),
        ];
        for (key, value, named) in cases {
            let err = Config::load(None, env(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(named),
                "{key}={value}: error {err:?} does not name {named}"
            );
        }
        let braces = env(&[
            ("ROOMCAST__BUS__KIND", "redis"),
            ("ROOMCAST__BUS__REDIS__CHANNEL_PREFIX", "rc{1}:"),
        ]);
        let err = Config::load(None, braces).unwrap_err().to_string();
        assert!(err.contains("bus.redis.channel_prefix"), "{err}");
    }
}
