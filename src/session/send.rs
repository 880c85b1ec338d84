//! `{"op":"send","room":…,"event":…,"data":…}`: publish to a joined room.

use serde_json::value::RawValue;

use super::{reject, Link, Session};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::Reply;
use crate::protocol;

/// The message goes to the bus with this connection's id as `from`; the
/// client hears `ack` or an error once the bus has answered.
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
    let envelope = protocol::json_envelope(event, link.conn_id(), data);
    link.publish(topic.clone(), envelope, Reply::Ack(id)).await;
}

#[cfg(test)]
mod tests {
    use crate::limit::Rate;
    use crate::session::testing::{now, Recorder};
    use crate::topic::Topic;

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
