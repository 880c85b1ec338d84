//! Helpers for the integration tests: a real `redis-server` on a free port,
//! gateway nodes on `127.0.0.1:0`, and real WebSocket clients.
//!
//! Everything waits with a timeout; nothing sleeps to synchronize.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use roomcast::Config;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long any single awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Await `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Poll `check` every 20 ms until it returns true, failing after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        loop {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Run `openssl` with `args` in `dir` (test certificates and keys).
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install it with `apt-get install -y openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

// ---------------------------------------------------------------- Redis

/// Held by the tests that kill or freeze Redis processes mid-stream (the
/// Redis-fault and Redis Cluster tests), so that they do not run at once:
/// six cluster processes starving a Redis that is being killed would widen
/// the windows those tests measure, not test roomcast.
pub static REDIS_FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A private `redis-server` on a free port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// A server on a free port. Another process may take the port between
    /// our check and redis-server's bind; then it exits, and we try another.
    pub async fn start() -> Redis {
        Redis::start_with(Vec::new).await
    }

    /// A server on a free port with more arguments (built afresh on every
    /// attempt, so they can name other free ports, e.g. `--tls-port`).
    pub async fn start_with(args: impl Fn() -> Vec<String>) -> Redis {
        for _ in 0..5 {
            if let Some(redis) = Redis::try_start_on(free_port(), &args()).await {
                return redis;
            }
        }
        panic!("redis-server did not start in 5 attempts")
    }

    /// A server on `port` (e.g. the port of one that was killed, to restart it).
    pub async fn start_on(port: u16) -> Redis {
        Redis::start_on_with(port, &[]).await
    }

    /// [`Redis::start_on`] with more arguments (e.g. the persistence of the
    /// server it replaces).
    pub async fn start_on_with(port: u16, extra: &[String]) -> Redis {
        Redis::try_start_on(port, extra)
            .await
            .unwrap_or_else(|| panic!("redis-server could not start on port {port}"))
    }

    async fn try_start_on(port: u16, extra: &[String]) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}). These tests need a real Redis: \
                     install it with `apt-get install -y redis-server` (Debian/Ubuntu) or `brew install redis`."
                )
            });
        let mut redis = Redis {
            port,
            child: Some(child),
        };
        let up = within("redis-server to answer PING (or exit)", async {
            loop {
                if redis.ping().await {
                    return true;
                }
                if let Some(child) = redis.child.as_mut() {
                    if child.try_wait().expect("try_wait").is_some() {
                        return false;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        up.then_some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether the server answers PING (on a fresh connection).
    pub async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    /// Run one command on a fresh connection.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args).await.expect("redis command")
    }

    /// [`Redis::cmd`], answering Redis's error instead of failing on it.
    pub async fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// Subscribers of one room's channel, across all nodes.
    pub async fn numsub(&self, room: &str) -> i64 {
        self.channel_numsub(&format!("roomcast:room:{room}")).await
    }

    /// Subscribers of a channel, across all nodes.
    pub async fn channel_numsub(&self, channel: &str) -> i64 {
        let reply: Vec<redis::Value> = self.cmd(&["PUBSUB", "NUMSUB", channel]).await;
        match reply.get(1) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("unexpected NUMSUB reply {other:?}"),
        }
    }

    /// Send a signal (e.g. "STOP", "CONT") to the server process.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis is running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} redis");
    }

    /// Kill the server (SIGKILL) and wait for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- gateway nodes

/// Configuration for a test node: defaults plus `ROOMCAST__…` style overrides.
/// The API key every test node accepts (and [`http`] presents).
pub const TEST_API_KEY: &str = "test-api-key-0123456789";

pub fn config(overrides: &[(&str, &str)]) -> Config {
    let mut env: Vec<(String, String)> = vec![
        ("ROOMCAST__SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("ROOMCAST__API__KEYS".into(), TEST_API_KEY.into()),
    ];
    env.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Config::load(None, env).unwrap_or_else(|e| panic!("test config: {e}"))
}

/// A node configuration from a TOML file (namespaces need one) plus `env`.
pub fn file_config(toml: &str, env: &[(&str, &str)]) -> roomcast::Config {
    let path = std::env::temp_dir().join(format!(
        "roomcast-limits-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, toml).expect("write config");
    let mut all = vec![
        (
            "ROOMCAST__SERVER__LISTEN".to_string(),
            "127.0.0.1:0".to_string(),
        ),
        ("ROOMCAST__API__KEYS".to_string(), TEST_API_KEY.to_string()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = roomcast::Config::load(Some(&path), all);
    let _ = std::fs::remove_file(&path);
    config.unwrap_or_else(|e| panic!("test config: {e}"))
}

/// The `ROOMCAST__…` settings of a node on the given Redis: its URL, this
/// node id, and timings that notice a failure within a second.
pub fn redis_env(redis: &Redis, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ROOMCAST__BUS__KIND", "redis".into()),
        ("ROOMCAST__BUS__REDIS__URL", redis.url()),
        ("ROOMCAST__BUS__REDIS__PING_INTERVAL", "200ms".into()),
        ("ROOMCAST__BUS__REDIS__TIMEOUT", "500ms".into()),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MIN", "50ms".into()),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MAX", "300ms".into()),
        ("ROOMCAST__NODE__ID", node.into()),
    ]
}

/// Configuration for a node on the given Redis.
pub fn redis_config(redis: &Redis, node: &str, extra: &[(&str, &str)]) -> Config {
    let env = redis_env(redis, node);
    let mut overrides: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    overrides.extend_from_slice(extra);
    config(&overrides)
}

/// A gateway node running in this process on a free port.
pub struct Node {
    pub addr: SocketAddr,
    /// The internal listener (`/metrics`, `/api/*`), when the node has one.
    pub internal: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Node {
    pub async fn start(config: Config) -> Node {
        Node::start_with(config, false).await
    }

    /// A node that serves `/metrics` and `/api/*` on a second listener.
    pub async fn start_with(config: Config, internal: bool) -> Node {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Node::start_at(config, any, internal.then_some(any)).await
    }

    /// A node on given addresses (port 0: any), e.g. a restart on the
    /// addresses of a node that has finished.
    pub async fn start_at(config: Config, addr: SocketAddr, internal: Option<SocketAddr>) -> Node {
        let bind = |a: SocketAddr| async move {
            TcpListener::bind(a)
                .await
                .unwrap_or_else(|e| panic!("bind node on {a}: {e}"))
        };
        let public = bind(addr).await;
        let addr = public.local_addr().expect("node addr");
        let internal = match internal {
            Some(a) => Some(bind(a).await),
            None => None,
        };
        let internal_addr = internal
            .as_ref()
            .map(|l| l.local_addr().expect("internal addr"));
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let listeners = roomcast::server::Listeners { public, internal };
        let task = tokio::spawn(async move {
            roomcast::run(listeners, config, prometheus::Registry::new(), token)
                .await
                .expect("roomcast::run");
        });
        Node {
            addr,
            internal: internal_addr,
            shutdown,
            task: Some(task),
        }
    }

    /// A node that is ready (bus up) before it is returned.
    pub async fn ready(config: Config) -> Node {
        let node = Node::start(config).await;
        node.wait_ready(200).await;
        node
    }

    pub async fn wait_ready(&self, status: u16) {
        eventually(
            &format!("/readyz on {} to answer {status}", self.addr),
            || async { self.get("/readyz").await.0 == status },
        )
        .await;
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// A plain HTTP/1.1 request; returns (status, body).
    pub async fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(self.addr, method, path, body).await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "").await
    }

    /// The value of an unlabelled metric (or the first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        metric_value(&body, name).unwrap_or_else(|| panic!("metric {name} not found in:\n{body}"))
    }

    /// Begin graceful shutdown (like SIGTERM) without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn finished(&mut self) {
        if let Some(task) = self.task.take() {
            within("node to finish", task).await.expect("node task");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

/// A plain HTTP/1.1 request presenting [`TEST_API_KEY`]; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {TEST_API_KEY}\r\n");
    http_with(addr, method, path, &auth, body).await
}

/// [`http`] with these header lines (each ending in CRLF) instead of the API key.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    within(&format!("HTTP {method} {path}"), async {
        let mut s = TcpStream::connect(addr).await.expect("connect for HTTP");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write HTTP request");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.expect("read HTTP response");
        let resp = String::from_utf8_lossy(&resp).to_string();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad HTTP response: {resp:?}"));
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    })
    .await
}

/// A child process that is killed if the test ends before it exits.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Wait (polling, bounded by [`WAIT`]) for the process to exit.
    pub async fn exited(&mut self, what: &str) -> std::process::ExitStatus {
        within(what, async {
            loop {
                if let Some(status) = self.0.try_wait().expect("try_wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Send a signal by name (e.g. "TERM").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal}");
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------- clients

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A real WebSocket client.
pub struct Client {
    pub ws: Ws,
    /// `presence` frames [`Client::recv_json`] stepped over, oldest first
    /// (they are state, not messages: [`Client::presence`] takes them).
    presence: VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = within(
            &format!("connect to {url}"),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        Client::new(ws)
    }

    /// A client on a WebSocket connected some other way.
    pub fn new(ws: Ws) -> Client {
        Client {
            ws,
            presence: VecDeque::new(),
        }
    }

    /// A JSON-mode client in `rooms`; returns it with its connection id (from `welcome`).
    pub async fn json(node: &Node, rooms: &[&str]) -> (Client, String) {
        let query: Vec<String> = rooms.iter().map(|r| format!("room={r}")).collect();
        let mut c = Client::connect(&node.ws_url(&query.join("&"))).await;
        let welcome = c.recv_json().await;
        assert_eq!(
            welcome["op"], "welcome",
            "first frame must be welcome: {welcome}"
        );
        let conn = welcome["conn"].as_str().expect("welcome.conn").to_string();
        (c, conn)
    }

    pub async fn raw(node: &Node, room: &str) -> Client {
        Client::connect(&node.ws_url(&format!("room={room}&format=raw"))).await
    }

    pub async fn send(&mut self, msg: Message) {
        within("send", self.ws.send(msg)).await.expect("send frame");
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(Message::text(v.to_string())).await;
    }

    /// The next data or close message (pings and pongs are skipped).
    pub async fn recv(&mut self) -> Message {
        within("a message", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return m,
                    Some(Err(e)) => panic!("websocket error while waiting for a message: {e}"),
                    None => panic!("connection ended while waiting for a message"),
                }
            }
        })
        .await
    }

    /// The next JSON frame other than `presence` (those are kept for
    /// [`Client::presence`]).
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let frame = self.recv_any_json().await;
            if frame["op"] != "presence" {
                return frame;
            }
            self.presence.push_back(frame);
        }
    }

    /// The next JSON frame, whatever it is.
    pub async fn recv_any_json(&mut self) -> Value {
        match self.recv().await {
            Message::Text(t) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
            }
            other => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    /// The next `presence` frame (one stepped over earlier first). Any other
    /// frame fails the test.
    pub async fn presence(&mut self) -> Value {
        if let Some(frame) = self.presence.pop_front() {
            return frame;
        }
        let frame = self.recv_any_json().await;
        assert_eq!(
            frame["op"], "presence",
            "expected a presence frame: {frame}"
        );
        frame
    }

    /// `presence` frames of `room` until one says `online`; returns them all,
    /// that one last.
    pub async fn presence_until(&mut self, room: &str, online: u64) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let frame = self.presence().await;
            assert_eq!(frame["room"], room, "{frame}");
            let done = frame["online"] == online;
            seen.push(frame);
            if done {
                return seen;
            }
        }
    }

    /// Send a JSON request with an id and return the reply (ack or error) for that id,
    /// keeping any other frames that arrive first in `other`.
    pub async fn request(&mut self, mut v: Value, id: u64) -> (Value, Vec<Value>) {
        v["id"] = id.into();
        self.send_json(v).await;
        let mut other = Vec::new();
        loop {
            let f = self.recv_json().await;
            if f["id"] == id && (f["op"] == "ack" || f["op"] == "error" || f["op"] == "pong") {
                return (f, other);
            }
            other.push(f);
        }
    }

    /// Send a `send` request; returns its reply and this client's own `msg`
    /// of it (the sender is in the room), which may come before or after
    /// the reply.
    pub async fn request_own(&mut self, v: Value, id: u64) -> (Value, Value) {
        let (reply, other) = self.request(v, id).await;
        let own = match other.into_iter().find(|f| f["op"] == "msg") {
            Some(msg) => msg,
            None => loop {
                let f = self.recv_json().await;
                if f["op"] == "msg" {
                    break f;
                }
            },
        };
        (reply, own)
    }

    /// Wait for the server's close frame; returns its code.
    pub async fn closed(&mut self) -> u16 {
        let code = within("the server to close the connection", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                    Some(Ok(Message::Close(None))) => return 1005,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                    None => panic!("connection ended without a close frame"),
                }
            }
        })
        .await;
        // Polling on sends tungstenite's close reply, as a real client would;
        // then the server must end the TCP connection.
        self.ended().await;
        code
    }

    /// Wait until the server has ended the TCP connection (failing after [`WAIT`]).
    async fn ended(&mut self) {
        within("the server to end the TCP connection", async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        self.ended().await;
    }
}

/// A `send` frame.
pub fn send_frame(room: &str, event: &str, data: Value) -> Value {
    serde_json::json!({"op": "send", "room": room, "event": event, "data": data})
}

// ---------------------------------------------------------------- raw sockets

/// A WebSocket client on a bare TCP socket that sends nothing unless told to
/// (not even a close reply) — like a viewer that only reads, or an attacker.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read and not yet taken as frames.
    pub buf: Vec<u8>,
}

pub use roomcast::ws::client_frame;

/// The upgrade request for `/ws?{query}`.
pub fn upgrade_request(addr: SocketAddr, query: &str) -> String {
    format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl RawWs {
    /// Connect on `socket` (set its buffer sizes first, if needed) and complete the
    /// handshake; `extra` is written in the same packet as the request.
    pub async fn connect_with(
        socket: tokio::net::TcpSocket,
        addr: SocketAddr,
        query: &str,
        extra: &[u8],
    ) -> RawWs {
        let mut stream = within("connect", socket.connect(addr))
            .await
            .expect("connect");
        let mut request = upgrade_request(addr, query).into_bytes();
        request.extend_from_slice(extra);
        stream.write_all(&request).await.expect("write handshake");
        let mut buf = Vec::new();
        let end = within("the 101 response", async {
            loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    return end + 4;
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await.expect("read handshake");
                assert!(n > 0, "connection closed during the handshake");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused: {head}"
        );
        buf.drain(..end);
        RawWs { stream, buf }
    }

    pub async fn connect(addr: SocketAddr, query: &str) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        RawWs::connect_with(socket, addr, query, &[]).await
    }

    /// The next server frame: (opcode, payload). Fails the test if the
    /// connection ends first or nothing comes within [`WAIT`].
    pub async fn frame(&mut self) -> (u8, Vec<u8>) {
        match self.next_frame().await {
            Some(frame) => frame,
            None => panic!("connection ended while waiting for a frame"),
        }
    }

    /// The next server frame, or `None` at a clean end of the stream.
    pub async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        within("a frame from the server", async {
            loop {
                if let Some((frame, used)) = parse_server_frame(&self.buf) {
                    self.buf.drain(..used);
                    return Some(frame);
                }
                let mut chunk = [0u8; 16384];
                match self.stream.read(&mut chunk).await {
                    Ok(0) => {
                        assert!(self.buf.is_empty(), "stream ended inside a frame");
                        return None;
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("read failed: {e}"),
                }
            }
        })
        .await
    }

    /// Read frames until the close frame; returns the data frames before it and the close code.
    pub async fn until_close(&mut self) -> (Vec<(u8, Vec<u8>)>, u16) {
        let mut frames = Vec::new();
        loop {
            let (opcode, payload) = self.frame().await;
            match opcode {
                0x8 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (frames, code);
                }
                0x9 | 0xA => {}
                _ => frames.push((opcode, payload)),
            }
        }
    }

    /// Wait for the server to end the TCP connection (EOF or reset).
    pub async fn ended(&mut self) {
        within("the server to end the TCP connection", async {
            let mut chunk = [0u8; 16384];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
    }
}

/// One complete unmasked server frame at the start of `buf`: ((opcode, payload), bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let [b0, b1, ..] = *buf else { return None };
    assert_eq!(b1 & 0x80, 0, "server frames are never masked");
    let (len, header) = match b1 & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?;
    assert!(b0 & 0x80 != 0, "server frames are never fragmented");
    Some(((b0 & 0x0f, payload.to_vec()), header + len))
}

// ---------------------------------------------------------------- the binary

/// The real `roomcast` binary with `env` on a free port; its output goes to
/// `output`. A port taken by someone else between our check and its bind
/// makes it exit (69), and it is started again on another port.
pub async fn start_binary(env: &[(&str, &str)], output: fn() -> Stdio) -> (KillOnDrop, SocketAddr) {
    start_binary_under(&[], env, output).await
}

/// [`start_binary`], run through `wrapper` (a command and its arguments that
/// end by executing the program named after them, like `prlimit --nofile=N --`).
pub async fn start_binary_under(
    wrapper: &[&str],
    env: &[(&str, &str)],
    output: fn() -> Stdio,
) -> (KillOnDrop, SocketAddr) {
    start_binary_with(wrapper, &[], env, output).await
}

/// [`start_binary_under`], with `args` after the program (e.g. `--config PATH`).
pub async fn start_binary_with(
    wrapper: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
    output: fn() -> Stdio,
) -> (KillOnDrop, SocketAddr) {
    let bin = env!("CARGO_BIN_EXE_roomcast");
    let mut argv: Vec<&str> = wrapper.to_vec();
    argv.push(bin);
    argv.extend_from_slice(args);
    for _ in 0..5 {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut child = KillOnDrop(
            Command::new(argv[0])
                .args(&argv[1..])
                .env("ROOMCAST__SERVER__LISTEN", addr.to_string())
                .env("ROOMCAST__API__KEYS", TEST_API_KEY)
                .envs(env.iter().copied())
                .stdout(output())
                .stderr(output())
                .spawn()
                .expect("start the roomcast binary"),
        );
        let listening = within("the binary to listen (or exit)", async {
            loop {
                if TcpStream::connect(addr).await.is_ok() {
                    return true;
                }
                if child.0.try_wait().expect("try_wait").is_some() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if listening {
            return (child, addr);
        }
    }
    panic!("the roomcast binary did not start listening in 5 attempts")
}

/// Resident memory of a process, in bytes (Linux /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status");
    kb * 1024
}
