//! The API for the platform's backend, on the internal listener: publish
//! to rooms and users (`POST /api/publish`), and online counts
//! (`GET /api/rooms/{room}`, `GET /api/rooms?prefix=…&limit=…`). Every
//! request needs an API key (checked in `server.rs` before it gets here).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bus::{Message, Published};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::Gateway;
use crate::protocol;
use crate::server::{json_response, refuse, refuse_with, Body};
use crate::topic::Topic;

/// Most messages in one batch.
pub const MAX_BATCH: usize = 1000;

/// Rooms `GET /api/rooms` lists unless told otherwise, and at most.
pub const DEFAULT_ROOMS: usize = 50;
pub const MAX_ROOMS: usize = 1000;

/// `Content-Type: application/json` (any parameters, any case), so that a
/// web page cannot post a "simple" cross-origin form or text/plain request.
fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// The body of an API request, read within `server.body_timeout` and
/// `limits.max_message_bytes` (a batch shares that limit).
async fn json_body(gw: &Gateway, req: Request<Incoming>) -> Result<Bytes, Rejection> {
    if !is_json(&req) {
        return Err(Rejection::new(
            None,
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json",
        ));
    }
    let limit = gw.config.limits.max_message_bytes;
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(gw.config.server.body_timeout, collect).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(Rejection::new(
            None,
            ErrorCode::TooBig,
            format!("body larger than {limit} bytes or unreadable"),
        )),
        Err(_) => Err(Rejection::new(
            None,
            ErrorCode::Timeout,
            "the body did not arrive within server.body_timeout",
        )),
    }
}

/// One message of `POST /api/publish`.
#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    /// A user id: every connection of that user, on every node.
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl Item<'_> {
    /// Where it goes and its envelope, or why it is refused.
    fn checked(&self) -> Result<(Topic, Bytes), Rejection> {
        let topic = match (&self.room, &self.to) {
            (Some(room), None) => {
                protocol::check_room(room)?;
                Topic::room(room)
            }
            (None, Some(user)) => {
                protocol::check_user(user)?;
                Topic::user(user)
            }
            _ => {
                return Err(Rejection::new(
                    None,
                    ErrorCode::BadFrame,
                    "give exactly one of `room` and `to`",
                ))
            }
        };
        protocol::check_event(&self.event)?;
        let data = self.data.unwrap_or(RawValue::NULL);
        protocol::check_data(data)?;
        Ok((
            topic,
            protocol::json_envelope(&self.event, protocol::Sender::default(), data),
        ))
    }
}

const EXPECTED: &str = "expected {\"room\" or \"to\", \"event\", \"data\"} or an array of them";

/// `POST /api/publish`: `{"room":…|"to":…,"event":…,"data":…}` answered
/// `{"ok":true}` or an error with the code's status; or an array of those,
/// answered 200 `{"results":[…]}` with one `{"ok":true}` or
/// `{"error":{…}}` per item, in order (valid items are published even when
/// others are refused).
pub async fn publish(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let body = match json_body(&gw, req).await {
        Ok(body) => body,
        Err(r) => return refuse_with(&r),
    };
    // A body is one message, or a JSON array of up to MAX_BATCH.
    let batch = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if !batch {
        let item: Item = match serde_json::from_slice(&body) {
            Ok(item) => item,
            Err(e) => return refuse(ErrorCode::BadFrame, &format!("{EXPECTED}: {e}")),
        };
        let (topic, envelope) = match item.checked() {
            Ok(checked) => checked,
            Err(r) => return refuse_with(&r),
        };
        return match gw.publish(gw.message(topic, envelope)).await {
            Ok(published) => json_response(StatusCode::OK, published_body(&published)),
            Err(e) => refuse(e.code(), &e.to_string()),
        };
    }
    let items: Vec<&RawValue> = match serde_json::from_slice(&body) {
        Ok(items) => items,
        Err(e) => return refuse(ErrorCode::BadFrame, &format!("{EXPECTED}: {e}")),
    };
    if items.len() > MAX_BATCH {
        return refuse(
            ErrorCode::BadFrame,
            &format!("a batch holds at most {MAX_BATCH} messages"),
        );
    }
    let checked: Vec<Result<(Topic, Bytes), Rejection>> = items
        .iter()
        .map(|raw| {
            serde_json::from_str::<Item>(raw.get())
                .map_err(|e| Rejection::new(None, ErrorCode::BadFrame, format!("{EXPECTED}: {e}")))
                .and_then(|item| item.checked())
        })
        .collect();
    let valid: Vec<Message> = checked
        .iter()
        .filter_map(|c| c.as_ref().ok().cloned())
        .map(|(topic, envelope)| gw.message(topic, envelope))
        .collect();
    let mut published = gw.publish_batch(&valid).await.into_iter();
    let results: Vec<serde_json::Value> = checked
        .iter()
        .map(|c| {
            let outcome = match c {
                Ok(_) => published.next().unwrap_or_else(|| {
                    Err(crate::bus::BusError::Unavailable(
                        "the bus gave no answer".into(),
                    ))
                }),
                Err(r) => return error_value(r.code, &r.message),
            };
            match outcome {
                Ok(published) => published_value(&published),
                Err(e) => error_value(e.code(), &e.to_string()),
            }
        })
        .collect();
    let body = serde_json::json!({ "results": results }).to_string();
    json_response(StatusCode::OK, body.into_bytes())
}

/// `{"ok":true}`, with the message's `seq` in a history room.
fn published_value(published: &Published) -> serde_json::Value {
    match published.seq {
        Some(seq) => serde_json::json!({"ok": true, "seq": seq}),
        None => serde_json::json!({"ok": true}),
    }
}

fn published_body(published: &Published) -> Vec<u8> {
    serde_json::to_vec(&published_value(published)).unwrap_or_default()
}

fn error_value(code: ErrorCode, message: &str) -> serde_json::Value {
    serde_json::from_slice(&protocol::http_error_body(code.as_str(), message))
        .unwrap_or(serde_json::Value::Null)
}

/// `GET /api/rooms/{room}`: `{"room":…,"online":N,"watch_seconds":S,"nodes":K}`,
/// across the cluster (`nodes`: how many have someone in the room). A room
/// no one is in is `online` 0, not a 404; an invalid name is `bad_room`.
pub async fn room(gw: Arc<Gateway>, encoded: &str) -> Response<Body> {
    let Ok(room) = percent_encoding::percent_decode_str(encoded).decode_utf8() else {
        return refuse(ErrorCode::BadRoom, "the room name is not UTF-8");
    };
    if let Err(r) = protocol::check_room(&room) {
        return refuse_with(&r);
    }
    let read = futures::future::try_join(
        gw.presence.room(&room, &*gw.bus),
        gw.bus.watch_seconds(&room),
    );
    let (total, watch) = match read.await {
        Ok(read) => read,
        Err(e) => return refuse(e.code(), &e.to_string()),
    };
    let body = serde_json::json!({
        "room": room,
        "online": total.online,
        "watch_seconds": (watch * 1000.0).round() / 1000.0,
        "nodes": total.nodes,
    });
    json_response(StatusCode::OK, body.to_string().into_bytes())
}

/// `GET /api/rooms?prefix=…&limit=…`: the busiest rooms whose names start
/// with `prefix` (default: all), most online first, then by name:
/// `{"rooms":[{"room":…,"online":…},…]}`; `limit` 1–1000, default 50.
pub async fn rooms(gw: &Gateway, query: &str) -> Response<Body> {
    let mut prefix = String::new();
    let mut limit = DEFAULT_ROOMS;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "prefix" => prefix = value.into_owned(),
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_ROOMS).contains(&n) => limit = n,
                _ => {
                    return refuse(
                        ErrorCode::BadRequest,
                        &format!("limit must be a number from 1 to {MAX_ROOMS}"),
                    )
                }
            },
            _ => {}
        }
    }
    if !prefix.is_empty() && !protocol::valid_room(&prefix) {
        return refuse(
            ErrorCode::BadRequest,
            "prefix must be the start of a room name (up to 128 characters of A-Z a-z 0-9 _ - . : @)",
        );
    }
    let rooms: Vec<serde_json::Value> = match gw.presence.busiest(&prefix, limit, &*gw.bus).await {
        Ok(rooms) => rooms
            .into_iter()
            .map(|(room, online)| serde_json::json!({"room": room, "online": online}))
            .collect(),
        Err(e) => return refuse(e.code(), &e.to_string()),
    };
    let body = serde_json::json!({ "rooms": rooms }).to_string();
    json_response(StatusCode::OK, body.into_bytes())
}
