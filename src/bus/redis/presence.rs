//! Presence in Redis: every node's count in each room, the rooms' watch
//! time, and the list of live nodes. What to report and when is
//! `presence/`'s business; this is only how it is stored and read.
//!
//! Keys. A room's are in the room's slot, beside its history
//! (`<channel>` = the room's channel, `<prefix>room:<room>`), so on a Redis
//! Cluster presence divides over the shards as the rooms do:
//! - `{<channel>}:online`: a hash, node id → `<until>:<count>`, the node's
//!   count in the room and the Redis time (ms) until which it counts. The
//!   script stamps it with Redis `TIME`, so the nodes' clocks do not
//!   matter, and each node says how long its own reports count. Stale
//!   fields are removed by whoever touches the room next; the hash expires
//!   twice a report's freshness after its last report.
//! - `{<channel>}:watch`: the room's viewer-seconds (INCRBYFLOAT), kept
//!   `presence.watch_ttl` after it last grew.
//!
//! Per node, for the busiest-rooms list, which no room's keys can answer:
//! - `{<prefix>presence}:nodes`: a sorted set, node id → the Redis time
//!   (ms) until which the node counts as live: a few bytes per node and one
//!   write per node per report interval (it is the only key every node
//!   writes, and it is small and cold).
//! - `{<prefix>presence:<node>}:rooms`: a hash, room → the node's count,
//!   replaced whole by each report; in a slot of its own per node. Read only
//!   when the list is asked for.
//!
//! A report is one script call per group of rooms in one slot (on a single
//! Redis, any 100 rooms), plus the node's two keys; a read is the same
//! script without the counts. So a node's presence costs Redis the number
//! of rooms it has, per report and per read; never viewers, and not the
//! rooms of other nodes.
//!
//! Sent with EVAL (Redis caches the compiled script by its text; EVALSHA
//! would need redis-rs's `script` feature and a SHA-1 crate for a few
//! hundred bytes a second saved).

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use crate::bus::Count;

/// Rooms per script call: keeps one call short, so it does not hold up
/// Redis for the other clients.
pub const ROOMS_PER_CALL: usize = 100;

/// KEYS: per room, its online hash and its watch key. ARGV: mode (`read`,
/// `counts`, `leaving`), node id, fresh ms, keep ms, watch ttl ms, then per
/// room this node's count and the viewer-seconds to add. Answers, per room,
/// the other live nodes' (count, ms it still counts) pairs, flat.
const ROOMS: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local mode, node = ARGV[1], ARGV[2]
local fresh, keep, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for r = 1, #KEYS / 2 do
  local online, watch = KEYS[2 * r - 1], KEYS[2 * r]
  local count, seconds = tonumber(ARGV[4 + 2 * r]), ARGV[5 + 2 * r]
  if mode == 'counts' and count > 0 then
    redis.call('HSET', online, node, (now + fresh) .. ':' .. count)
    if redis.call('PTTL', online) < keep then redis.call('PEXPIRE', online, keep) end
  elseif mode ~= 'read' then
    redis.call('HDEL', online, node)
  end
  if tonumber(seconds) > 0 then
    redis.call('INCRBYFLOAT', watch, seconds)
    redis.call('PEXPIRE', watch, ttl)
  end
  local others = {}
  if mode ~= 'leaving' then
    local fields = redis.call('HGETALL', online)
    for f = 1, #fields, 2 do
      local id = fields[f]
      local untl, n = string.match(fields[f + 1], '^(%d+):(%d+)$')
      untl = tonumber(untl)
      if not untl or untl <= now then
        redis.call('HDEL', online, id)
      elseif id ~= node then
        others[#others + 1] = tonumber(n)
        others[#others + 1] = untl - now
      end
    end
  end
  out[r] = others
end
return out
"#;

/// KEYS: the node set, this node's rooms hash. ARGV: mode (`read`,
/// `counts`, `leaving`), node id, fresh ms, keep ms, then room/count pairs.
/// Answers the live nodes' ids.
const NODES: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local mode, node = ARGV[1], ARGV[2]
local fresh, keep = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if mode == 'leaving' then
  redis.call('ZREM', KEYS[1], node)
  return {}
end
if mode == 'counts' then
  redis.call('ZADD', KEYS[1], now + fresh, node)
  if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
"#;

/// KEYS: this node's rooms hash. ARGV: keep ms, then room/count pairs.
const REPLACE: &str = r#"
redis.call('DEL', KEYS[1])
local first, last = 2, #ARGV
while first <= last do
  local upto = math.min(first + 199, last)
  redis.call('HSET', KEYS[1], unpack(ARGV, first, upto))
  first = upto + 1
end
if #ARGV > 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return 0
"#;

/// The mode of a round trip, as the scripts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    Counts,
    Leaving,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Read => "read",
            Mode::Counts => "counts",
            Mode::Leaving => "leaving",
        }
    }
}

/// How long a report counts, and how long its keys are kept.
#[derive(Debug, Clone, Copy)]
pub struct Times {
    pub fresh: Duration,
    pub watch_ttl: Duration,
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// A room's presence keys: its online hash and its watch key.
pub fn room_keys(channel: &str) -> [String; 2] {
    [
        format!("{{{channel}}}:online"),
        format!("{{{channel}}}:watch"),
    ]
}

/// The script call for `rooms` (channel, this node's count, viewer-seconds),
/// all in one slot.
pub fn rooms(mode: Mode, node: &str, times: Times, rooms: &[(String, u64, f64)]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(ROOMS).arg(rooms.len() * 2);
    for (channel, _, _) in rooms {
        cmd.arg(&room_keys(channel));
    }
    cmd.arg(mode.name())
        .arg(node)
        .arg(ms(times.fresh))
        .arg(ms(times.fresh * 2))
        .arg(ms(times.watch_ttl));
    for (_, online, watch) in rooms {
        cmd.arg(*online).arg(*watch);
    }
    cmd
}

/// Per room of a [`rooms`] call, the other nodes' counts.
pub fn counts(reply: Value, rooms: usize) -> Option<Vec<Vec<Count>>> {
    let Value::Array(per_room) = reply else {
        return None;
    };
    let counts: Option<Vec<Vec<Count>>> = per_room
        .into_iter()
        .map(|room| {
            let Value::Array(flat) = room else {
                return None;
            };
            flat.chunks(2)
                .map(|pair| match pair {
                    [Value::Int(n), Value::Int(left)] => Some(Count {
                        online: (*n).max(0) as u64,
                        fresh_for: Duration::from_millis((*left).max(0) as u64),
                    }),
                    _ => None,
                })
                .collect()
        })
        .collect();
    counts.filter(|c| c.len() == rooms)
}

/// The per-node keys of presence (the node set and the nodes' room lists).
pub struct Nodes {
    set: String,
    prefix: String,
}

impl Nodes {
    pub fn new(channel_prefix: &str) -> Nodes {
        Nodes {
            set: format!("{{{channel_prefix}presence}}:nodes"),
            prefix: channel_prefix.to_owned(),
        }
    }

    /// The key of the node set (to route the call by).
    pub fn set(&self) -> &str {
        &self.set
    }

    /// Node `node`'s rooms hash.
    pub fn rooms_of(&self, node: &str) -> String {
        format!("{{{}presence:{node}}}:rooms", self.prefix)
    }

    /// Renew (`Counts`), read (`Read`) or remove (`Leaving`) `node` in the
    /// node set: answers the live nodes.
    pub fn live(&self, mode: Mode, node: &str, fresh: Duration) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(NODES)
            .arg(1)
            .arg(&self.set)
            .arg(mode.name())
            .arg(node)
            .arg(ms(fresh))
            .arg(ms(fresh * 2));
        cmd
    }

    /// Replace `node`'s rooms hash with `rooms` (kept twice `fresh`).
    pub fn replace(&self, node: &str, rooms: &[(&str, u64)], fresh: Duration) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(REPLACE)
            .arg(1)
            .arg(self.rooms_of(node))
            .arg(ms(fresh * 2));
        for (room, online) in rooms {
            cmd.arg(*room).arg(*online);
        }
        cmd
    }
}

/// The node ids a [`Nodes::live`] call answered.
pub fn live(reply: Value) -> Option<Vec<String>> {
    redis::from_redis_value(reply).ok()
}

/// Add a node's rooms hash (HGETALL) to `sums`.
pub fn add_rooms(reply: Value, sums: &mut HashMap<String, u64>) -> Option<()> {
    let rooms: HashMap<String, u64> = redis::from_redis_value(reply).ok()?;
    for (room, online) in rooms {
        *sums.entry(room).or_default() += online;
    }
    Some(())
}
