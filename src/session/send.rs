//! `{"op":"send","room":…,"event":…,"data":…}`: publish to a joined room;
//! `{"op":"send","to":<user>,…}`: to every connection of a user.

use serde_json::value::RawValue;

use super::{ack, Link, Session};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::Reply;
use crate::protocol;
use crate::topic::Topic;

/// The message goes to the bus from this session ([`Session::sender`]: its
/// user, or its connection when anonymous); the client hears `ack` or an
/// error once the bus has answered. The room's namespace decides whether
/// the client may send, how large `data` may be, the rate, and whether the
/// event is aggregated (then the ack means "counted into this node's next
/// window").
pub(super) async fn run(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    room: &str,
    event: &str,
    data: &RawValue,
) -> Result<(), Rejection> {
    let Some(topic) = session.room(room).cloned() else {
        return Err(Rejection::new(
            id,
            ErrorCode::NotJoined,
            format!("join room {room:?} before sending to it"),
        ));
    };
    let aggregated = session.may_send_to(link, room, event, data.get().len())?;
    if aggregated {
        link.aggregate(&topic, event);
        ack(link, id);
        return Ok(());
    }
    let envelope = protocol::json_envelope(event, session.sender(link.conn_id()), data);
    link.publish(topic, envelope, Reply::Ack(id)).await;
    Ok(())
}

/// Only authenticated senders may write to a user (that is how co-hosts
/// exchange WebRTC offers); the recipient's connections get a `msg` with
/// `to` and the sender's user id as `from`. The ack promises what a room
/// send's does: it says nothing of whether the user is online.
pub(super) async fn to_user(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    user: &str,
    event: &str,
    data: &RawValue,
) -> Result<(), Rejection> {
    if session.identity.is_none() {
        return Err(Rejection::new(
            id,
            ErrorCode::Forbidden,
            "only authenticated connections may send to users",
        ));
    }
    session.may_send(link)?;
    session.take_message(link, None, event)?;
    let envelope = protocol::json_envelope(event, session.sender(link.conn_id()), data);
    link.publish(Topic::user(user), envelope, Reply::Ack(id))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::limit::Rate;
    use crate::session::testing::{identity, now, Recorder};
    use crate::topic::Topic;

    #[test]
    fn an_authenticated_sender_is_its_user_and_cannot_forge_from_or_info() {
        let link = Recorder::new();
        let mut id = identity("ana");
        id.info = Some(
            serde_json::value::to_raw_value(&serde_json::json!({"name": "Ana"}))
                .unwrap()
                .into(),
        );
        let mut s = link.session_as(id);
        now(s.json(&link, br#"{"op":"join","room":"r1"}"#));
        now(s.json(
            &link,
            br#"{"op":"send","room":"r1","event":"e","from":"bob","info":{"name":"Bob"},"data":1}"#,
        ));
        now(s.json(
            &link,
            br#"{"op":"send","to":"bob","event":"rtc.offer","data":{"sdp":"x"},"id":3}"#,
        ));
        let published = link.published.borrow();
        let (_, room_msg) = &published[0];
        assert_eq!(
            (room_msg["from"].as_str(), room_msg["conn"].as_str()),
            (Some("ana"), Some("n1-1"))
        );
        assert_eq!(room_msg["info"]["name"], "Ana");
        let (topic, to_bob) = &published[1];
        assert_eq!(*topic, Topic::user("bob"));
        assert_eq!(to_bob["from"], "ana");
        assert_eq!(to_bob["data"]["sdp"], "x");
    }

    #[test]
    fn anonymous_and_read_only_connections_are_forbidden_to_send_as_configured() {
        let mut link = Recorder::new();
        link.auth.anonymous_send = false;
        link.rebuild();
        let mut anon = link.session();
        now(anon.json(&link, br#"{"op":"join","room":"r1"}"#));
        now(anon.json(&link, br#"{"op":"send","room":"r1","event":"e","id":1}"#));
        now(anon.json(&link, br#"{"op":"send","to":"bob","event":"e","id":2}"#));
        let mut read_only = identity("ana");
        read_only.can_send = false;
        let mut ro = link.session_as(read_only);
        now(ro.json(&link, br#"{"op":"join","room":"r1"}"#));
        now(ro.json(&link, br#"{"op":"send","room":"r1","event":"e","id":3}"#));
        let codes: Vec<_> = link
            .take_replies()
            .into_iter()
            .filter(|r| r["op"] == "error")
            .map(|r| (r["id"].as_u64(), r["code"].as_str().map(str::to_owned)))
            .collect();
        let forbidden = Some("forbidden".to_owned());
        assert_eq!(
            codes,
            [
                (Some(1), forbidden.clone()),
                (Some(2), forbidden.clone()),
                (Some(3), forbidden)
            ]
        );
        assert!(link.published.borrow().is_empty());
    }

    #[test]
    fn a_send_to_a_joined_room_is_published_from_this_connection() {
        let link = Recorder::new();
        let mut s = link.session();
        now(s.json(
            &link,
            br#"{"op":"send","room":"r1","event":"danmaku","data":1,"id":1}"#,
        ));
        assert_eq!(link.take_replies()[0]["code"], "not_joined");
        now(s.json(&link, br#"{"op":"join","room":"r1"}"#));
        assert_eq!(link.take_replies()[0]["op"], "presence");
        now(s.json(
            &link,
            br#"{"op":"send","room":"r1","event":"danmaku","data":{"t":"hi"},"id":2}"#,
        ));
        let published = link.published.borrow();
        assert_eq!(published.len(), 1);
        let (topic, envelope) = &published[0];
        assert_eq!(*topic, Topic::room("r1"));
        assert_eq!(envelope["event"], "danmaku");
        assert_eq!(envelope["from"], "n1-1");
        assert_eq!(envelope["data"]["t"], "hi");
        assert_eq!(link.take_replies()[0]["op"], "ack");
    }

    #[test]
    fn a_namespace_decides_who_sends_what_how_often_and_what_is_aggregated() {
        use crate::namespace::{Defaults, Namespaces, RawNamespace};
        let mut link = Recorder::new();
        let raw: Vec<RawNamespace> = toml::from_str::<toml::Table>(
            r#"
            [[ns]]
            prefix = "live:"
            anonymous_send = false
            max_message_bytes = 10
            aggregate = ["like"]
            events = { danmaku = { per_second = 1, burst = 1 } }
            [[ns]]
            prefix = "news:"
            client_send = false
            "#,
        )
        .unwrap()["ns"]
            .clone()
            .try_into()
            .unwrap();
        link.namespaces = Namespaces::new(
            Defaults {
                anonymous_join: true,
                anonymous_send: true,
                max_message_bytes: 65536,
                messages: link.limits.messages,
                aggregate: &[],
                events: &Default::default(),
            },
            &raw,
        )
        .unwrap();
        let mut anon = link.session();
        let mut ana = link.session_as(identity("ana"));
        for s in [&mut anon, &mut ana] {
            now(s.json(&link, br#"{"op":"join","room":"live:1"}"#));
            now(s.json(&link, br#"{"op":"join","room":"news:1"}"#));
        }
        link.take_replies();
        let send = |s: &mut crate::session::Session, frame: &str| {
            now(s.json(&link, frame.as_bytes()));
            let reply = link.take_replies().pop().unwrap();
            (reply["code"].as_str().unwrap_or("ack").to_owned(), reply)
        };
        assert_eq!(
            send(
                &mut anon,
                r#"{"op":"send","room":"live:1","event":"danmaku","id":1}"#
            )
            .0,
            "forbidden"
        );
        assert_eq!(
            send(
                &mut ana,
                r#"{"op":"send","room":"news:1","event":"e","id":2}"#
            )
            .0,
            "forbidden"
        );
        assert_eq!(
            send(
                &mut ana,
                r#"{"op":"send","room":"live:1","event":"e","data":"0123456789","id":3}"#
            )
            .0,
            "bad_frame"
        );
        assert_eq!(
            send(
                &mut ana,
                r#"{"op":"send","room":"live:1","event":"danmaku","id":4}"#
            )
            .0,
            "ack"
        );
        let (code, reply) = send(
            &mut ana,
            r#"{"op":"send","room":"live:1","event":"danmaku","id":5}"#,
        );
        assert_eq!(
            (code.as_str(), reply["retry_ms"].as_u64()),
            ("rate_limited", Some(1000))
        );
        // Another event is not held back by danmaku's rate; likes are counted, not published.
        assert_eq!(
            send(
                &mut ana,
                r#"{"op":"send","room":"live:1","event":"gift","id":6}"#
            )
            .0,
            "ack"
        );
        for id in 7..10 {
            let like = format!(r#"{{"op":"send","room":"live:1","event":"like","id":{id}}}"#);
            assert_eq!(send(&mut ana, &like).0, "ack");
        }
        assert_eq!(link.aggregated.borrow().len(), 3);
        let published: Vec<String> = link
            .published
            .borrow()
            .iter()
            .map(|(_, e)| e["event"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(published, ["danmaku", "gift"]);
        assert_eq!(*link.rate_limited.borrow(), ["danmaku"]);
    }

    #[test]
    fn a_connection_refused_past_the_abuse_threshold_is_closed() {
        let mut link = Recorder::new();
        link.limits.abuse_threshold = 3;
        link.auth.anonymous_send = false;
        link.rebuild();
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"join","room":"r"}"#));
        for _ in 0..3 {
            now(s.json(&link, br#"{"op":"send","room":"r","event":"e"}"#));
        }
        assert!(!link.abused.get());
        // An accepted request starts the count over.
        now(s.json(&link, br#"{"op":"ping"}"#));
        for _ in 0..3 {
            now(s.json(&link, br#"{"op":"send","room":"r","event":"e"}"#));
        }
        assert!(!link.abused.get());
        now(s.json(&link, br#"{"op":"send","room":"r","event":"e"}"#));
        assert!(link.abused.get());
    }

    #[test]
    fn sends_beyond_the_rate_are_refused_with_rate_limited() {
        let mut link = Recorder::new();
        link.limits.messages = Rate {
            per_second: 1,
            burst: 2,
        };
        link.rebuild();
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"join","room":"r1"}"#));
        assert_eq!(link.take_replies()[0]["op"], "presence");
        for id in 0..3 {
            let frame = format!(r#"{{"op":"send","room":"r1","event":"e","id":{id}}}"#);
            now(s.json(&link, frame.as_bytes()));
        }
        let replies = link.take_replies();
        assert_eq!(replies[2]["code"], "rate_limited");
        assert_eq!(replies[2]["id"], 2);
        // A hint: the next token is a second away (1/s).
        assert_eq!(replies[2]["retry_ms"], 1000);
        assert_eq!(link.published.borrow().len(), 2);
        // A second later one more is allowed.
        link.now.set(1000);
        now(s.json(&link, br#"{"op":"send","room":"r1","event":"e","id":9}"#));
        assert_eq!(link.published.borrow().len(), 3);
    }
}
