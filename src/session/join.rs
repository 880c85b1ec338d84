//! `{"op":"join","room":…}`: start receiving a room's messages; in a
//! history room, from a point (`since`) or with its last messages (`history`).

use super::{ack, Link, Session};
use crate::bus::{Page, Pick};
use crate::error::{ErrorCode, Rejection};
use crate::namespace::History;
use crate::protocol::{self, Outgoing, Position, Replay, Stamp};
use crate::topic::{Target, Topic};

/// Acked only once this node receives the room's messages (the subscription
/// is in effect on the bus); while the bus is down the join is undone and
/// refused with `unavailable`. After the ack, a `presence` frame: how many
/// are in the room now. Joining a room twice is acked and changes nothing.
/// A token with a `rooms` claim allows only the rooms it names, and a
/// namespace may refuse anonymous connections (`forbidden` otherwise).
/// `since` and `history` are for history rooms (`bad_request` elsewhere).
pub(super) async fn run(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    room: &str,
    replay: Replay,
) -> Result<(), Rejection> {
    if session.room(room).is_some() {
        ack(link, id);
        return Ok(());
    }
    session.may_join(link, room).map_err(|r| r.with_id(id))?;
    let max = link.limits().max_rooms_per_connection;
    if session.rooms.len() >= max {
        return Err(Rejection::new(
            id,
            ErrorCode::TooManyRooms,
            format!("a connection may join at most {max} rooms"),
        ));
    }
    let topic = Topic::room(room);
    let Some(rule) = link.namespaces().of(room).history else {
        if replay != Replay::None {
            return Err(Rejection::new(
                id,
                ErrorCode::BadRequest,
                format!("room {room:?} keeps no history: join it without `since` or `history`"),
            ));
        }
        return live(session, link, id, topic).await;
    };
    link.hold(&topic);
    held(session, link, id, topic, rule, replay).await
}

/// A join of a room without history.
async fn live(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    topic: Topic,
) -> Result<(), Rejection> {
    link.join(&topic);
    if !link.synced().await {
        link.leave(&topic);
        return Err(unavailable(id));
    }
    ack(link, id);
    joined(session, link, topic).await;
    Ok(())
}

fn unavailable(id: Option<u64>) -> Rejection {
    Rejection::new(
        id,
        ErrorCode::Unavailable,
        "the bus is down: not joined; retry later",
    )
}

/// The join is in effect: the presence frame, the join event, the room.
async fn joined(session: &mut Session, link: &impl Link, topic: Topic) {
    if let Target::Room(room) = topic.target() {
        let online = link.joined(&topic).await;
        link.reply(&protocol::presence_frame(room, online));
    }
    session.announce(link, &topic, "join").await;
    session.rooms.push(topic);
}

/// A held join of a history room ([`Link::hold`] done): once subscribed,
/// read the room's history, then release the client with an ack that says
/// where it is (`epoch`, `seq`; with `since`, whether it `recovered`), the
/// replay, and what arrived meanwhile after it. A `since` of another epoch,
/// or older than what history still keeps, replays nothing and says
/// `"recovered":false`: the client must reload its state.
pub(super) async fn held(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    topic: Topic,
    rule: History,
    replay: Replay,
) -> Result<(), Rejection> {
    if !link.synced().await {
        link.abandon(&topic);
        return Err(unavailable(id));
    }
    let pick = match &replay {
        Replay::Since(since) => Pick::After(since.seq),
        Replay::Last(n) => Pick::Last((*n).min(rule.size)),
        Replay::None => Pick::Last(0),
    };
    let page = match link.history(&topic, rule, pick).await {
        Ok(page) => page,
        Err(e) => {
            link.abandon(&topic);
            return Err(Rejection::new(
                id,
                e.code(),
                format!("not joined: the room's history could not be read ({e})"),
            ));
        }
    };
    let recovered = match &replay {
        Replay::Since(since) => Some(recoverable(&page, since)),
        _ => None,
    };
    link.history_join(match (&replay, recovered) {
        (_, Some(true)) => "recovered",
        (_, Some(false)) => "not_recovered",
        (Replay::Last(_), _) => "history",
        _ => "live",
    });
    let Target::Room(room) = topic.target() else {
        link.abandon(&topic);
        return Ok(());
    };
    let entries = match recovered {
        Some(false) => Vec::new(),
        _ => page.entries,
    };
    let frames: Vec<Outgoing> = entries
        .iter()
        .filter_map(|e| Outgoing::from_envelope(topic.target(), e).ok())
        .collect();
    let head = protocol::join_ack_frame(
        id,
        room,
        &Position {
            epoch: &page.epoch,
            seq: page.top,
            recovered,
        },
    );
    let at = Stamp {
        seq: page.top,
        epoch: protocol::epoch_key(&page.epoch),
    };
    link.release(&topic, &[head], &frames, at);
    joined(session, link, topic).await;
    Ok(())
}

/// Whether everything after `since` is in `page`: the same epoch, not
/// ahead of the room, and nothing between it and the oldest kept message.
fn recoverable(page: &Page, since: &protocol::Since) -> bool {
    since.epoch == page.epoch && since.seq <= page.top && since.seq + 1 >= page.oldest
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::auth::RoomPattern;
    use crate::session::testing::{identity, now, Recorder};
    use crate::topic::Topic;

    #[test]
    fn a_token_with_rooms_allows_only_those() {
        let link = Recorder::new();
        let mut id = identity("u1");
        id.rooms = Some(vec![RoomPattern::Prefix("live:".into())]);
        let mut s = link.session_as(id);
        now(s.json(&link, br#"{"op":"join","room":"live:1","id":1}"#));
        now(s.json(&link, br#"{"op":"join","room":"dm:1","id":2}"#));
        let replies: Vec<_> = link
            .take_replies()
            .into_iter()
            .filter(|r| r["op"] != "presence")
            .collect();
        assert_eq!(replies[0]["op"], "ack");
        assert_eq!(
            (replies[1]["code"].as_str(), replies[1]["id"].as_u64()),
            (Some("forbidden"), Some(2))
        );
        assert_eq!(s.rooms(), [Topic::room("live:1")]);
    }

    #[test]
    fn a_join_is_acked_once_in_effect_and_a_second_join_changes_nothing() {
        let link = Recorder::new();
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"join","room":"r1","id":1}"#));
        now(s.json(&link, br#"{"op":"join","room":"r1","id":2}"#));
        assert_eq!(
            link.take_replies(),
            [
                json!({"op":"ack","id":1}),
                json!({"op":"presence","room":"r1","online":1}),
                json!({"op":"ack","id":2})
            ]
        );
        assert_eq!(*link.joined.borrow(), [Topic::room("r1")]);
        assert_eq!(s.rooms(), [Topic::room("r1")]);
    }

    #[test]
    fn joins_beyond_the_limit_are_refused() {
        let link = Recorder::new(); // max_rooms_per_connection = 2
        let mut s = link.session();
        for (i, room) in ["a", "b", "c"].iter().enumerate() {
            let frame = format!(r#"{{"op":"join","room":"{room}","id":{i}}}"#);
            now(s.json(&link, frame.as_bytes()));
        }
        let replies = link.take_replies();
        assert_eq!(replies[4]["code"], "too_many_rooms");
        assert_eq!(replies[4]["id"], 2);
        assert_eq!(s.rooms().len(), 2);
    }

    #[test]
    fn a_join_while_the_bus_is_down_is_undone_and_unavailable() {
        let mut link = Recorder::new();
        link.bus_up = false;
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"join","room":"r1","id":7}"#));
        let replies = link.take_replies();
        assert_eq!(
            (replies[0]["code"].as_str(), replies[0]["id"].as_u64()),
            (Some("unavailable"), Some(7))
        );
        assert!(link.joined.borrow().is_empty());
        assert!(s.rooms().is_empty());
    }
}
