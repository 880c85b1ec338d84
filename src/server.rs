//! The node: accept loop, HTTP routes, the WebSocket upgrade, and graceful
//! shutdown.
//!
//! Routes (one port): `GET /ws` (WebSocket), `GET /metrics`, `GET /healthz`,
//! `GET /readyz`, `POST /api/publish`. Every HTTP error has a JSON body
//! `{"error":{"code":…,"message":…}}`.
//!
//! Shutdown: when `shutdown` fires, `/readyz` answers 503 and `/ws` refuses
//! new clients at once; existing clients are closed with 1012 spread evenly
//! over `shutdown.drain` (so they do not all reconnect in the same instant);
//! then the bus stops and [`run`] returns.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
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

use crate::config::Config;
use crate::conn::{self, Accepted, CLOSE_GRACE};
use crate::gateway::{self, Gateway};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol;
use crate::ws::close;
use crate::{bus, protocol::valid_room};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

type Body = Full<Bytes>;

/// Run a gateway node on `listener` until `shutdown` fires and the drain is over.
pub async fn run(
    listener: TcpListener,
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new(registry)?);
    let (hub, subs) = Hub::new(metrics.clone());
    let background = TaskTracker::new();
    let stop = CancellationToken::new();
    let bus = bus::start(
        &config.bus,
        hub.clone(),
        subs,
        metrics.clone(),
        &background,
        stop.clone(),
    );
    let node_id = config.node_id();
    let (gw, publishes) = Gateway::new(config, node_id, hub, bus, metrics);
    let gw = Arc::new(gw);
    background.spawn(conn::heartbeats(gw.clone(), stop.clone()));
    background.spawn(gateway::run_publisher(gw.clone(), publishes, stop.clone()));
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        node = %gw.node_id,
        "roomcast listening"
    );

    let connections = TaskTracker::new();
    let accept = tokio::spawn(accept_loop(
        listener,
        gw.clone(),
        connections.clone(),
        stop.clone(),
    ));

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
    stop.cancel();
    background.close();
    background.wait().await;
    let _ = accept.await;
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

async fn accept_loop(
    listener: TcpListener,
    gw: Arc<Gateway>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, _addr) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_http(
            stream,
            gw.clone(),
            connections.clone(),
            stop.clone(),
        ));
    }
}

async fn serve_http(
    stream: TcpStream,
    gw: Arc<Gateway>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let service = hyper::service::service_fn(move |req| {
        let gw = gw.clone();
        let connections = connections.clone();
        async move { Ok::<_, std::convert::Infallible>(route(gw, connections, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        }
        _ = stop.cancelled() => {}
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, protocol::http_error_body(code, message))
}

async fn route(
    gw: Arc<Gateway>,
    connections: TaskTracker,
    req: Request<Incoming>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(gw, connections, req).await,
        (&Method::GET, "/metrics") => {
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
        (&Method::POST, "/api/publish") => publish(gw, req).await,
        (_, "/ws" | "/metrics" | "/healthz" | "/readyz" | "/api/publish") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    }
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

async fn upgrade(
    gw: Arc<Gateway>,
    connections: TaskTracker,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if gw.draining.load(Ordering::Acquire) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this node is shutting down",
        );
    }
    let Some(admission) = gw.admit() else {
        let max = gw.config.limits.max_connections;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            &format!("this node holds its maximum of {max} connections"),
        );
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let (Some(key), true, true) = (
        key,
        header_has(&req, header::UPGRADE, "websocket"),
        header_has(&req, header::CONNECTION, "upgrade"),
    ) else {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            "not_websocket",
            "this endpoint speaks WebSocket only",
        );
    };
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Sec-WebSocket-Version must be 13",
        );
    }
    let max_rooms = gw.config.limits.max_rooms_per_connection;
    let (format, rooms) = match protocol::parse_ws_query(req.uri().query().unwrap_or(""), max_rooms)
    {
        Ok(q) => (q.format, q.rooms),
        Err(r) => return error(StatusCode::BAD_REQUEST, r.code.as_str(), &r.message),
    };
    // Subscribe the rooms before answering, so the client receives every
    // message published after it sees the handshake complete.
    let rooms: Vec<_> = rooms
        .into_iter()
        .map(|r| (r.clone(), gw.hub.pin(&r)))
        .collect();
    gw.hub.sync().await;

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

/// `POST /api/publish` with `{"room":…,"event":…,"data":…}`: publish from a backend.
async fn publish(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let limit = gw.config.limits.max_message_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_big",
                &format!("body larger than {limit} bytes or unreadable"),
            )
        }
    };
    #[derive(serde::Deserialize)]
    struct PublishBody<'a> {
        #[serde(borrow)]
        room: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let parsed: PublishBody = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_frame",
                &format!("expected {{\"room\",\"event\",\"data\"}}: {e}"),
            )
        }
    };
    if !valid_room(&parsed.room) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "room names are 1-128 characters of A-Z a-z 0-9 _ - . : @",
        );
    }
    if parsed.event.is_empty() || parsed.event.len() > protocol::MAX_EVENT_LEN {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_frame",
            "`event` must be 1-128 bytes",
        );
    }
    let data = parsed.data.unwrap_or(serde_json::value::RawValue::NULL);
    let envelope = protocol::json_envelope(&parsed.event, "", data);
    match gw.publish(&parsed.room, envelope).await {
        Ok(()) => json_response(StatusCode::OK, br#"{"ok":true}"#.to_vec()),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}
