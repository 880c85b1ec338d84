//! Presence in Redis: every node's per-room member counts, and the rooms'
//! watch time. What to report and when is `presence.rs`'s business; this is
//! only how it is stored and read.
//!
//! Keys, all under one hash tag so that they could share a Redis Cluster
//! slot (`{<prefix>presence}:…`, prefix = `bus.redis.channel_prefix`):
//! - `…:nodes`: a sorted set, node id → the Redis time (ms) until which its
//!   last report counts. The script stamps it with Redis `TIME`, so the
//!   nodes' clocks do not matter, and each node says how long its own
//!   reports count (its own report interval decides).
//! - `…:node:<id>`: a hash, room → that node's local member count, replaced
//!   whole by each report.
//! - `…:watch:<room>`: a room's viewer-seconds (INCRBYFLOAT). One key per
//!   room rather than one hash, so that each room's total expires
//!   `presence.watch_ttl` after it last grew: a hash's TTL would be renewed
//!   by every report and the hash would keep every room ever watched.
//!
//! Each exchange is one script: store the report, drop the nodes whose
//! reports are stale (and their hashes), and return the fresh nodes' hashes
//! — except those the reader says it holds already (a report's version is
//! its score, new with every report), so each report crosses once per
//! reader. So a read costs the number of live nodes, and their rooms when
//! they reported since; never viewers.
//! Node hashes and the node set expire after twice a report's freshness, so
//! a cluster that stops entirely leaves nothing behind. The script builds
//! the other nodes' key names itself: allowed for keys in the same slot.
//!
//! Sent with EVAL (Redis caches the compiled script by its text; EVALSHA
//! would need redis-rs's `script` feature and a SHA-1 crate for a few
//! hundred bytes a second saved).

use std::collections::HashMap;
use std::time::Duration;

use crate::bus::{Known, NodeCounts, Report, Snapshot, Watch};

/// KEYS: the node set, this node's hash. ARGV: mode (`read`, `counts`,
/// `leaving`), node id, key prefix, fresh ms, keep ms, watch ttl ms, then
/// the number of rooms and their (room, count) pairs, the number of watch
/// additions and their (room, seconds) pairs, the number of known reports
/// and their (node, version) pairs. Answers, per other live node, (node,
/// version, ms it still counts, room/count pairs or nil when known).
const SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local mode, node, prefix = ARGV[1], ARGV[2], ARGV[3]
local fresh, keep, watch_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local i = 7
local rooms = tonumber(ARGV[i])
if mode == 'counts' then
  redis.call('DEL', KEYS[2])
  local first, last = i + 1, i + 2 * rooms
  while first <= last do
    local upto = math.min(first + 199, last)
    redis.call('HSET', KEYS[2], unpack(ARGV, first, upto))
    first = upto + 1
  end
  redis.call('PEXPIRE', KEYS[2], keep)
  redis.call('ZADD', KEYS[1], now + fresh, node)
  if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
end
i = i + 2 * rooms + 1
local watched = tonumber(ARGV[i])
for k = i + 1, i + 2 * watched, 2 do
  local key = prefix .. 'watch:' .. ARGV[k]
  redis.call('INCRBYFLOAT', key, ARGV[k + 1])
  redis.call('PEXPIRE', key, watch_ttl)
end
i = i + 2 * watched + 1
local known = {}
for k = i + 1, i + 2 * tonumber(ARGV[i]), 2 do
  known[ARGV[k]] = ARGV[k + 1]
end
if mode == 'leaving' then
  redis.call('ZREM', KEYS[1], node)
  redis.call('DEL', KEYS[2])
  return {}
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', prefix .. 'node:' .. id)
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for k = 1, #live, 2 do
  local id, version = live[k], live[k + 1]
  if id ~= node then
    local counts = false
    if known[id] ~= version then counts = redis.call('HGETALL', prefix .. 'node:' .. id) end
    out[#out + 1] = {id, version, tonumber(version) - now, counts}
  end
end
return out
"#;

/// The key names of one node's presence.
pub struct Keys {
    /// `{<prefix>presence}:`
    prefix: String,
    nodes: String,
    own: String,
}

impl Keys {
    pub fn new(channel_prefix: &str, node_id: &str) -> Keys {
        let prefix = format!("{{{channel_prefix}presence}}:");
        Keys {
            nodes: format!("{prefix}nodes"),
            own: format!("{prefix}node:{node_id}"),
            prefix,
        }
    }

    /// A key in the presence keys' slot (they all share it).
    pub fn slot_key(&self) -> &str {
        &self.nodes
    }

    pub fn watch(&self, room: &str) -> String {
        format!("{}watch:{room}", self.prefix)
    }
}

/// Per other node: (node id, version, ms its report still counts, room →
/// count unless known).
pub type Reply = Vec<(String, String, i64, Option<HashMap<String, u64>>)>;

/// The script invocation for `report` by `node`.
pub fn exchange(keys: &Keys, node: &str, report: &Report<'_>) -> redis::Cmd {
    let ms = |d: Duration| d.as_millis().max(1) as u64;
    let none: (&[(&str, u64)], Duration) = (&[], Duration::ZERO);
    let (mode, (rooms, fresh), watch, known): (_, _, Option<&Watch>, Known) = match report {
        Report::Read { known } => ("read", none, None, known),
        Report::Counts {
            rooms,
            fresh_for,
            watch,
            known,
        } => ("counts", (rooms, *fresh_for), Some(watch), known),
        Report::Leaving { watch } => ("leaving", none, Some(watch), &[]),
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SCRIPT)
        .arg(2)
        .arg(&keys.nodes)
        .arg(&keys.own)
        .arg(mode)
        .arg(node)
        .arg(&keys.prefix)
        .arg(ms(fresh))
        .arg(ms(fresh * 2))
        .arg(watch.map_or(1, |w| ms(w.ttl)))
        .arg(rooms.len());
    for (room, count) in rooms {
        cmd.arg(*room).arg(*count);
    }
    let seconds = watch.map_or(&[][..], |w| w.seconds);
    cmd.arg(seconds.len());
    for (room, secs) in seconds {
        cmd.arg(*room).arg(*secs);
    }
    cmd.arg(known.len());
    for (node, version) in known {
        cmd.arg(*node).arg(*version);
    }
    cmd
}

pub fn snapshot(reply: Reply) -> Snapshot {
    Snapshot {
        nodes: reply
            .into_iter()
            .map(|(node, version, fresh_ms, rooms)| NodeCounts {
                node,
                version,
                fresh_for: Duration::from_millis(fresh_ms.max(0) as u64),
                rooms,
            })
            .collect(),
    }
}
