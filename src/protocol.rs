//! The wire protocol (v1): JSON frames between clients and the gateway, and
//! the envelope that travels between gateway nodes on the bus. No I/O here.
//!
//! See `docs/protocol.md` for the user-facing description. Invariants:
//! - a bus envelope is turned into outgoing frames once per node
//!   ([`Outgoing::from_envelope`]), never once per socket;
//! - the room of a delivered message is the bus channel it arrived on, never
//!   a field of the payload, so a publisher cannot spoof another room.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::topic::Target;
use crate::ws;

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest event name, in bytes.
pub const MAX_EVENT_LEN: usize = 128;

/// Deepest nesting of arrays and objects accepted in `data` (deeper data
/// crashes common JSON parsers in receivers, so it is refused with `bad_frame`).
pub const MAX_JSON_DEPTH: usize = 32;

/// Longest `message` in an error frame or HTTP error body: what a client sent
/// is never echoed back at length.
pub const MAX_ERROR_MESSAGE: usize = 200;

/// `true` if no array or object in this JSON text nests deeper than `max`.
/// A byte scan (strings skipped), so it costs next to nothing per message.
pub fn json_depth_within(json: &str, max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// `message` cut, at a character boundary, so that it takes at most
/// [`MAX_ERROR_MESSAGE`] bytes *as a JSON string*: what a client sent (and
/// a parser's message quotes) may be all quotes, backslashes or control
/// characters, which JSON escapes to 2 or 6 bytes each (found by the
/// `json_request` fuzz target: 200 backslashes made a 345-byte error frame).
pub(crate) fn brief(message: &str) -> Cow<'_, str> {
    let mut escaped = 0;
    for (i, c) in message.char_indices() {
        escaped += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if escaped > MAX_ERROR_MESSAGE {
            return Cow::Owned(format!("{}…", &message[..i]));
        }
    }
    Cow::Borrowed(message)
}

/// `true` for 1–128 characters of `A–Z a–z 0–9 _ - . : @`.
pub fn valid_room(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b))
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a connection speaks: JSON envelopes, or raw frames in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Raw,
}

pub use crate::error::{ErrorCode, Rejection};

/// What room names may be, for error messages.
const ROOM_RULE: &str = "room names are 1-128 characters of A-Z a-z 0-9 _ - . : @";

/// `Ok` if `valid`, else a refusal with `code` and `message`.
fn require(
    valid: bool,
    code: ErrorCode,
    message: impl FnOnce() -> String,
) -> Result<(), Rejection> {
    match valid {
        true => Ok(()),
        false => Err(Rejection::new(None, code, message())),
    }
}

/// A room name fit to join or publish to (`bad_room` otherwise).
pub fn check_room(room: &str) -> Result<(), Rejection> {
    require(valid_room(room), ErrorCode::BadRoom, || ROOM_RULE.into())
}

/// Longest user id, in bytes.
pub const MAX_USER_LEN: usize = 128;

/// `true` for a user id of 1–128 bytes without control characters.
pub fn valid_user(user: &str) -> bool {
    !user.is_empty() && user.len() <= MAX_USER_LEN && !user.chars().any(char::is_control)
}

/// A user id fit to send to (`bad_request` otherwise).
pub fn check_user(user: &str) -> Result<(), Rejection> {
    require(valid_user(user), ErrorCode::BadRequest, || {
        "user ids are 1-128 bytes without control characters".into()
    })
}

/// An event name of 1–[`MAX_EVENT_LEN`] bytes (`bad_frame` otherwise).
pub fn check_event(event: &str) -> Result<(), Rejection> {
    let valid = !event.is_empty() && event.len() <= MAX_EVENT_LEN;
    require(valid, ErrorCode::BadFrame, || {
        "`event` must be 1-128 bytes".into()
    })
}

/// Message data nested at most [`MAX_JSON_DEPTH`] deep (`bad_frame` otherwise).
pub fn check_data(data: &RawValue) -> Result<(), Rejection> {
    require(
        json_depth_within(data.get(), MAX_JSON_DEPTH),
        ErrorCode::BadFrame,
        || format!("`data` nests deeper than {MAX_JSON_DEPTH} levels"),
    )
}

/// A client → server JSON frame, borrowed from the received text.
#[derive(Debug, Deserialize)]
pub struct ClientFrame<'a> {
    #[serde(borrow, default)]
    pub op: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub id: Option<u64>,
    /// `join`: replay what the room had after this point.
    #[serde(default)]
    pub since: Option<Since>,
    /// `join`: replay the room's last this many messages.
    #[serde(default)]
    pub history: Option<usize>,
}

/// A point in a room's history: the last message a client saw.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    pub seq: u64,
    pub epoch: String,
}

/// What a join asks to be replayed (history rooms only).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Replay {
    /// Nothing: live messages from the ack on.
    #[default]
    None,
    /// Every message after this point (recovery after a reconnect).
    Since(Since),
    /// The last this many messages (a viewer entering the room).
    Last(usize),
}

/// The operations a JSON client may ask for.
#[derive(Debug)]
pub enum Request<'a> {
    Join {
        room: Cow<'a, str>,
        replay: Replay,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Send {
        room: Cow<'a, str>,
        event: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// A message to every connection of a user (`"to"` instead of `"room"`).
    SendToUser {
        user: Cow<'a, str>,
        event: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// Replace the connection's token.
    Refresh {
        token: Cow<'a, str>,
    },
    Ping,
}

/// Parse and check one JSON text frame. Room names are validated here;
/// membership and limits are the connection's business.
pub fn parse_request<'a>(text: &'a str) -> Result<(Option<u64>, Request<'a>), Rejection> {
    if !text.trim_start().starts_with('{') {
        return Err(Rejection::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be a JSON object",
        ));
    }
    let frame: ClientFrame = serde_json::from_str(text).map_err(|e| {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<u64>,
        }
        let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id);
        Rejection::new(id, ErrorCode::BadFrame, format!("invalid frame: {e}"))
    })?;
    let id = frame.id;
    let op = frame
        .op
        .ok_or_else(|| Rejection::new(id, ErrorCode::BadFrame, "missing field `op`"))?;
    let room_of = |room: Option<Cow<'a, str>>| -> Result<Cow<'a, str>, Rejection> {
        let room =
            room.ok_or_else(|| Rejection::new(id, ErrorCode::BadFrame, "missing field `room`"))?;
        check_room(&room).map_err(|r| r.with_id(id))?;
        Ok(room)
    };
    let request = match op.as_ref() {
        "join" => Request::Join {
            room: room_of(frame.room)?,
            replay: match (frame.since, frame.history) {
                (None, None) => Replay::None,
                (Some(since), None) => Replay::Since(since),
                (None, Some(n)) => Replay::Last(n),
                (Some(_), Some(_)) => {
                    return Err(Rejection::new(
                        id,
                        ErrorCode::BadFrame,
                        "give `since` or `history`, not both",
                    ))
                }
            },
        },
        "leave" => Request::Leave {
            room: room_of(frame.room)?,
        },
        "send" => {
            let event = frame
                .event
                .ok_or_else(|| Rejection::new(id, ErrorCode::BadFrame, "missing field `event`"))?;
            check_event(&event).map_err(|r| r.with_id(id))?;
            let data = frame.data.unwrap_or(RawValue::NULL);
            check_data(data).map_err(|r| r.with_id(id))?;
            match (frame.room, frame.to) {
                (room, None) => Request::Send {
                    room: room_of(room)?,
                    event,
                    data,
                },
                (None, Some(user)) => {
                    check_user(&user).map_err(|r| r.with_id(id))?;
                    Request::SendToUser { user, event, data }
                }
                (Some(_), Some(_)) => {
                    return Err(Rejection::new(
                        id,
                        ErrorCode::BadFrame,
                        "give `room` or `to`, not both",
                    ))
                }
            }
        }
        "refresh" => Request::Refresh {
            token: frame
                .token
                .ok_or_else(|| Rejection::new(id, ErrorCode::BadFrame, "missing field `token`"))?,
        },
        "ping" => Request::Ping,
        other => {
            return Err(Rejection::new(
                id,
                ErrorCode::UnknownOp,
                format!("unknown op {other:?}; expected join, leave, send, refresh or ping"),
            ))
        }
    };
    Ok((id, request))
}

/// What a `/ws?…` query asks for: the format and the rooms to join at once
/// (validated, deduplicated, in the order given).
#[derive(Debug, PartialEq, Eq)]
pub struct WsQuery {
    pub format: Format,
    pub rooms: Vec<String>,
    /// `token=`: the client's JWT (browsers cannot set headers on a WebSocket).
    pub token: Option<String>,
    /// `since=<room>:<seq>:<epoch>`: recover these rooms (each also in `rooms`).
    pub since: Vec<(String, Since)>,
}

/// `<room>:<seq>:<epoch>` (room names may hold `:`, seq and epoch do not).
fn parse_since(value: &str) -> Option<(&str, Since)> {
    let mut parts = value.rsplitn(3, ':');
    let epoch = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let room = parts.next()?;
    (!epoch.is_empty() && epoch.len() <= MAX_EPOCH_LEN).then(|| {
        (
            room,
            Since {
                seq,
                epoch: epoch.to_owned(),
            },
        )
    })
}

/// Longest epoch accepted from a client.
const MAX_EPOCH_LEN: usize = 64;

/// Parse the query string of `GET /ws` (`room=…` repeated, `format=json|raw`, `token=…`).
/// Unknown parameters are ignored. Every refusal is an HTTP 400 whose body
/// carries the rejection's code.
pub fn parse_ws_query(query: &str, max_rooms: usize) -> Result<WsQuery, Rejection> {
    let mut format = Format::Json;
    let mut rooms: Vec<String> = Vec::new();
    let mut token = None;
    let mut since: Vec<(String, Since)> = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let (key, value) = match key.as_ref() {
            "since" => {
                let Some((room, point)) = parse_since(&value) else {
                    return Err(Rejection::new(
                        None,
                        ErrorCode::BadRequest,
                        "since must be <room>:<seq>:<epoch>",
                    ));
                };
                check_room(room)?;
                since.retain(|(r, _)| r != room);
                since.push((room.to_owned(), point));
                // It joins the room too.
                (Cow::Borrowed("room"), Cow::Owned(room.to_owned()))
            }
            _ => (key, value),
        };
        match key.as_ref() {
            "room" => {
                check_room(&value)?;
                if !rooms.iter().any(|r| *r == value) {
                    if rooms.len() == max_rooms {
                        return Err(Rejection::new(
                            None,
                            ErrorCode::TooManyRooms,
                            format!("a connection may join at most {max_rooms} rooms"),
                        ));
                    }
                    rooms.push(value.into_owned());
                }
            }
            "token" => token = Some(value.into_owned()),
            "format" => {
                format = match value.as_ref() {
                    "json" => Format::Json,
                    "raw" => Format::Raw,
                    _ => {
                        return Err(Rejection::new(
                            None,
                            ErrorCode::BadRequest,
                            "format must be \"json\" or \"raw\"",
                        ))
                    }
                }
            }
            _ => {}
        }
    }
    if format == Format::Raw && rooms.len() != 1 {
        return Err(Rejection::new(
            None,
            ErrorCode::BadRequest,
            "raw mode needs exactly one room parameter",
        ));
    }
    Ok(WsQuery {
        format,
        rooms,
        token,
        since,
    })
}

// ---- server → client frames (each returns a complete WebSocket text frame) ----

fn text<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs cannot fail: no maps with non-string keys, no I/O.
    let json = serde_json::to_vec(value).unwrap_or_default();
    ws::text_frame(&json)
}

/// The first frame: the connection's id, the node, and the user when authenticated.
pub fn welcome_frame(conn: &str, node: &str, user: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Welcome<'a> {
        op: &'static str,
        conn: &'a str,
        node: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
    }
    text(&Welcome {
        op: "welcome",
        conn,
        node,
        user,
    })
}

pub fn ack_frame(id: u64) -> Bytes {
    send_ack_frame(id, None)
}

/// The ack of a send; in a history room it carries the message's `seq`.
pub fn send_ack_frame(id: u64, seq: Option<u64>) -> Bytes {
    #[derive(Serialize)]
    struct Ack {
        op: &'static str,
        id: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    }
    text(&Ack { op: "ack", id, seq })
}

/// Where a join in a history room starts: the room's epoch and last `seq`
/// at the join (live messages follow with higher seqs), and for a join
/// with `since`, whether everything after it was replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    pub epoch: &'a str,
    pub seq: u64,
    pub recovered: Option<bool>,
}

/// The ack of a join in a history room (sent even without an `id`, as it
/// tells the client where it is).
pub fn join_ack_frame(id: Option<u64>, room: &str, at: &Position<'_>) -> Bytes {
    #[derive(Serialize)]
    struct JoinAck<'a> {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        room: &'a str,
        epoch: &'a str,
        seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    }
    text(&JoinAck {
        op: "ack",
        id,
        room,
        epoch: at.epoch,
        seq: at.seq,
        recovered: at.recovered,
    })
}

pub fn pong_frame(id: Option<u64>) -> Bytes {
    #[derive(Serialize)]
    struct Pong {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    }
    text(&Pong { op: "pong", id })
}

/// `{"op":"presence","room":…,"online":…}`: how many are in the room, on
/// every node. State, not a message: never part of a room's history.
/// `{"op":"skipped","room":…,"count":N}`: N messages of the room that this
/// lagging client was let miss (events its namespace lists in `droppable`).
pub fn skipped_frame(room: &str, count: u32) -> Bytes {
    #[derive(Serialize)]
    struct Skipped<'a> {
        op: &'static str,
        room: &'a str,
        count: u32,
    }
    text(&Skipped {
        op: "skipped",
        room,
        count,
    })
}

pub fn presence_frame(room: &str, online: u64) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        op: &'static str,
        room: &'a str,
        online: u64,
    }
    text(&Presence {
        op: "presence",
        room,
        online,
    })
}

pub fn error_frame(rejection: &Rejection) -> Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_ms: Option<u64>,
    }
    text(&Error {
        op: "error",
        id: rejection.id,
        code: rejection.code.as_str(),
        message: &brief(&rejection.message),
        retry_ms: rejection.retry_ms,
    })
}

/// `{"error":{"code":…,"message":…}}`, the body of every HTTP error.
pub fn http_error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": {"code": code, "message": brief(message)}}))
        .unwrap_or_default()
}

// ---- the bus envelope ----

/// What travels on the bus for one message: the payload of a Redis PUBLISH
/// to `<prefix>room:<room>`. Backends may publish it themselves; only
/// `event` and `data` are required.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// History rooms: the message's place in the room (set by the bus).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default)]
    pub from: Cow<'a, str>,
    /// The sending connection (client sends only).
    #[serde(borrow, default, skip_serializing_if = "str::is_empty")]
    pub conn: Cow<'a, str>,
    /// The sender's `info` claim, for authenticated senders.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub info: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// Absent means `null`, as for `POST /api/publish`.
    #[serde(borrow, default = "null_data")]
    pub data: &'a RawValue,
    /// Set for raw-mode sends: `"text"` (data is the text) or `"binary"` (data is base64).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Cow<'a, str>>,
}

fn null_data<'a>() -> &'a RawValue {
    RawValue::NULL
}

/// Who sent a message, as its envelope says: `from` is the user id of an
/// authenticated sender and the connection id of an anonymous one; `conn`
/// is always the connection. Backends publish with neither.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sender<'a> {
    pub from: &'a str,
    pub conn: &'a str,
    pub info: Option<&'a RawValue>,
}

/// Encode the envelope of a JSON-mode `send` (or a backend's publish).
pub fn json_envelope(event: &str, sender: Sender<'_>, data: &RawValue) -> Bytes {
    let env = Envelope {
        seq: None,
        epoch: None,
        event: Cow::Borrowed(event),
        from: Cow::Borrowed(sender.from),
        conn: Cow::Borrowed(sender.conn),
        info: sender.info,
        ts: Some(now_ms()),
        data,
        raw: None,
    };
    Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
}

/// Encode the envelope of a raw-mode frame (text or binary).
pub fn raw_envelope(sender: Sender<'_>, payload: &[u8], binary: bool) -> Bytes {
    let data = if binary {
        serde_json::value::to_raw_value(&base64::engine::general_purpose::STANDARD.encode(payload))
    } else {
        // Raw text frames were UTF-8 validated by the frame reader.
        serde_json::value::to_raw_value(&String::from_utf8_lossy(payload))
    };
    let Ok(data) = data else {
        return Bytes::new();
    };
    let env = Envelope {
        seq: None,
        epoch: None,
        event: Cow::Borrowed("message"),
        from: Cow::Borrowed(sender.from),
        conn: Cow::Borrowed(sender.conn),
        info: sender.info,
        ts: Some(now_ms()),
        data: &data,
        raw: Some(Cow::Borrowed(if binary { "binary" } else { "text" })),
    };
    Bytes::from(serde_json::to_vec(&env).unwrap_or_default())
}

/// A message ready to go out: complete WebSocket frames, built once per node
/// and shared by every local recipient.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// For JSON-mode clients: the `msg` frame.
    pub json: Bytes,
    /// For raw-mode clients: the original bytes of a raw send, or the `msg` frame's text.
    pub raw: Bytes,
    /// History rooms: the (last) message's place.
    pub stamp: Option<Stamp>,
    /// Its event is one its namespace lets a lagging viewer miss (all of
    /// them are, after [`Outgoing::concat`]).
    pub droppable: bool,
}

/// A message's place in its room's history: its `seq`, and its epoch as a
/// number to compare ([`epoch_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub epoch: u64,
}

/// An epoch as a number (a hash of its text), for comparing cheaply.
pub fn epoch_key(epoch: &str) -> u64 {
    // FNV-1a: a few bytes, no allocation, stable.
    epoch.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// `envelope` (a JSON object) with `"seq"` and `"epoch"` as its first
/// fields: what the history script does in Redis, for the memory bus.
pub fn stamp_envelope(envelope: &[u8], seq: u64, epoch: &str) -> Bytes {
    let rest = envelope.strip_prefix(b"{").unwrap_or(envelope);
    let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
    let mut out = BytesMut::with_capacity(envelope.len() + 48);
    out.extend_from_slice(format!("{{\"seq\":{seq},\"epoch\":\"{epoch}\"").as_bytes());
    match empty {
        true => out.extend_from_slice(b"}"),
        false => {
            out.extend_from_slice(b",");
            out.extend_from_slice(rest);
        }
    }
    out.freeze()
}

/// The `seq` and epoch of a stamped envelope, read from its first bytes
/// (as [`stamp_envelope`] and the history script write them) without
/// parsing the rest; `None` for an envelope without them.
pub fn peek_stamp(payload: &[u8]) -> Option<(u64, &str)> {
    let rest = payload.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"epoch\":\"")?;
    let end = rest.iter().position(|&b| b == b'"')?;
    // An escape would make this text differ from the parsed epoch.
    let epoch = &rest[..end];
    if epoch.contains(&b'\\') {
        return None;
    }
    Some((seq, std::str::from_utf8(epoch).ok()?))
}

/// Why a bus payload could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invalid envelope: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid envelope: raw binary data is not base64")]
    Base64,
    #[error("invalid envelope: `raw` must be \"text\" or \"binary\"")]
    RawKind,
}

impl Outgoing {
    /// The frames of one bus payload for `target` (the channel it arrived
    /// on): a `msg` with `room` for a room, with `to` for a user.
    pub fn from_envelope(target: Target<'_>, payload: &[u8]) -> Result<Outgoing, EnvelopeError> {
        Outgoing::from_envelope_marked(target, payload, |_| false)
    }

    /// [`Outgoing::from_envelope`], marked `droppable` when its event is.
    pub fn from_envelope_marked(
        target: Target<'_>,
        payload: &[u8],
        droppable: impl Fn(&str) -> bool,
    ) -> Result<Outgoing, EnvelopeError> {
        let env: Envelope = serde_json::from_slice(payload)?;
        #[derive(Serialize)]
        struct Msg<'a> {
            op: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            room: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            to: Option<&'a str>,
            event: &'a str,
            from: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            conn: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            info: Option<&'a RawValue>,
            ts: u64,
            data: &'a RawValue,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            binary: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            epoch: Option<&'a str>,
        }
        let (room, to) = match target {
            Target::Room(room) => (Some(room), None),
            Target::User(user) => (None, Some(user)),
        };
        let binary = match env.raw.as_deref() {
            None | Some("text") => false,
            Some("binary") => true,
            Some(_) => return Err(EnvelopeError::RawKind),
        };
        let msg = serde_json::to_vec(&Msg {
            op: "msg",
            room,
            to,
            event: &env.event,
            from: &env.from,
            conn: &env.conn,
            info: env.info,
            ts: env.ts.unwrap_or_else(now_ms),
            data: env.data,
            binary,
            seq: env.seq,
            epoch: env.epoch.as_deref(),
        })?;
        let json = ws::text_frame(&msg);
        let raw = match env.raw.as_deref() {
            None => json.clone(),
            Some("text") => {
                let text: Cow<str> = serde_json::from_str(env.data.get())?;
                ws::text_frame(text.as_bytes())
            }
            _ => {
                let b64: Cow<str> = serde_json::from_str(env.data.get())?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|_| EnvelopeError::Base64)?;
                ws::binary_frame(&bytes)
            }
        };
        let stamp = match (env.seq, env.epoch.as_deref()) {
            (Some(seq), Some(epoch)) => Some(Stamp {
                seq,
                epoch: epoch_key(epoch),
            }),
            _ => None,
        };
        Ok(Outgoing {
            json,
            raw,
            stamp,
            droppable: droppable(&env.event),
        })
    }

    /// Several messages as one: their frames back to back (the same bytes a
    /// client would get from separate writes). `None` for an empty list.
    pub fn concat(messages: &[Outgoing]) -> Option<Outgoing> {
        match messages {
            [] => None,
            [one] => Some(one.clone()),
            many => {
                let join = |pick: fn(&Outgoing) -> &Bytes| -> Bytes {
                    let mut all = BytesMut::with_capacity(many.iter().map(|m| pick(m).len()).sum());
                    for m in many {
                        all.extend_from_slice(pick(m));
                    }
                    all.freeze()
                };
                let json = join(|m| &m.json);
                // For JSON sends the raw frame is the JSON frame: share the buffer.
                let raw = if many.iter().all(|m| m.raw == m.json) {
                    json.clone()
                } else {
                    join(|m| &m.raw)
                };
                let stamp = many.iter().rev().find_map(|m| m.stamp);
                let droppable = many.iter().all(|m| m.droppable);
                Some(Outgoing {
                    json,
                    raw,
                    stamp,
                    droppable,
                })
            }
        }
    }

    pub fn frame_for(&self, format: Format) -> &Bytes {
        match format {
            Format::Json => &self.json,
            Format::Raw => &self.raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous connection `c` as the sender.
    fn conn_sender(c: &str) -> Sender<'_> {
        Sender {
            from: c,
            conn: c,
            info: None,
        }
    }

    #[test]
    fn ws_query_rooms_are_validated_deduplicated_and_capped() {
        let q = parse_ws_query("room=a&x=1&room=b&room=a", 2).unwrap();
        assert_eq!(q.format, Format::Json);
        assert_eq!(q.rooms, ["a", "b"]);
        assert_eq!(
            parse_ws_query("room=a&room=b&room=c", 2).unwrap_err().code,
            ErrorCode::TooManyRooms
        );
        assert_eq!(
            parse_ws_query("room=a%20b", 2).unwrap_err().code,
            ErrorCode::BadRoom
        );
        assert_eq!(
            parse_ws_query("room=", 2).unwrap_err().code,
            ErrorCode::BadRoom
        );
        let raw = parse_ws_query("format=raw&room=r", 2).unwrap();
        assert_eq!((raw.format, raw.rooms.len()), (Format::Raw, 1));
        for bad in ["format=raw", "format=raw&room=a&room=b", "format=xml"] {
            assert_eq!(
                parse_ws_query(bad, 8).unwrap_err().code,
                ErrorCode::BadRequest,
                "{bad}"
            );
        }
    }

    fn payload(frame: &Bytes) -> &str {
        let (_, payload) = ws::split_server_frame(frame).unwrap();
        std::str::from_utf8(payload).unwrap()
    }

    #[test]
    fn a_stamped_envelope_leads_with_seq_and_epoch_and_is_read_back() {
        let plain = json_envelope("e", conn_sender("c1"), RawValue::NULL);
        let stamped = stamp_envelope(&plain, 42, "1764120000123456");
        assert!(stamped.starts_with(br#"{"seq":42,"epoch":"1764120000123456","event":"e""#));
        assert_eq!(peek_stamp(&stamped), Some((42, "1764120000123456")));
        assert_eq!(peek_stamp(&plain), None);
        assert_eq!(
            &stamp_envelope(b"{ }", 1, "e")[..],
            br#"{"seq":1,"epoch":"e"}"#
        );
        // The node's frame carries them; its stamp compares epochs by key.
        let out = Outgoing::from_envelope(Target::Room("h:1"), &stamped).unwrap();
        let msg: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(
            (msg["seq"].as_u64(), msg["epoch"].as_str()),
            (Some(42), Some("1764120000123456"))
        );
        assert_eq!(
            out.stamp,
            Some(Stamp {
                seq: 42,
                epoch: epoch_key("1764120000123456")
            })
        );
        assert_ne!(epoch_key("a"), epoch_key("b"));
    }

    #[test]
    fn join_takes_since_or_history_and_the_url_takes_since() {
        let (_, r) =
            parse_request(r#"{"op":"join","room":"h:1","since":{"seq":5,"epoch":"e"}}"#).unwrap();
        let since = Since {
            seq: 5,
            epoch: "e".into(),
        };
        assert!(matches!(r, Request::Join { replay: Replay::Since(ref s), .. } if *s == since));
        let (_, r) = parse_request(r#"{"op":"join","room":"h:1","history":20}"#).unwrap();
        assert!(matches!(
            r,
            Request::Join {
                replay: Replay::Last(20),
                ..
            }
        ));
        let both = r#"{"op":"join","room":"h:1","since":{"seq":5,"epoch":"e"},"history":2}"#;
        assert_eq!(parse_request(both).unwrap_err().code, ErrorCode::BadFrame);
        let bad = r#"{"op":"join","room":"h:1","since":{"seq":-1,"epoch":"e"}}"#;
        assert_eq!(parse_request(bad).unwrap_err().code, ErrorCode::BadFrame);
        // `since=<room>:<seq>:<epoch>`: the room may hold colons; it is joined too.
        let q = parse_ws_query("room=a&since=live:h:1:41:e9", 4).unwrap();
        assert_eq!(q.rooms, ["a", "live:h:1"]);
        assert_eq!(
            q.since,
            [(
                "live:h:1".to_string(),
                Since {
                    seq: 41,
                    epoch: "e9".into()
                }
            )]
        );
        for bad in [
            "since=r1:x:e",
            "since=r1:5:",
            "since=5:e",
            "since=bad room:5:e",
        ] {
            assert!(parse_ws_query(bad, 4).is_err(), "{bad}");
        }
    }

    #[test]
    fn room_names() {
        assert!(valid_room("lobby"));
        assert!(valid_room("a.b:c@d_e-f"));
        assert!(valid_room(&"x".repeat(128)));
        assert!(!valid_room(""));
        assert!(!valid_room(&"x".repeat(129)));
        assert!(!valid_room("has space"));
        assert!(!valid_room("slash/"));
    }

    #[test]
    fn requests_parse_and_reject_with_codes() {
        let (id, req) = parse_request(
            r#"{"op":"send","room":"r1","event":"danmaku","data":{"t":"hi"},"id":9}"#,
        )
        .unwrap();
        assert_eq!(id, Some(9));
        match req {
            Request::Send { room, event, data } => {
                assert_eq!(room, "r1");
                assert_eq!(event, "danmaku");
                assert_eq!(data.get(), r#"{"t":"hi"}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
        let code = |t: &str| parse_request(t).unwrap_err();
        assert_eq!(code("nope").code, ErrorCode::BadFrame);
        assert_eq!(code("[1,2]").code, ErrorCode::BadFrame);
        assert_eq!(code(r#"{"room":"r1","id":3}"#).id, Some(3));
        assert_eq!(code(r#"{"op":"fly","id":4}"#).code, ErrorCode::UnknownOp);
        assert_eq!(
            code(r#"{"op":"join","room":"a b","id":5}"#).code,
            ErrorCode::BadRoom
        );
        let bad_type = code(r#"{"op":"join","room":7,"id":6}"#);
        assert_eq!((bad_type.code, bad_type.id), (ErrorCode::BadFrame, Some(6)));
    }

    #[test]
    fn json_depth_is_measured_outside_strings() {
        assert!(json_depth_within(r#"{"a":[1,{"b":2}]}"#, 3));
        assert!(!json_depth_within(r#"{"a":[1,{"b":2}]}"#, 2));
        assert!(json_depth_within(r#""[[[[\"[[[[""#, 1));
        assert!(json_depth_within(r#"[[1],[2],[3]]"#, 2));
    }

    #[test]
    fn error_messages_are_brief() {
        let long = "é".repeat(1000);
        let frame = error_frame(&Rejection::new(None, ErrorCode::BadFrame, long));
        assert!(frame.len() < MAX_ERROR_MESSAGE + 80, "{}", frame.len());
        let body = http_error_body("bad_frame", &"x".repeat(10_000));
        assert!(body.len() < MAX_ERROR_MESSAGE + 80);
        // Characters JSON escapes count as their escapes.
        for nasty in ["\\", "\"", "\u{1}"] {
            let frame = error_frame(&Rejection::new(
                None,
                ErrorCode::BadFrame,
                nasty.repeat(500),
            ));
            assert!(
                frame.len() < MAX_ERROR_MESSAGE + 80,
                "{nasty:?}: {}",
                frame.len()
            );
        }
    }

    #[test]
    fn json_send_reaches_json_and_raw_clients_as_the_msg_frame() {
        let data = serde_json::value::to_raw_value(&serde_json::json!({"t": "hi"})).unwrap();
        let env = json_envelope("danmaku", conn_sender("c1"), &data);
        let out = Outgoing::from_envelope(Target::Room("r1"), &env).unwrap();
        let v: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(v["op"], "msg");
        assert_eq!(v["room"], "r1");
        assert_eq!(v["event"], "danmaku");
        assert_eq!(v["from"], "c1");
        assert_eq!(v["data"]["t"], "hi");
        assert!(v["ts"].as_u64().unwrap() > 0);
        assert_eq!(out.raw, out.json);
    }

    #[test]
    fn raw_sends_round_trip_byte_for_byte() {
        let out = Outgoing::from_envelope(
            Target::Room("r"),
            &raw_envelope(conn_sender("c"), "héllo \"q\"".as_bytes(), false),
        )
        .unwrap();
        assert_eq!(payload(&out.raw), "héllo \"q\"");
        let v: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(v["data"], "héllo \"q\"");
        assert_eq!(v["event"], "message");

        let bin = [0u8, 159, 146, 150, 255];
        let out = Outgoing::from_envelope(
            Target::Room("r"),
            &raw_envelope(conn_sender("c"), &bin, true),
        )
        .unwrap();
        let (opcode, body) = ws::split_server_frame(&out.raw).unwrap();
        assert_eq!(opcode, ws::OPCODE_BINARY);
        assert_eq!(body, bin);
        let v: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(v["binary"], true);
    }

    #[test]
    fn concatenated_messages_are_the_frames_back_to_back() {
        let a = Outgoing::from_envelope(
            Target::Room("r"),
            &raw_envelope(conn_sender("c"), b"one", false),
        )
        .unwrap();
        let b = Outgoing::from_envelope(Target::Room("r"), br#"{"event":"e","data":2}"#).unwrap();
        let both = Outgoing::concat(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(both.json, [&a.json[..], &b.json[..]].concat());
        assert_eq!(both.raw, [&a.raw[..], &b.raw[..]].concat());
        assert!(Outgoing::concat(&[]).is_none());
    }

    #[test]
    fn backend_envelopes_need_only_an_event_and_data_defaults_to_null() {
        let out = Outgoing::from_envelope(Target::Room("r"), br#"{"event":"live","data":[1,2]}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(v["event"], "live");
        assert_eq!(v["from"], "");
        assert!(Outgoing::from_envelope(Target::Room("r"), b"not json").is_err());
        assert!(Outgoing::from_envelope(Target::Room("r"), br#"{"data":1}"#).is_err());
        // The same rule as POST /api/publish: no `data` is `null`.
        let out = Outgoing::from_envelope(Target::Room("r"), br#"{"event":"x"}"#).unwrap();
        let v: serde_json::Value = serde_json::from_str(payload(&out.json)).unwrap();
        assert_eq!(
            (v["event"].as_str(), v.get("data")),
            (Some("x"), Some(&serde_json::Value::Null))
        );
    }
}
