//! `{"op":"ping"}`: an application-level round trip (answered `pong`).

use super::Link;
use crate::error::Rejection;
use crate::protocol;

pub(super) fn run(link: &impl Link, id: Option<u64>) -> Result<(), Rejection> {
    link.reply(&protocol::pong_frame(id));
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::session::testing::{now, Recorder};

    #[test]
    fn ping_is_answered_with_its_id() {
        let link = Recorder::new();
        let mut s = link.session();
        now(s.json(&link, br#"{"op":"ping","id":5}"#));
        now(s.json(&link, br#"{"op":"ping"}"#));
        assert_eq!(
            link.take_replies(),
            [json!({"op":"pong","id":5}), json!({"op":"pong"})]
        );
    }
}
