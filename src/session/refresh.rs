//! `{"op":"refresh","token":…}`: replace the connection's token before it
//! expires, so a session can outlive its tokens (a stream lasts hours,
//! tokens minutes).

use super::{ack, Link, Session};
use crate::error::{ErrorCode, Rejection};

/// The new token must verify and be for the same user (`sub`); then its
/// claims (rooms, send, info, exp) replace the old ones for what the
/// connection does next — rooms already joined stay joined. A bad token is
/// `unauthorized` and leaves the old one in force (until it expires).
pub(super) fn run(
    session: &mut Session,
    link: &impl Link,
    id: Option<u64>,
    token: &str,
) -> Result<(), Rejection> {
    let Some(current) = session.identity.as_deref() else {
        return Err(Rejection::new(
            id,
            ErrorCode::Forbidden,
            "an anonymous connection has no token to refresh: reconnect with one",
        ));
    };
    let identity = link
        .verify(token)
        .map_err(|e| Rejection::new(id, ErrorCode::Unauthorized, format!("{}: {e}", e.reason())))?;
    if identity.user != current.user {
        return Err(Rejection::new(
            id,
            ErrorCode::Forbidden,
            "a refresh must be for the same user (sub) as the connection",
        ));
    }
    link.token_expires(identity.expires);
    session.identity = Some(Box::new(identity));
    ack(link, id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::auth::AuthError;
    use crate::session::testing::{identity, now, Recorder};

    #[test]
    fn a_refresh_needs_a_valid_token_for_the_same_user() {
        let link = Recorder::new();
        let mut later = identity("ana");
        later.expires = 5000;
        link.tokens.borrow_mut().extend([
            ("good", Ok(later)),
            ("bob", Ok(identity("bob"))),
            ("old", Err(AuthError::Expired)),
        ]);
        let mut s = link.session_as(identity("ana"));
        for (i, token) in ["old", "bob", "junk", "good"].iter().enumerate() {
            let frame = json!({"op": "refresh", "token": token, "id": i}).to_string();
            now(s.json(&link, frame.as_bytes()));
        }
        let replies = link.take_replies();
        let codes: Vec<_> = replies
            .iter()
            .map(|r| r["code"].as_str().unwrap_or("ack"))
            .collect();
        assert_eq!(codes, ["unauthorized", "forbidden", "unauthorized", "ack"]);
        assert!(replies[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("expired"));
        assert_eq!(link.expires.get(), 5000);
        assert_eq!(s.user(), Some("ana"));
        // An anonymous connection cannot refresh into a user.
        let mut anon = link.session();
        now(anon.json(&link, br#"{"op":"refresh","token":"good","id":9}"#));
        assert_eq!(link.take_replies()[0]["code"], "forbidden");
        assert_eq!(anon.user(), None);
    }
}
