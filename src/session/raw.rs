//! Raw mode: every text or binary frame is a message to the connection's one room.

use super::{Link, Session};
use crate::gateway::Reply;
use crate::protocol;
use crate::topic::Target;

/// Rate-limited and permitted like JSON sends; a frame beyond the rate, not
/// allowed, or refused by the bus is dropped and counted, as a raw client
/// has no error frames. Refusals count towards the abuse close as JSON ones do.
pub(super) async fn run(session: &mut Session, link: &impl Link, payload: &[u8], binary: bool) {
    let Some(topic) = session.rooms.first().cloned() else {
        return;
    };
    let room = match topic.target() {
        Target::Room(room) => room,
        Target::User(_) => return,
    };
    if let Err(refused) = session.may_send_to(link, room, "message", payload.len()) {
        if !session.abusive(link, refused.code) {
            link.dropped(refused.code.as_str());
        }
        return;
    }
    session.refusals = 0;
    let envelope = protocol::raw_envelope(session.sender(link.conn_id()), payload, binary);
    link.publish(topic, envelope, Reply::Raw).await;
}

#[cfg(test)]
mod tests {
    use crate::limit::Rate;
    use crate::session::testing::{now, Recorder};
    use crate::session::Session;
    use crate::topic::Topic;

    #[test]
    fn raw_frames_go_to_the_room_and_beyond_the_rate_are_dropped() {
        let mut link = Recorder::new();
        link.limits.messages = Rate {
            per_second: 1,
            burst: 1,
        };
        link.rebuild();
        let mut s = Session::new(&link.limits, 0, vec![Topic::room("r")], None);
        now(s.raw(&link, b"hi", false));
        now(s.raw(&link, b"again", false));
        let published = link.published.borrow();
        assert_eq!(published.len(), 1);
        assert_eq!(published[0].1["raw"], "text");
        assert_eq!(published[0].1["data"], "hi");
        assert_eq!(*link.dropped.borrow(), ["rate_limited"]);
        // Past limits.abuse_threshold refusals in a row, the connection is closed.
        drop(published);
        link.limits.abuse_threshold = 2;
        for _ in 0..3 {
            now(s.raw(&link, b"flood", false));
        }
        assert!(link.abused.get());
        assert!(link.take_replies().is_empty());
    }
}
