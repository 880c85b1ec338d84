//! The one vocabulary of refusals: every error frame, every HTTP error body
//! and every close reason the gateway sends comes from here.
//!
//! - [`ErrorCode`]: the stable `code` of `{"op":"error"}` frames and of HTTP
//!   error bodies `{"error":{"code":…,"message":…}}`, each with the HTTP
//!   status it is answered with ([`ErrorCode::http_status`]).
//! - [`Rejection`]: a code, a human message and the request's `id`; rendered
//!   as an error frame ([`crate::protocol::error_frame`]) or an HTTP body.
//! - Close codes and their reasons: [`crate::ws::close`].

/// The stable error codes (docs/protocol.md lists what each one promises).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed input: not JSON, a missing or mistyped field, `data` too deep.
    BadFrame,
    UnknownOp,
    BadRoom,
    NotJoined,
    TooManyRooms,
    RateLimited,
    /// Certainly not delivered to anyone (the bus is down); safe to retry.
    Unavailable,
    /// Sent to the bus, outcome unknown.
    Unconfirmed,
    /// No valid credentials: a bad, expired or missing token (HTTP 401 at
    /// the upgrade, an error frame for `refresh`), or a missing API key.
    Unauthorized,
    /// Valid credentials that do not allow this (a room, sending).
    Forbidden,
    /// HTTP: a malformed upgrade or API request.
    BadRequest,
    /// HTTP: no such endpoint (or not on this listener).
    NotFound,
    MethodNotAllowed,
    /// HTTP: the body is larger than `limits.max_message_bytes`.
    TooBig,
    /// HTTP: the body did not arrive within `server.body_timeout`.
    Timeout,
    UnsupportedMediaType,
    /// HTTP: `/ws` without a WebSocket upgrade.
    NotWebsocket,
    /// HTTP: the node is draining.
    ShuttingDown,
    /// HTTP: the node holds `limits.max_connections`.
    TooManyConnections,
    /// HTTP: new connections beyond `limits.connections_per_second` (with Retry-After).
    Busy,
    /// HTTP: `limits.max_connections_per_ip` from this client address.
    TooManyConnectionsFromIp,
}

impl ErrorCode {
    /// The codes `roomcast_client_errors_total{code}` exports from the
    /// start: those of error frames, and `bad_request`.
    pub const CLIENT_ERRORS: [ErrorCode; 11] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownOp,
        ErrorCode::BadRoom,
        ErrorCode::NotJoined,
        ErrorCode::TooManyRooms,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Unconfirmed,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unconfirmed => "unconfirmed",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::TooBig => "too_big",
            ErrorCode::Timeout => "timeout",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::NotWebsocket => "not_websocket",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Busy => "busy",
            ErrorCode::TooManyConnectionsFromIp => "too_many_connections_from_ip",
        }
    }

    /// The HTTP status a refusal with this code is answered with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadFrame
            | ErrorCode::UnknownOp
            | ErrorCode::BadRoom
            | ErrorCode::TooManyRooms
            | ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::Timeout => 408,
            ErrorCode::NotJoined => 409,
            ErrorCode::TooBig => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::NotWebsocket => 426,
            ErrorCode::RateLimited | ErrorCode::TooManyConnectionsFromIp => 429,
            ErrorCode::Unavailable
            | ErrorCode::ShuttingDown
            | ErrorCode::TooManyConnections
            | ErrorCode::Busy => 503,
            ErrorCode::Unconfirmed => 504,
        }
    }
}

/// A refused request: the code, a human message, and the request's id if it had one.
#[derive(Debug)]
pub struct Rejection {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited`: milliseconds until a retry can succeed.
    pub retry_ms: Option<u64>,
}

impl Rejection {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            id,
            code,
            message: message.into(),
            retry_ms: None,
        }
    }

    /// The same refusal with a retry hint.
    pub fn with_retry_ms(mut self, ms: u64) -> Self {
        self.retry_ms = Some(ms);
        self
    }

    /// The same refusal, answering the request with this id.
    pub fn with_id(mut self, id: Option<u64>) -> Self {
        self.id = id;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_codes_are_client_errors_and_http_codes_have_error_statuses() {
        for code in ErrorCode::CLIENT_ERRORS {
            assert!(code.http_status() >= 400, "{code:?}");
        }
        assert_eq!(ErrorCode::Unconfirmed.http_status(), 504);
        assert_eq!(ErrorCode::RateLimited.as_str(), "rate_limited");
    }
}
