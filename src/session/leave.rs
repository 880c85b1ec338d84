//! `{"op":"leave","room":…}`: stop receiving a room's messages.

use super::{ack, Link, Session};
use crate::error::{ErrorCode, Rejection};

pub(super) async fn run(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    room: &str,
) -> Result<(), Rejection> {
    let Some(pos) = session.position(room) else {
        return Err(Rejection::new(
            id,
            ErrorCode::NotJoined,
            format!("not in room {room:?}"),
        ));
    };
    let topic = session.rooms.swap_remove(pos);
    link.leave(&topic);
    ack(link, id);
    session.announce(link, &topic, "leave").await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::session::testing::{now, Recorder};

    #[test]
    fn leave_acks_a_joined_room_and_refuses_any_other() {
        let link = Recorder::new();
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"join","room":"r1"}"#));
        assert_eq!(link.take_replies()[0]["op"], "presence");
        now(s.json(&link, br#"{"op":"leave","room":"r2","id":1}"#));
        now(s.json(&link, br#"{"op":"leave","room":"r1","id":2}"#));
        let replies = link.take_replies();
        assert_eq!(replies[0]["code"], "not_joined");
        assert_eq!(replies[1], json!({"op":"ack","id":2}));
        assert!(link.joined.borrow().is_empty());
        assert!(s.rooms().is_empty());
    }
}
