//! `{"op":"send","room":…,"event":…,"data":…}`: publish to a joined room;
//! `{"op":"send","to":<user>,…}`: to every connection of a user.

use serde_json::value::RawValue;

use super::{reject, Link, Session};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::Reply;
use crate::protocol;
use crate::topic::Topic;

/// The message goes to the bus from this session ([`Session::sender`]: its
/// user, or its connection when anonymous); the client hears `ack` or an
/// error once the bus has answered.
pub(super) async fn run(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    room: &str,
    event: &str,
    data: &RawValue,
) {
    let Some(topic) = session.room(room) else {
        return reject(
            link,
            Rejection::new(
                id,
                ErrorCode::NotJoined,
                format!("join room {room:?} before sending to it"),
            ),
        );
    };
    if let Err(r) = session.may_send(link, id) {
        return reject(link, r);
    }
    let envelope = protocol::json_envelope(event, session.sender(link.conn_id()), data);
    link.publish(topic.clone(), envelope, Reply::Ack(id)).await;
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
) {
    if session.identity.is_none() {
        return reject(
            link,
            Rejection::new(
                id,
                ErrorCode::Forbidden,
                "only authenticated connections may send to users",
            ),
        );
    }
    if let Err(r) = session.may_send(link, id) {
        return reject(link, r);
    }
    let envelope = protocol::json_envelope(event, session.sender(link.conn_id()), data);
    link.publish(Topic::user(user), envelope, Reply::Ack(id))
        .await;
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
    fn sends_beyond_the_rate_are_refused_with_rate_limited() {
        let mut link = Recorder::new();
        link.limits.messages = Rate {
            per_second: 1,
            burst: 2,
        };
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
        assert_eq!(link.published.borrow().len(), 2);
        // A second later one more is allowed.
        link.now.set(1000);
        now(s.json(&link, br#"{"op":"send","room":"r1","event":"e","id":9}"#));
        assert_eq!(link.published.borrow().len(), 3);
    }
}
