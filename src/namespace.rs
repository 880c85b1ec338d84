//! Namespaces: rules for rooms by name prefix (`live:`, `dm:`, …) that
//! override the node's defaults — who may join and send, rate limits per
//! event, aggregated events, the largest message.
//!
//! Rules are resolved once per request from the room name (longest prefix
//! wins; no match: the defaults), never per delivered message: nothing here
//! is on the fan-out path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limit::Rate;
use crate::protocol::valid_room;

/// One `[[namespaces]]` entry as written; every field but `prefix` is
/// optional and falls back to the defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNamespace {
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_join: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_send: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_send: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub events: BTreeMap<String, RawRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_leave_events: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_leave_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<RawHistory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub droppable: Option<Vec<String>>,
}

/// `history = { size = 100, ttl = "5m" }` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHistory {
    pub size: usize,
    pub ttl: String,
}

/// Most messages a room's history may keep.
pub const MAX_HISTORY_SIZE: usize = 10_000;

/// A room's history: its last `size` messages, kept until `ttl` after the
/// room's last message (then the room starts over with a new epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub size: usize,
    pub ttl: Duration,
}

/// A rate as written: `{ per_second = 2, burst = 5 }`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: u32,
    pub burst: u32,
}

/// The rules for one set of rooms.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// 0 for the defaults, then 1, 2, … in config order.
    pub id: usize,
    /// `""` for the defaults.
    pub prefix: String,
    /// Anonymous connections may join its rooms.
    pub anonymous_join: bool,
    /// Anonymous connections may send to its rooms.
    pub anonymous_send: bool,
    /// Clients may send at all (false: only backends publish here).
    pub client_send: bool,
    /// Largest `data` of a send, in bytes.
    pub max_message_bytes: usize,
    /// Sends per connection to its rooms, for events without a rate of their own.
    pub messages: Rate,
    /// Events summed per window instead of delivered one by one.
    pub aggregate: Vec<String>,
    /// Events with a rate of their own: (event, rate, rule id).
    pub events: EventRates,
    /// `join` / `leave` events for signed-in users, at most this many per
    /// second per node (0: none).
    pub join_leave_per_second: u32,
    /// Sequence numbers, history and recovery for its rooms (`None`: off).
    pub history: Option<History>,
    /// Hold a room's messages this long and write them to each viewer
    /// together (`Duration::ZERO`: off, every batch at once).
    pub coalesce: Duration,
    /// Events a lagging viewer may miss (oldest first, told how many)
    /// before it would be closed as a slow consumer.
    pub droppable: Vec<String>,
}

impl Namespace {
    pub fn aggregates(&self, event: &str) -> bool {
        self.aggregate.iter().any(|e| e == event)
    }

    /// The rate and rule id of `event` here, if it has its own.
    pub fn event_rate(&self, event: &str) -> Option<(Rate, usize)> {
        self.events
            .iter()
            .find(|(e, _, _)| e == event)
            .map(|(_, rate, id)| (*rate, *id))
    }
}

/// `join_leave_per_second` when a namespace turns join/leave events on.
const DEFAULT_JOIN_LEAVE_RATE: u32 = 10;

/// Per-event rates as resolved: (event, rate, rule id).
type EventRates = Vec<(String, Rate, usize)>;

/// The defaults and every namespace, longest prefix first.
#[derive(Debug, Clone)]
pub struct Namespaces {
    defaults: Namespace,
    rules: Vec<Namespace>,
    /// Distinct per-event rules (their ids index per-connection buckets).
    pub event_rules: usize,
}

/// What a namespace falls back to.
pub struct Defaults<'a> {
    pub anonymous_join: bool,
    pub anonymous_send: bool,
    pub max_message_bytes: usize,
    pub messages: Rate,
    pub aggregate: &'a [String],
    pub events: &'a BTreeMap<String, RawRate>,
}

impl Namespaces {
    /// Check and resolve the rules; the error is (key, message) for config.rs.
    pub fn new(
        defaults: Defaults<'_>,
        raw: &[RawNamespace],
    ) -> Result<Namespaces, (String, String)> {
        let mut next_rule = 0;
        let mut events =
            |key: &str, list: &BTreeMap<String, RawRate>| -> Result<EventRates, (String, String)> {
                let mut out = Vec::new();
                for (event, r) in list {
                    if event.is_empty() || event.len() > crate::protocol::MAX_EVENT_LEN {
                        return Err((
                            key.to_owned(),
                            format!("{event:?} is not an event name (1-128 bytes)"),
                        ));
                    }
                    if r.per_second > 0 && r.burst == 0 {
                        return Err((
                            format!("{key}.{event}.burst"),
                            "must be at least 1 when per_second is set".into(),
                        ));
                    }
                    out.push((
                        event.clone(),
                        Rate {
                            per_second: r.per_second,
                            burst: r.burst,
                        },
                        next_rule,
                    ));
                    next_rule += 1;
                }
                Ok(out)
            };
        let default_events = events("limits.events", defaults.events)?;
        let base = Namespace {
            id: 0,
            prefix: String::new(),
            anonymous_join: defaults.anonymous_join,
            anonymous_send: defaults.anonymous_send,
            client_send: true,
            max_message_bytes: defaults.max_message_bytes,
            messages: defaults.messages,
            aggregate: defaults.aggregate.to_vec(),
            events: default_events,
            join_leave_per_second: 0,
            history: None,
            coalesce: Duration::ZERO,
            droppable: Vec::new(),
        };
        let mut rules: Vec<Namespace> = Vec::new();
        for (i, ns) in raw.iter().enumerate() {
            let key = |field: &str| format!("namespaces[{i}].{field}");
            let valid_prefix = !ns.prefix.is_empty()
                && ns.prefix.len() < crate::protocol::MAX_ROOM_LEN
                && valid_room(&ns.prefix);
            if !valid_prefix {
                return Err((key("prefix"), format!("{:?} is not a room-name prefix (1-127 characters of A-Z a-z 0-9 _ - . : @)", ns.prefix)));
            }
            if let Some(other) = rules.iter().position(|r| r.prefix == ns.prefix) {
                return Err((
                    key("prefix"),
                    format!("{:?} is also the prefix of namespaces[{other}]", ns.prefix),
                ));
            }
            if ns.anonymous_send == Some(true) && ns.anonymous_join == Some(false) {
                return Err((
                    key("anonymous_send"),
                    "anonymous connections cannot send where they may not join".into(),
                ));
            }
            if ns.max_message_bytes == Some(0) {
                return Err((key("max_message_bytes"), "must be greater than 0".into()));
            }
            let messages = match (ns.messages_per_second, ns.messages_burst) {
                (None, None) => base.messages,
                (Some(per_second), burst) => {
                    let burst = burst.unwrap_or(per_second);
                    if per_second > 0 && burst == 0 {
                        return Err((
                            key("messages_burst"),
                            "must be at least 1 when messages_per_second is set".into(),
                        ));
                    }
                    Rate { per_second, burst }
                }
                (None, Some(_)) => {
                    return Err((key("messages_burst"), "needs messages_per_second".into()))
                }
            };
            // An event rate of the defaults applies here unless overridden.
            let mut own = events(&key("events"), &ns.events)?;
            for inherited in &base.events {
                if !own.iter().any(|(e, _, _)| *e == inherited.0) {
                    own.push(inherited.clone());
                }
            }
            let join_leave_per_second = match (ns.join_leave_events, ns.join_leave_per_second) {
                (Some(true), rate) => rate.unwrap_or(DEFAULT_JOIN_LEAVE_RATE).max(1),
                (_, None) => 0,
                (_, Some(_)) => {
                    return Err((
                        key("join_leave_per_second"),
                        "needs join_leave_events = true".into(),
                    ))
                }
            };
            let history = match &ns.history {
                None => None,
                Some(h) => Some(history(&key("history"), h)?),
            };
            let coalesce = match &ns.coalesce {
                None => Duration::ZERO,
                Some(window) => coalesce(&key("coalesce"), window)?,
            };
            let aggregate = ns
                .aggregate
                .clone()
                .unwrap_or_else(|| base.aggregate.clone());
            let droppable = ns.droppable.clone().unwrap_or_default();
            for event in &droppable {
                if event.is_empty() || event.len() > crate::protocol::MAX_EVENT_LEN {
                    return Err((
                        key("droppable"),
                        format!("{event:?} is not an event name (1-128 bytes)"),
                    ));
                }
                if aggregate.contains(event) {
                    return Err((
                        key("droppable"),
                        format!("{event:?} is aggregated: its sums are never dropped"),
                    ));
                }
            }
            rules.push(Namespace {
                join_leave_per_second,
                history,
                coalesce,
                droppable,
                id: i + 1,
                prefix: ns.prefix.clone(),
                anonymous_join: ns.anonymous_join.unwrap_or(base.anonymous_join),
                anonymous_send: ns.anonymous_send.unwrap_or(base.anonymous_send),
                client_send: ns.client_send.unwrap_or(true),
                max_message_bytes: ns.max_message_bytes.unwrap_or(base.max_message_bytes),
                messages,
                aggregate,
                events: own,
            });
        }
        rules.sort_by_key(|ns| std::cmp::Reverse(ns.prefix.len()));
        Ok(Namespaces {
            defaults: base,
            rules,
            event_rules: next_rule,
        })
    }

    /// The rules for `room`: the longest matching prefix, else the defaults.
    pub fn of(&self, room: &str) -> &Namespace {
        self.rules
            .iter()
            .find(|ns| room.starts_with(&ns.prefix))
            .unwrap_or(&self.defaults)
    }

    /// The defaults and every rule, in id order.
    pub fn by_id(&self) -> Vec<&Namespace> {
        let mut all: Vec<&Namespace> = std::iter::once(&self.defaults).chain(&self.rules).collect();
        all.sort_by_key(|ns| ns.id);
        all
    }

    /// Every event that is aggregated somewhere (for metric labels).
    pub fn aggregated_events(&self) -> Vec<&str> {
        let mut all: Vec<&str> = std::iter::once(&self.defaults)
            .chain(&self.rules)
            .flat_map(|ns| ns.aggregate.iter().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Every event with a rate of its own somewhere (for metric labels).
    pub fn limited_events(&self) -> Vec<&str> {
        let mut all: Vec<&str> = std::iter::once(&self.defaults)
            .chain(&self.rules)
            .flat_map(|ns| ns.events.iter().map(|(e, _, _)| e.as_str()))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// Check `history = { size, ttl }` at `key`.
/// Longest coalescing window: beyond it, the wait is a latency users see.
pub const MAX_COALESCE: Duration = Duration::from_millis(50);

fn coalesce(key: &str, raw: &str) -> Result<Duration, (String, String)> {
    let window =
        humantime::parse_duration(raw).map_err(|e| (key.to_owned(), format!("{raw:?}: {e}")))?;
    if window > MAX_COALESCE {
        return Err((
            key.to_owned(),
            format!("at most {MAX_COALESCE:?} (0 is off)"),
        ));
    }
    Ok(window)
}

fn history(key: &str, raw: &RawHistory) -> Result<History, (String, String)> {
    if raw.size == 0 || raw.size > MAX_HISTORY_SIZE {
        return Err((
            format!("{key}.size"),
            format!("must be 1-{MAX_HISTORY_SIZE} messages"),
        ));
    }
    let ttl = humantime::parse_duration(&raw.ttl)
        .map_err(|e| (format!("{key}.ttl"), format!("{:?}: {e}", raw.ttl)))?;
    if ttl < Duration::from_secs(1) {
        return Err((format!("{key}.ttl"), "must be at least 1s".into()));
    }
    Ok(History {
        size: raw.size,
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(events: &BTreeMap<String, RawRate>) -> Defaults<'_> {
        Defaults {
            anonymous_join: true,
            anonymous_send: true,
            max_message_bytes: 65536,
            messages: Rate {
                per_second: 100,
                burst: 200,
            },
            aggregate: &[],
            events,
        }
    }

    fn raw(prefix: &str) -> RawNamespace {
        RawNamespace {
            prefix: prefix.into(),
            anonymous_join: None,
            anonymous_send: None,
            client_send: None,
            max_message_bytes: None,
            messages_per_second: None,
            messages_burst: None,
            aggregate: None,
            events: BTreeMap::new(),
            join_leave_events: None,
            join_leave_per_second: None,
            history: None,
            coalesce: None,
            droppable: None,
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_rules_inherit_the_defaults() {
        let events = BTreeMap::from([(
            "danmaku".to_string(),
            RawRate {
                per_second: 2,
                burst: 5,
            },
        )]);
        let mut live = raw("live:");
        live.anonymous_send = Some(false);
        live.aggregate = Some(vec!["like".into()]);
        let mut vip = raw("live:vip:");
        vip.anonymous_join = Some(false);
        vip.events.insert(
            "danmaku".into(),
            RawRate {
                per_second: 10,
                burst: 10,
            },
        );
        let ns = Namespaces::new(defaults(&events), &[live, vip]).unwrap();
        assert_eq!(ns.of("live:1").prefix, "live:");
        assert!(!ns.of("live:1").anonymous_send && ns.of("live:1").aggregates("like"));
        assert_eq!(ns.of("live:vip:1").prefix, "live:vip:");
        assert!(!ns.of("live:vip:1").anonymous_join);
        assert_eq!(
            ns.of("live:vip:1")
                .event_rate("danmaku")
                .unwrap()
                .0
                .per_second,
            10
        );
        assert_eq!(
            ns.of("live:1").event_rate("danmaku").unwrap().0.per_second,
            2
        );
        assert_eq!(ns.of("other").prefix, "");
        assert!(ns.of("other").event_rate("gift").is_none());
        assert_eq!(ns.limited_events(), ["danmaku"]);
    }

    #[test]
    fn bad_or_conflicting_rules_name_the_key() {
        let none = BTreeMap::new();
        let err = |list: &[RawNamespace]| Namespaces::new(defaults(&none), list).unwrap_err().0;
        assert_eq!(err(&[raw("")]), "namespaces[0].prefix");
        assert_eq!(err(&[raw("a:"), raw("a:")]), "namespaces[1].prefix");
        let mut contradiction = raw("x:");
        contradiction.anonymous_join = Some(false);
        contradiction.anonymous_send = Some(true);
        assert_eq!(err(&[contradiction]), "namespaces[0].anonymous_send");
        let mut burst_only = raw("y:");
        burst_only.messages_burst = Some(3);
        assert_eq!(err(&[burst_only]), "namespaces[0].messages_burst");
        let with_history = |size: usize, ttl: &str| {
            let mut ns = raw("h:");
            ns.history = Some(RawHistory {
                size,
                ttl: ttl.into(),
            });
            ns
        };
        assert_eq!(err(&[with_history(0, "5m")]), "namespaces[0].history.size");
        assert_eq!(
            err(&[with_history(10, "soon")]),
            "namespaces[0].history.ttl"
        );
        assert_eq!(
            err(&[with_history(10, "10ms")]),
            "namespaces[0].history.ttl"
        );
        let ns = Namespaces::new(defaults(&none), &[with_history(100, "5m")]).unwrap();
        assert_eq!(
            ns.of("h:1").history,
            Some(History {
                size: 100,
                ttl: Duration::from_secs(300)
            })
        );
        assert_eq!(ns.of("other").history, None);
    }

    #[test]
    fn a_coalescing_window_is_at_most_50ms_and_named_in_the_error() {
        let events = BTreeMap::new();
        let mut hot = raw("hot:");
        hot.coalesce = Some("3ms".into());
        let ns = Namespaces::new(defaults(&events), &[hot.clone()]).unwrap();
        assert_eq!(ns.of("hot:1").coalesce, Duration::from_millis(3));
        assert_eq!(ns.of("cold").coalesce, Duration::ZERO);
        hot.coalesce = Some("60ms".into());
        let err = Namespaces::new(defaults(&events), &[hot.clone()]).unwrap_err();
        assert_eq!(err.0, "namespaces[0].coalesce");
        let mut big = raw("big:");
        big.aggregate = Some(vec!["like".into()]);
        big.droppable = Some(vec!["like".into()]);
        let err = Namespaces::new(defaults(&events), &[big]).unwrap_err();
        assert_eq!(
            err.0, "namespaces[0].droppable",
            "aggregated sums are never dropped"
        );
        hot.coalesce = Some("soon".into());
        assert_eq!(
            Namespaces::new(defaults(&events), &[hot]).unwrap_err().0,
            "namespaces[0].coalesce"
        );
    }
}
