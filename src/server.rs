//! The node: HTTP routes, the WebSocket upgrade, and graceful shutdown
//! (accepting connections is `listener.rs`'s).
//!
//! Routes: `GET /ws` (WebSocket), `GET /metrics`, `GET /healthz`,
//! `GET /readyz`, `POST /api/publish`, `GET /api/rooms`,
//! `GET /api/rooms/{room}`. With `server.internal_listen` set,
//! `/metrics` and `/api/*` move to the internal listener ([`Role`]). Every
//! HTTP error has a JSON body `{"error":{"code":…,"message":…}}`.
//!
//! Shutdown: when `shutdown` fires, `/readyz` answers 503 and `/ws` refuses
//! new clients at once; existing clients are closed with 1012 spread evenly
//! over `shutdown.drain` (so they do not all reconnect in the same instant);
//! then presence says goodbye (this node's counts leave the cluster's at
//! once), the bus stops and [`run`] returns.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Identity};
use crate::config::Config;
use crate::conn::{self, Accepted, CLOSE_GRACE};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::{self, Gateway};
use crate::hub::{Hub, RoomRule};
use crate::listener::{self, Edge};
use crate::metrics::Metrics;
use crate::protocol;
use crate::topic::Topic;
use crate::web;
use crate::ws::close;
use crate::{aggregate, api, bus, expiry, heartbeat, presence};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr} (server.internal_listen): {source}")]
    InternalListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything: the only listener (no `server.internal_listen`).
    All,
    /// Client-facing: `/ws`, `/healthz`, `/readyz`.
    Public,
    /// Operators and backends: `/metrics`, `/api/*`, `/healthz`, `/readyz`.
    Internal,
}

impl Role {
    fn serves(self, path: &str) -> bool {
        match self {
            Role::All => true,
            Role::Public => !(path == "/metrics" || path.starts_with("/api/")),
            Role::Internal => path != "/ws",
        }
    }
}

/// The sockets a node serves on. A bare [`TcpListener`] converts into one
/// with no internal listener; then `server.internal_listen`, if set, is
/// bound by [`run`].
pub struct Listeners {
    pub public: TcpListener,
    pub internal: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(public: TcpListener) -> Self {
        Listeners {
            public,
            internal: None,
        }
    }
}

pub(crate) type Body = Full<Bytes>;

/// How long presence may take to remove this node's counts at shutdown
/// (one bus round trip, itself bounded by the bus's timeout).
const PRESENCE_GOODBYE: Duration = Duration::from_secs(10);

/// Run a gateway node on `listener` until `shutdown` fires and the drain is over.
pub async fn run(
    listeners: impl Into<Listeners>,
    mut config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let Listeners { public, internal } = listeners.into();
    let internal = match (internal, config.server.internal_listen) {
        (Some(l), _) => Some(l),
        (None, Some(addr)) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::InternalListen { addr, source })?,
        ),
        (None, None) => None,
    };
    let fd_limit = listener::raise_fd_limit();
    if let Some(fd_limit) = fd_limit {
        let budget = listener::FdBudget::new(
            fd_limit,
            config.limits.max_connections,
            config.server.max_pending_connections,
        );
        if config.limits.max_connections != 0
            && budget.max_connections < config.limits.max_connections
        {
            tracing::warn!(
                configured = config.limits.max_connections,
                effective = budget.max_connections,
                fd_limit,
                "limits.max_connections lowered to fit the open-file limit (raise `ulimit -n`)"
            );
        }
        config.limits.max_connections = budget.max_connections;
        config.server.max_pending_connections = budget.max_pending;
    }
    let metrics = Arc::new(Metrics::new(registry)?);
    let rules = config.namespaces.by_id().into_iter().map(|ns| RoomRule {
        prefix: ns.prefix.clone(),
        coalesce: ns.coalesce,
        droppable: ns.droppable.clone(),
    });
    let (hub, subs) = Hub::new(metrics.clone(), config.fanout_workers, rules.collect());
    let background = TaskTracker::new();
    let stop = CancellationToken::new();
    let node_id = config.node_id();
    match &config.bus {
        crate::config::BusConfig::Memory { .. } => tracing::info!(
            "bus: memory (single node: messages do not reach other nodes; set bus.kind = \"redis\" for several)"
        ),
        crate::config::BusConfig::Redis(r) => {
            let kind = if r.cluster { "redis-cluster" } else { "redis" };
            tracing::info!(url = %crate::config::redact_url(&r.url), "bus: {kind}")
        }
    }
    let bus = bus::start(
        &config.bus,
        &node_id,
        hub.clone(),
        subs,
        metrics.clone(),
        &background,
        stop.clone(),
    );
    let (gw, publishes) = Gateway::new(config, node_id, hub, bus, metrics);
    let gw = Arc::new(gw);
    background.spawn(heartbeat::run(gw.clone(), stop.clone()));
    background.spawn(aggregate::run(gw.clone(), stop.clone()));
    if gw.config.auth.close_on_expiry {
        background.spawn(expiry::run(gw.clone(), stop.clone()));
    }
    background.spawn(gateway::run_publisher(gw.clone(), publishes, stop.clone()));
    // Stopped before the bus, so that its goodbye still gets through.
    let presence_stop = CancellationToken::new();
    let presence = tokio::spawn(presence::run(gw.clone(), presence_stop.clone()));
    let addr_of = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        listen = %addr_of(&public),
        internal_listen = %internal.as_ref().map(addr_of).unwrap_or_default(),
        node = %gw.node_id,
        max_connections = gw.config.limits.max_connections,
        max_pending_connections = gw.config.server.max_pending_connections,
        "roomcast listening"
    );

    let connections = TaskTracker::new();
    let pending = Arc::new(listener::Pending::default());
    let edge = |role| Edge {
        gw: gw.clone(),
        role,
        connections: connections.clone(),
        // One cap for both listeners: they share the open-file budget.
        pending: pending.clone(),
        stop: stop.clone(),
    };
    let mut accepts = vec![];
    match internal {
        Some(internal) => {
            accepts.push(tokio::spawn(listener::accept_loop(
                public,
                edge(Role::Public),
            )));
            accepts.push(tokio::spawn(listener::accept_loop(
                internal,
                edge(Role::Internal),
            )));
        }
        None => accepts.push(tokio::spawn(listener::accept_loop(public, edge(Role::All)))),
    }

    shutdown.cancelled().await;
    gw.draining.store(true, Ordering::Release);
    let drain = gw.config.drain;
    tracing::info!(
        clients = gw.hub.peers().len(),
        drain_ms = drain.as_millis() as u64,
        "draining"
    );
    close_spread(&gw, drain).await;
    connections.close();
    if tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish closing in time");
    }
    presence_stop.cancel();
    if tokio::time::timeout(PRESENCE_GOODBYE, presence)
        .await
        .is_err()
    {
        tracing::warn!(
            "presence did not say goodbye in time; this node's counts expire on their own"
        );
    }
    stop.cancel();
    background.close();
    background.wait().await;
    for accept in accepts {
        let _ = accept.await;
    }
    tracing::info!("roomcast stopped");
    Ok(())
}

/// Close every client with 1012, spread evenly over `drain`.
async fn close_spread(gw: &Gateway, drain: Duration) {
    let peers = gw.hub.peers();
    let start = Instant::now();
    let n = peers.len().max(1) as f64;
    for (i, peer) in peers.into_iter().enumerate() {
        let at = start + drain.mul_f64(i as f64 / n);
        if at > Instant::now() + Duration::from_millis(1) {
            tokio::time::sleep_until(at).await;
        }
        peer.close(close::SERVICE_RESTART, "service restart", true);
    }
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// An HTTP refusal: the code's status, and the JSON error body.
pub(crate) fn refuse(code: ErrorCode, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, protocol::http_error_body(code.as_str(), message))
}

pub(crate) fn refuse_with(rejection: &Rejection) -> Response<Body> {
    refuse(rejection.code, &rejection.message)
}

/// `GET /api/rooms/{room}`.
const ROOMS: &str = "/api/rooms/";

/// Answer one request on a listener of `edge.role`.
pub(crate) async fn route(edge: &Edge, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let endpoint = api_endpoint(req.uri().path());
    let resp = answer(edge, peer, req).await;
    if let Some(endpoint) = endpoint {
        edge.gw
            .metrics
            .api_requests
            .with_label_values(&[endpoint, resp.status().as_str()])
            .inc();
    }
    resp
}

/// The `endpoint` label of an `/api/` path (bounded: never the room).
fn api_endpoint(path: &str) -> Option<&'static str> {
    match path {
        "/api/publish" => Some("publish"),
        "/api/rooms" => Some("rooms"),
        p if p.starts_with(ROOMS) => Some("room"),
        p if p.starts_with("/api/") => Some("other"),
        _ => None,
    }
}

async fn answer(edge: &Edge, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let gw = edge.gw.clone();
    let path = req.uri().path();
    if !edge.role.serves(path) {
        return refuse(
            ErrorCode::NotFound,
            if path == "/ws" {
                "WebSocket clients connect on server.listen"
            } else {
                "this endpoint is served on server.internal_listen"
            },
        );
    }
    if path.starts_with("/api/") {
        if let Some(refusal) = api_refusal(&gw, &req) {
            return refusal;
        }
    }
    match (req.method(), path) {
        (&Method::GET, "/ws") => {
            // The refusal is readable by the page that tried (the SDK asks
            // for it), if its origin may connect at all.
            let origin = req.headers().get(header::ORIGIN).cloned();
            let mut resp = upgrade(gw.clone(), edge.connections.clone(), peer, req).await;
            if let Some(origin) = origin.filter(|o| origin_allowed(&gw, o)) {
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    resp.headers_mut()
                        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                    resp.headers_mut()
                        .insert(header::VARY, HeaderValue::from_static("Origin"));
                }
            }
            resp
        }
        (&Method::GET, "/metrics") => {
            gw.metrics.ready.set(i64::from(gw.ready()));
            let mut resp = Response::new(Full::new(Bytes::from(gw.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, br#"{"status":"ok"}"#.to_vec()),
        (&Method::GET, "/readyz") => {
            let body = serde_json::json!({
                "status": if gw.ready() { "ready" } else { "not_ready" },
                "bus_up": gw.bus.is_up(),
                "draining": gw.draining.load(Ordering::Acquire),
            });
            let status = if gw.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, body.to_string().into_bytes())
        }
        (&Method::POST, "/api/publish") => api::publish(gw, req).await,
        (&Method::GET, "/api/rooms") => api::rooms(&gw, req.uri().query().unwrap_or("")).await,
        (&Method::GET, p) if p.starts_with(ROOMS) => api::room(gw, &p[ROOMS.len()..]).await,
        (&Method::GET, "/") => web::demo(&gw, req.headers()),
        (&Method::GET, "/demo/token") => web::dev_token(&gw, req.uri().query().unwrap_or("")),
        (&Method::GET, p) if p.starts_with("/sdk/") => web::sdk(p, req.headers())
            .unwrap_or_else(|| refuse(ErrorCode::NotFound, "no such SDK file")),
        (_, "/ws" | "/metrics" | "/healthz" | "/readyz" | "/api/publish" | "/api/rooms") => {
            refuse(ErrorCode::MethodNotAllowed, "method not allowed")
        }
        (_, p) if p.starts_with(ROOMS) => refuse(ErrorCode::MethodNotAllowed, "method not allowed"),
        _ => refuse(ErrorCode::NotFound, "no such endpoint"),
    }
}

/// `server.allowed_origins` is empty (any origin) or names `origin`.
fn origin_allowed(gw: &Gateway, origin: &HeaderValue) -> bool {
    let allowed = &gw.config.server.allowed_origins;
    let origin = origin.to_str().unwrap_or("");
    allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// RFC 6455 §4.1: the key is a random 16-byte value, base64-encoded.
fn valid_ws_key(key: &[u8]) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

async fn upgrade(
    gw: Arc<Gateway>,
    connections: TaskTracker,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if gw.draining.load(Ordering::Acquire) {
        return refuse(ErrorCode::ShuttingDown, "this node is shutting down");
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !origin_allowed(&gw, origin) {
            let origin = origin.to_str().unwrap_or("");
            return refuse(
                ErrorCode::Forbidden,
                &format!("origin {origin:?} is not in server.allowed_origins"),
            );
        }
    }
    // The reconnect herd after a deploy: beyond the node's rate, send it on
    // (the load balancer retries a 503 on the next node) and back later.
    if let Err(retry_s) = gw.admit_rate() {
        gw.metrics
            .rate_limited
            .with_label_values(&["connection"])
            .inc();
        let mut busy = refuse(
            ErrorCode::Busy,
            "this node takes no more new connections this second; retry",
        );
        if let Ok(v) = HeaderValue::from_str(&retry_s.to_string()) {
            busy.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return busy;
    }
    let client_ip = client_ip(&gw, peer.ip(), &req);
    let Some(ip_guard) = gw.admit_ip(client_ip) else {
        return refuse(
            ErrorCode::TooManyConnectionsFromIp,
            &format!(
                "{client_ip} holds limits.max_connections_per_ip ({}) connections on this node",
                gw.config.limits.max_connections_per_ip
            ),
        );
    };
    let Some(admission) = gw.admit() else {
        let max = gw.config.limits.max_connections;
        return refuse(
            ErrorCode::TooManyConnections,
            &format!("this node holds its maximum of {max} connections"),
        );
    };
    if req.version() != hyper::Version::HTTP_11 {
        return refuse(
            ErrorCode::BadRequest,
            "a WebSocket handshake needs HTTP/1.1",
        );
    }
    // A plain GET (no upgrade) is answered with the refusal the handshake
    // would get, or 426: a browser cannot see why a handshake failed, so
    // the SDK asks this way (clients/js/roomcast.js, `handshakeFailed`).
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let upgrading = header_has(&req, header::UPGRADE, "websocket")
        && header_has(&req, header::CONNECTION, "upgrade");
    let key = match (key, upgrading) {
        (Some(key), true) => Some(key),
        _ => None,
    };
    if let Some(key) = &key {
        if !valid_ws_key(key.as_bytes()) {
            return refuse(
                ErrorCode::BadRequest,
                "Sec-WebSocket-Key must be 16 bytes in base64",
            );
        }
        if req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            return refuse(ErrorCode::BadRequest, "Sec-WebSocket-Version must be 13");
        }
    }
    let max_rooms = gw.config.limits.max_rooms_per_connection;
    let (format, rooms, token, since) =
        match protocol::parse_ws_query(req.uri().query().unwrap_or(""), max_rooms) {
            Ok(q) => (q.format, q.rooms, q.token, q.since),
            Err(r) => return refuse_with(&r),
        };
    // `since` is for history rooms, which only JSON connections recover.
    let no_history = since.iter().find(|(room, _)| {
        format == protocol::Format::Raw || gw.config.namespaces.of(room).history.is_none()
    });
    if let Some((room, _)) = no_history {
        return refuse(
            ErrorCode::BadRequest,
            &format!("since: room {room:?} keeps no history for this connection (history rooms, JSON format)"),
        );
    }
    let token = token.or_else(|| bearer(&req).map(str::to_owned));
    let identity = match authenticate(&gw, token.as_deref(), &rooms) {
        Ok(identity) => identity,
        Err(r) => return refuse_with(&r),
    };
    let Some(key) = key else {
        return refuse(
            ErrorCode::NotWebsocket,
            "this endpoint speaks WebSocket only",
        );
    };
    // Subscribe the rooms before answering, so the client receives every
    // message published after it sees the handshake complete.
    let rooms: Vec<_> = rooms
        .into_iter()
        .map(|r| {
            let topic = Topic::room(&r);
            let pin = gw.hub.pin(&topic);
            (topic, pin)
        })
        .collect();
    // And the user's own topic, for messages to the user.
    let identity = identity.map(|identity| {
        let pin = gw.hub.pin(&Topic::user(&identity.user));
        (identity, pin)
    });
    if (!rooms.is_empty() || identity.is_some()) && !gw.hub.sync().await {
        // Dropping the pins undoes the subscriptions.
        return refuse(
            ErrorCode::Unavailable,
            "the bus is down: the rooms cannot be joined now; retry (another node may take you)",
        );
    }

    let on_upgrade = hyper::upgrade::on(&mut req);
    let task_gw = gw.clone();
    let tracker = connections.clone();
    connections.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                return;
            }
        };
        let accepted = Accepted {
            admission,
            socket: parts.io.into_inner(),
            leftover: parts.read_buf,
            format,
            rooms,
            since,
            identity,
            ip_guard,
        };
        // A task of its own, so that an idle connection keeps only the
        // connection's state (about 600 bytes), not this upgrade future's too.
        tracker.spawn(conn::serve(task_gw, accepted));
    });

    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = resp.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// Who a connecting client is: its token verified (401 `unauthorized` if
/// it does not verify, or if there is none and `auth.anonymous` is off),
/// and the rooms of its URL allowed by the token (403 `forbidden`).
fn authenticate(
    gw: &Gateway,
    token: Option<&str>,
    rooms: &[String],
) -> Result<Option<Identity>, Rejection> {
    let unauthorized = |e: AuthError| {
        Rejection::new(
            None,
            ErrorCode::Unauthorized,
            format!("{}: {e}", e.reason()),
        )
    };
    let Some(token) = token else {
        if gw.config.auth.anonymous {
            let namespaces = &gw.config.namespaces;
            if let Some(room) = rooms.iter().find(|r| !namespaces.of(r).anonymous_join) {
                return Err(Rejection::new(
                    None,
                    ErrorCode::Forbidden,
                    format!("room {room:?} is for signed-in users: connect with a token"),
                ));
            }
            return Ok(None);
        }
        gw.metrics
            .auth_failures
            .with_label_values(&[AuthError::Missing.reason()])
            .inc();
        return Err(unauthorized(AuthError::Missing));
    };
    let identity = gw.verify(token).map_err(unauthorized)?;
    if let Some(room) = rooms.iter().find(|r| !identity.may_join(r)) {
        gw.metrics
            .auth_failures
            .with_label_values(&["forbidden"])
            .inc();
        return Err(Rejection::new(
            None,
            ErrorCode::Forbidden,
            format!("your token does not allow room {room:?}"),
        ));
    }
    Ok(Some(identity))
}

/// The client's address: the peer's, or — when the peer is one of
/// `server.trusted_proxies` — the last address its `X-Forwarded-For` names.
fn client_ip(gw: &Gateway, peer: IpAddr, req: &Request<Incoming>) -> IpAddr {
    if !gw.config.server.trusted_proxies.contains(&peer) {
        return peer;
    }
    req.headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .next_back()
        .unwrap_or(peer)
}

/// The bearer token of `Authorization`, if the header has one.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// `/api/*` needs one of `api.keys` as a bearer token, unless `api.open`;
/// the 401 for a request without one. With no key configured and the API
/// not opened, nothing gets in.
fn api_refusal(gw: &Gateway, req: &Request<Incoming>) -> Option<Response<Body>> {
    let api = &gw.config.api;
    if api.open {
        return None;
    }
    let presented = bearer(req).unwrap_or("");
    // Compare with every key, in time independent of where they differ.
    let valid = api.keys.iter().fold(false, |ok, key| {
        ok | constant_time_eq(key.as_bytes(), presented.as_bytes())
    });
    if valid {
        return None;
    }
    let message = match (api.keys.is_empty(), presented.is_empty()) {
        (true, _) => "no API key is configured (api.keys): the API is closed",
        (false, true) => "an API key is needed: Authorization: Bearer <key>",
        (false, false) => "this API key is not valid",
    };
    let mut refusal = refuse(ErrorCode::Unauthorized, message);
    refusal
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(refusal)
}

/// Equal byte strings, compared in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
