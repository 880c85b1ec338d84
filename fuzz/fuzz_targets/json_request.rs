//! Fuzz target: `roomcast::protocol::parse_request`, the JSON client request.
//!
//! Input: any bytes; only valid UTF-8 is a text frame (the frame reader
//! refuses the rest), so other inputs are skipped. Checked:
//! - no panic;
//! - `Ok`: rooms are valid, `event` is 1–128 bytes, `data` is valid JSON
//!   nested at most `MAX_JSON_DEPTH` deep, and the request's `op` and `id`
//!   are the ones in the text;
//! - `Err`: the error frame sent back is a well-formed, bounded WebSocket
//!   text frame (what a client sent is never echoed at length).

#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{
    error_frame, json_depth_within, parse_request, valid_room, valid_user, Request,
    MAX_ERROR_MESSAGE, MAX_EVENT_LEN, MAX_JSON_DEPTH,
};
use roomcast::ws;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(text) {
        Ok((id, request)) => {
            // The text is a JSON object (serde_json's Value may still refuse
            // a number out of f64 range in an ignored field: then skip this).
            let value: Option<serde_json::Value> = serde_json::from_str(text).ok();
            let field = |k: &str| value.as_ref().and_then(|v| v.get(k).cloned());
            let op = match &request {
                Request::Join { room, .. } | Request::Leave { room } => {
                    assert!(valid_room(room), "invalid room {room:?} accepted");
                    if value.is_some() {
                        assert_eq!(
                            field("room").as_ref().and_then(|r| r.as_str()),
                            Some(&**room)
                        );
                    }
                    if matches!(request, Request::Join { .. }) {
                        "join"
                    } else {
                        "leave"
                    }
                }
                Request::Send { room, event, data } => {
                    assert!(valid_room(room), "invalid room {room:?} accepted");
                    assert!(
                        !event.is_empty() && event.len() <= MAX_EVENT_LEN,
                        "event {event:?}"
                    );
                    assert!(
                        serde_json::from_str::<&RawValue>(data.get()).is_ok(),
                        "data is not JSON: {:?}",
                        data.get()
                    );
                    assert!(json_depth_within(data.get(), MAX_JSON_DEPTH));
                    "send"
                }
                Request::SendToUser { user, event, data } => {
                    assert!(valid_user(user), "invalid user {user:?} accepted");
                    if value.is_some() {
                        assert_eq!(field("to").as_ref().and_then(|r| r.as_str()), Some(&**user));
                        assert!(field("room").is_none_or(|r| r.is_null()));
                    }
                    assert!(!event.is_empty() && event.len() <= MAX_EVENT_LEN);
                    assert!(json_depth_within(data.get(), MAX_JSON_DEPTH));
                    "send"
                }
                Request::Refresh { token } => {
                    if value.is_some() {
                        assert_eq!(
                            field("token").as_ref().and_then(|t| t.as_str()),
                            Some(&**token)
                        );
                    }
                    "refresh"
                }
                Request::Ping => "ping",
            };
            if value.is_some() {
                assert_eq!(field("op").as_ref().and_then(|o| o.as_str()), Some(op));
                assert_eq!(field("id").and_then(|i| i.as_u64()), id);
            }
        }
        Err(rejection) => {
            let frame = error_frame(&rejection);
            let (opcode, payload) = ws::split_server_frame(&frame).expect("error frame parses");
            assert_eq!(opcode, ws::OPCODE_TEXT);
            assert!(
                payload.len() <= MAX_ERROR_MESSAGE + 100,
                "error frame of {} bytes",
                payload.len()
            );
            let v: serde_json::Value =
                serde_json::from_slice(payload).expect("error frame is JSON");
            assert_eq!(v["op"], "error");
            assert_eq!(v["id"].as_u64(), rejection.id);
        }
    }
});
