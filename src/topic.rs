//! Where a message goes: a room (everyone who joined it) or a user (every
//! connection of that user, on every node).
//!
//! A [`Topic`] owns the naming of bus channels: a room's channel is
//! `<prefix>room:<name>`, a user's `<prefix>user:<id>`. The kind is part of
//! the key, so the two namespaces cannot meet: a room named `user:42` is the
//! channel `room:user:42`, never user 42's. Nothing else in the crate builds
//! a channel name or a hub key.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// A room or a user, as one cheap-to-clone key (`room:<name>` or `user:<id>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

/// What a [`Topic`] names, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Room(&'a str),
    User(&'a str),
}

const ROOM: &str = "room:";
const USER: &str = "user:";

impl Topic {
    /// The topic of a room. The name must be valid ([`crate::protocol::check_room`]).
    pub fn room(name: &str) -> Topic {
        Topic(Arc::from(format!("{ROOM}{name}")))
    }

    /// The topic of a user. The id must be valid (checked where it comes from: a verified token, or a request's `to`).
    pub fn user(id: &str) -> Topic {
        Topic(Arc::from(format!("{USER}{id}")))
    }

    /// The topic a key (as [`Topic::key`] gives it) stands for.
    pub fn from_key(key: &str) -> Option<Topic> {
        Target::of_key(key).map(|_| Topic(Arc::from(key)))
    }

    /// The key: the bus channel without its prefix, and the hub's map key.
    pub fn key(&self) -> &str {
        &self.0
    }

    /// The bus channel of this topic under `prefix`.
    pub fn channel(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.0)
    }

    pub fn target(&self) -> Target<'_> {
        // Every Topic is built by `room`, `user` or a checked `from_key`.
        Target::of_key(&self.0).unwrap_or(Target::Room(""))
    }
}

impl Target<'_> {
    /// What a topic key names, `None` if it is no topic's key.
    pub fn of_key(key: &str) -> Option<Target<'_>> {
        if let Some(room) = key.strip_prefix(ROOM) {
            Some(Target::Room(room))
        } else {
            key.strip_prefix(USER).map(Target::User)
        }
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target() {
            Target::Room(r) => write!(f, "room {r:?}"),
            Target::User(u) => write!(f, "user {u:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_and_users_never_share_a_channel() {
        let room = Topic::room("user:42");
        let user = Topic::user("42");
        assert_ne!(room, user);
        assert_eq!(room.channel("rc:"), "rc:room:user:42");
        assert_eq!(user.channel("rc:"), "rc:user:42");
        assert_eq!(room.target(), Target::Room("user:42"));
        assert_eq!(user.target(), Target::User("42"));
        assert_eq!(Topic::from_key(room.key()), Some(room));
        assert_eq!(Topic::from_key("canary:n1"), None);
    }
}
