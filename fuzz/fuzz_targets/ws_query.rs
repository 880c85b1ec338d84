//! Fuzz target: `roomcast::protocol::parse_ws_query`, the `/ws?…` query.
//!
//! Input: byte 0 gives `max_rooms` (0..=39), the rest is the query string
//! (skipped unless UTF-8, as a request target is). Checked:
//! - no panic;
//! - `Ok`: every room is valid, none twice, at most `max_rooms`, and they
//!   are exactly the distinct rooms of the query's `room` values and `since`
//!   values (`<room>:<seq>:<epoch>`), in order; each `since` room is among
//!   them, once, with the last seq and epoch given for it; the
//!   format is the last `format` given (JSON by default); raw mode has
//!   exactly one room;
//! - `Err`: one of the documented codes, and a bounded HTTP error body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{
    http_error_body, parse_ws_query, valid_room, ErrorCode, Format, MAX_ERROR_MESSAGE,
};

fuzz_target!(|data: &[u8]| {
    let [m, query @ ..] = data else {
        return;
    };
    let max_rooms = *m as usize % 40;
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    match parse_ws_query(query, max_rooms) {
        Ok(q) => {
            assert!(
                q.rooms.len() <= max_rooms,
                "{} rooms > {max_rooms}",
                q.rooms.len()
            );
            let mut distinct: Vec<String> = Vec::new();
            let mut format = Format::Json;
            let mut since: Vec<(String, u64, String)> = Vec::new();
            for (key, value) in form_urlencoded::parse(query.as_bytes()) {
                let (key, value) = match &*key {
                    "since" => {
                        let mut parts = value.rsplitn(3, ':');
                        let epoch = parts.next().expect("an accepted since has an epoch");
                        let seq: u64 = parts.next().and_then(|s| s.parse().ok()).expect("a seq");
                        let room = parts.next().expect("a room").to_owned();
                        since.retain(|(r, _, _)| *r != room);
                        since.push((room.clone(), seq, epoch.to_owned()));
                        (
                            std::borrow::Cow::Borrowed("room"),
                            std::borrow::Cow::Owned(room),
                        )
                    }
                    _ => (key, value),
                };
                match &*key {
                    "room" if !distinct.iter().any(|r| *r == value) => {
                        distinct.push(value.into_owned())
                    }
                    "format" if value == "raw" => format = Format::Raw,
                    "format" => format = Format::Json,
                    _ => {}
                }
            }
            assert_eq!(q.rooms, distinct);
            let got: Vec<(String, u64, String)> = q
                .since
                .iter()
                .map(|(r, s)| (r.clone(), s.seq, s.epoch.clone()))
                .collect();
            assert_eq!(got, since);
            assert_eq!(q.format, format);
            for (i, room) in q.rooms.iter().enumerate() {
                assert!(valid_room(room), "invalid room {room:?} accepted");
                assert!(!q.rooms[..i].contains(room), "room {room:?} twice");
            }
            if q.format == Format::Raw {
                assert_eq!(q.rooms.len(), 1, "raw mode with {} rooms", q.rooms.len());
            }
        }
        Err(rejection) => {
            assert!(
                matches!(
                    rejection.code,
                    ErrorCode::BadRoom | ErrorCode::TooManyRooms | ErrorCode::BadRequest
                ),
                "code {:?}",
                rejection.code
            );
            let body = http_error_body(rejection.code.as_str(), &rejection.message);
            assert!(
                body.len() <= MAX_ERROR_MESSAGE + 100,
                "error body of {}",
                body.len()
            );
        }
    }
});
