//! Targets (base URLs), the loopback safety check, and opening WebSocket
//! connections (TCP with optional source address, handshake, JSON welcome),
//! all under one timeout. Failures become short, countable kinds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::payload::{classify_json, JsonFrame};

pub type Ws = WebSocketStream<TcpStream>;

/// Wire protocol flavour (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// roomcast JSON mode: {url}/ws?room=R, welcome frame, op:send/msg frames.
    Json,
    /// roomcast raw mode: {url}/ws?room=R&format=raw, frames relayed verbatim.
    Raw,
    /// Generic raw-rooms server: {url}/R, frames relayed verbatim.
    Plain,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::Raw => "raw",
            Protocol::Plain => "plain",
        }
    }
}

/// A parsed `ws://host[:port][/base]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as given (for reports).
    pub url: String,
    /// Host as written (without brackets for IPv6).
    pub host: String,
    pub port: u16,
    /// Base path without trailing slash ("" for none).
    pub base: String,
    /// Resolved socket address (filled by `resolve`).
    pub addr: Option<SocketAddr>,
    /// A token for roomcast's `token=` parameter (`--token`), URL-safe as given.
    pub token: Option<String>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = if let Some(r) = url.strip_prefix("ws://") {
            r
        } else if url.starts_with("wss://") {
            return Err(format!(
                "{url}: wss:// is not supported (loopback benchmarking only needs ws://)"
            ));
        } else {
            return Err(format!("{url}: expected a ws:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains('?') || path.contains('#') {
            return Err(format!("{url}: base URL must not have a query or fragment"));
        }
        if authority.contains('@') {
            return Err(format!("{url}: credentials in URLs are not supported"));
        }
        let (host, port_str) = if let Some(after) = authority.strip_prefix('[') {
            let end = after
                .find(']')
                .ok_or_else(|| format!("{url}: unterminated IPv6 literal"))?;
            let host = &after[..end];
            let tail = &after[end + 1..];
            let port = match tail.strip_prefix(':') {
                Some(p) => Some(p),
                None if tail.is_empty() => None,
                None => return Err(format!("{url}: garbage after IPv6 literal")),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url}: missing host"));
        }
        let port = match port_str {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{url}: invalid port {p:?}"))?,
        };
        let addr = host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, port));
        Ok(Target {
            url: url.to_string(),
            host: host.to_string(),
            port,
            base: path.trim_end_matches('/').to_string(),
            addr,
            token: None,
        })
    }

    /// True if the host is a loopback literal or `localhost`.
    pub fn is_loopback(&self) -> bool {
        if self.host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => false,
        }
    }

    /// Resolves the host. `localhost` maps to 127.0.0.1 without DNS; other
    /// names are looked up (only reachable with `--allow-remote`), and the
    /// result must itself be loopback unless `allow_remote`.
    pub async fn resolve(&mut self, allow_remote: bool) -> Result<(), String> {
        if self.addr.is_some() {
            return Ok(());
        }
        if self.host.eq_ignore_ascii_case("localhost") {
            self.addr = Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port));
            return Ok(());
        }
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("{}: cannot resolve host: {e}", self.url))?;
        let addr = addrs
            .next()
            .ok_or_else(|| format!("{}: host resolved to no address", self.url))?;
        if !allow_remote && !addr.ip().is_loopback() {
            return Err(format!("{}: resolves to non-loopback {addr}", self.url));
        }
        self.addr = Some(addr);
        Ok(())
    }

    /// Path and query for joining `room` with `protocol`.
    pub fn path_for(&self, protocol: Protocol, room: &str) -> String {
        let token = self
            .token
            .as_ref()
            .map(|t| format!("&token={t}"))
            .unwrap_or_default();
        match protocol {
            Protocol::Json => format!("{}/ws?room={room}{token}", self.base),
            Protocol::Raw => format!("{}/ws?room={room}&format=raw{token}", self.base),
            Protocol::Plain => format!("{}/{room}", self.base),
        }
    }

    /// Full URL for joining `room`.
    pub fn url_for(&self, protocol: Protocol, room: &str) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("ws://{host}:{}{}", self.port, self.path_for(protocol, room))
    }
}

/// Room names are put into URLs unescaped, so keep them to a safe alphabet:
/// roomcast's own room alphabet (`A-Z a-z 0-9 _ - . : @`), all of which may
/// stand unescaped in a URL's path and query. A namespace prefix such as `h.`
/// or `live:` (e.g. one with history on) can be given as it is.
pub fn valid_room_prefix(p: &str) -> bool {
    p.len() <= 64
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'@'))
}

/// Source address for connection `i` with `k` sources: 127.0.0.(1 + i % k).
/// Only meaningful when the target is IPv4 loopback.
pub fn source_addr(i: usize, k: usize) -> IpAddr {
    let k = k.clamp(1, 254);
    let last = 1 + (i % k) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Read buffer for busy (fanout/ramp) connections.
pub const BUSY_READ_BUFFER: usize = 2 * 1024;
/// Read buffer for idle connections (keeps the generator small at 100k+).
pub const IDLE_READ_BUFFER: usize = 1024;

/// Small buffers: the generator holds many connections and messages are small.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(8 << 20))
        .max_frame_size(Some(8 << 20))
}

/// Why a connection attempt failed, as a short countable key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    pub kind: String,
    pub detail: String,
}

impl ConnectError {
    fn new(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        ConnectError {
            kind: kind.into(),
            detail: detail.into(),
        }
    }

    fn io(stage: &str, e: &std::io::Error) -> Self {
        let kind = match e.raw_os_error() {
            Some(24) => "emfile".to_string(),
            Some(23) => "enfile".to_string(),
            Some(99) => "eaddrnotavail".to_string(),
            Some(98) => "eaddrinuse".to_string(),
            Some(111) => "refused".to_string(),
            _ => format!("{stage}_{:?}", e.kind()).to_lowercase(),
        };
        ConnectError::new(kind, format!("{stage}: {e}"))
    }

    fn ws(e: WsError) -> Self {
        match e {
            WsError::Http(resp) => ConnectError::new(
                format!("http_{}", resp.status().as_u16()),
                format!("handshake rejected with HTTP {}", resp.status()),
            ),
            WsError::Io(io) => ConnectError::io("handshake", &io),
            other => ConnectError::new("handshake", other.to_string()),
        }
    }
}

/// Connect-failure counts by kind plus one example message per kind.
#[derive(Default)]
pub struct FailureLog {
    inner: Mutex<BTreeMap<String, (u64, String)>>,
}

impl FailureLog {
    pub fn add(&self, e: &ConnectError) {
        if let Ok(mut m) = self.inner.lock() {
            let ent = m.entry(e.kind.clone()).or_insert((0, e.detail.clone()));
            ent.0 += 1;
        }
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        match self.inner.lock() {
            Ok(m) => m.iter().map(|(k, (n, _))| (k.clone(), *n)).collect(),
            Err(_) => BTreeMap::new(),
        }
    }

    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    /// Human lines: counts, an example, and hints for the usual limits.
    pub fn describe(&self) -> Vec<String> {
        let m = match self.inner.lock() {
            Ok(m) => m.clone(),
            Err(_) => return Vec::new(),
        };
        let mut out = Vec::new();
        for (k, (n, ex)) in &m {
            let hint = match k.as_str() {
                "emfile" | "enfile" => {
                    " -- hit the open-file limit: raise it with ulimit -n (e.g. `ulimit -n 250000`)"
                }
                "eaddrnotavail" => {
                    " -- out of ephemeral ports: use more --sources (idle) or fewer connections"
                }
                _ => "",
            };
            out.push(format!("{n} x {k} (e.g. {ex}){hint}"));
        }
        out
    }
}

/// Opens one WebSocket: TCP connect (from `source` if given), handshake, and
/// in JSON mode waits for the welcome frame. The whole thing is bounded by
/// `timeout`.
pub async fn connect(
    target: &Target,
    protocol: Protocol,
    room: &str,
    source: Option<IpAddr>,
    timeout: Duration,
    read_buffer: usize,
) -> Result<Ws, ConnectError> {
    let fut = connect_inner(target, protocol, room, source, read_buffer);
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::new(
            "timeout",
            format!("no ready connection within {timeout:?}"),
        )),
    }
}

async fn connect_inner(
    target: &Target,
    protocol: Protocol,
    room: &str,
    source: Option<IpAddr>,
    read_buffer: usize,
) -> Result<Ws, ConnectError> {
    let addr = target
        .addr
        .ok_or_else(|| ConnectError::new("unresolved", "target address not resolved"))?;
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| ConnectError::io("socket", &e))?;
    if let Some(src) = source {
        let matches_family = matches!(
            (src, addr),
            (IpAddr::V4(_), SocketAddr::V4(_)) | (IpAddr::V6(_), SocketAddr::V6(_))
        );
        if matches_family {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| ConnectError::io("bind", &e))?;
        }
    }
    let tcp = socket
        .connect(addr)
        .await
        .map_err(|e| ConnectError::io("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let request = target
        .url_for(protocol, room)
        .into_client_request()
        .map_err(|e| ConnectError::new("bad_request", e.to_string()))?;
    let (mut ws, _resp) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config(read_buffer)))
            .await
            .map_err(ConnectError::ws)?;
    if protocol == Protocol::Json {
        // The first server frame must be the welcome.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match classify_json(t.as_str()) {
                    JsonFrame::Welcome => break,
                    JsonFrame::Error(code) => {
                        return Err(ConnectError::new(
                            format!("error_{code}"),
                            format!("error frame {code} instead of welcome"),
                        ))
                    }
                    _ => {
                        return Err(ConnectError::new(
                            "no_welcome",
                            "first frame was not a welcome",
                        ))
                    }
                },
                Some(Ok(Message::Close(f))) => {
                    let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Err(ConnectError::new(
                        format!("closed_{code}"),
                        format!("closed with {code} before welcome"),
                    ));
                }
                Some(Ok(_)) => continue, // ping/pong/binary: keep waiting
                Some(Err(e)) => return Err(ConnectError::ws(e)),
                None => {
                    return Err(ConnectError::new(
                        "closed",
                        "connection closed before welcome",
                    ))
                }
            }
        }
    }
    Ok(ws)
}

/// Reads the soft RLIMIT_NOFILE from /proc/self/limits.
pub fn open_file_limit() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    soft.parse().ok()
}

/// `::1` as the IPv6 loopback, for tests.
#[allow(dead_code)]
pub const V6_LOOPBACK: Ipv6Addr = Ipv6Addr::LOCALHOST;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_urls() {
        let t = Target::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.base.as_str()),
            ("127.0.0.1", 8080, "")
        );
        assert_eq!(t.addr, Some("127.0.0.1:8080".parse().unwrap()));
        let t = Target::parse("ws://localhost/base/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.base.as_str()),
            ("localhost", 80, "/base")
        );
        assert_eq!(t.addr, None);
        let t = Target::parse("ws://[::1]:9000/x").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.base.as_str()),
            ("::1", 9000, "/x")
        );
        assert_eq!(t.addr, Some(SocketAddr::new(IpAddr::V6(V6_LOOPBACK), 9000)));
        assert!(Target::parse("http://127.0.0.1").is_err());
        assert!(Target::parse("wss://127.0.0.1").is_err());
        assert!(Target::parse("ws://127.0.0.1:0").is_err());
        assert!(Target::parse("ws://127.0.0.1:99999").is_err());
        assert!(Target::parse("ws://:80").is_err());
        assert!(Target::parse("ws://127.0.0.1/ws?room=a").is_err());
        assert!(Target::parse("ws://u:p@127.0.0.1").is_err());
        assert!(Target::parse("ws://[::1").is_err());
    }

    #[test]
    fn loopback_check() {
        for u in [
            "ws://127.0.0.1:1",
            "ws://127.5.6.7",
            "ws://localhost:8080",
            "ws://LOCALHOST",
            "ws://[::1]:80",
        ] {
            assert!(Target::parse(u).unwrap().is_loopback(), "{u}");
        }
        for u in [
            "ws://10.0.0.1",
            "ws://example.com",
            "ws://[::2]",
            "ws://0.0.0.0:80",
            "ws://localhost.evil.com",
        ] {
            assert!(!Target::parse(u).unwrap().is_loopback(), "{u}");
        }
    }

    #[test]
    fn url_building() {
        let t = Target::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!(
            t.url_for(Protocol::Json, "bench-1"),
            "ws://127.0.0.1:8080/ws?room=bench-1"
        );
        assert_eq!(
            t.url_for(Protocol::Raw, "bench-1"),
            "ws://127.0.0.1:8080/ws?room=bench-1&format=raw"
        );
        assert_eq!(
            t.url_for(Protocol::Plain, "bench-1"),
            "ws://127.0.0.1:8080/bench-1"
        );
        let t = Target::parse("ws://[::1]:9/gw/").unwrap();
        assert_eq!(t.url_for(Protocol::Json, "r"), "ws://[::1]:9/gw/ws?room=r");
        let mut authed = t.clone();
        authed.token = Some("a.b.c".into());
        assert_eq!(
            authed.url_for(Protocol::Json, "r"),
            "ws://[::1]:9/gw/ws?room=r&token=a.b.c"
        );
        assert_eq!(t.url_for(Protocol::Plain, "r"), "ws://[::1]:9/gw/r");
        // The handshake request builder accepts what we build.
        assert!(t.url_for(Protocol::Raw, "r").into_client_request().is_ok());
    }

    #[test]
    fn sources_and_prefixes() {
        assert_eq!(source_addr(0, 4), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(source_addr(5, 4), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(source_addr(7, 1), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(
            source_addr(253, 1000),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 254))
        );
        assert!(valid_room_prefix("bench-"));
        // Namespace prefixes, e.g. one configured with history on the server.
        for p in ["h.", "live:", "team@", "a_b-c.d:e@"] {
            assert!(valid_room_prefix(p), "{p}");
            let room = format!("{p}0");
            let t = Target::parse("ws://127.0.0.1:8080/gw").unwrap();
            for proto in [Protocol::Json, Protocol::Raw, Protocol::Plain] {
                let url = t.url_for(proto, &room);
                let req = url.as_str().into_client_request().unwrap();
                // The room reaches the server as written, not cut at ':' or '@'.
                let pq = req.uri().path_and_query().unwrap().as_str().to_string();
                assert!(pq.contains(&room), "{url}: {pq}");
                assert_eq!(req.uri().host(), Some("127.0.0.1"), "{url}");
            }
        }
        assert!(!valid_room_prefix("a&b"));
        assert!(!valid_room_prefix("a b"));
        assert!(!valid_room_prefix("a/b"));
        assert!(!valid_room_prefix("a?b"));
        assert!(!valid_room_prefix("a#b"));
        assert!(!valid_room_prefix(&"x".repeat(65)));
    }

    #[test]
    fn failure_log_hints() {
        let log = FailureLog::default();
        let e = std::io::Error::from_raw_os_error(24);
        log.add(&ConnectError::io("connect", &e));
        log.add(&ConnectError::io("connect", &e));
        assert_eq!(log.total(), 2);
        assert_eq!(log.counts().get("emfile"), Some(&2));
        assert!(log.describe()[0].contains("raise it with ulimit -n"));
    }
}
