//! Room history in Redis: the keys, the two scripts, and their replies.
//!
//! Per history room, beside its channel `<channel>` (`<prefix>room:<room>`):
//! - `{<channel>}:meta` — a hash: `epoch` (the room's epoch) and `seq` (its
//!   last sequence number);
//! - `{<channel>}:hist` — a sorted set: the last `size` stamped envelopes,
//!   scored by seq.
//!
//! The keys' hash tag is the channel's whole name, and a channel without
//! braces hashes by its whole name, so channel, counter and history share
//! one Redis Cluster slot.
//!
//! [`PUBLISH`] (`deploy/redis/history-publish.lua`) stamps, stores and
//! publishes one message atomically: the order of the history is the order
//! every subscriber receives. Backends that publish straight into Redis
//! call the same file (docs/protocol.md, "Publishing into a history room
//! from Redis"). [`READ`] answers a room's
//! epoch, last seq, oldest kept seq and the entries asked for.
//!
//! Both are sent with EVALSHA: they are loaded (`SCRIPT LOAD`) on every new
//! publisher connection and again on every health check, so a Redis that
//! restarted or flushed its script cache has them back within a ping
//! interval; until then a publish is refused with NOSCRIPT, which is
//! certain not to have run (`unavailable`).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::bus::{Page, Pick};
use crate::namespace::History;

/// Stamp, store and publish: `deploy/redis/history-publish.lua`, the
/// contract for backends too. KEYS: meta, hist. ARGV: channel, envelope (a
/// JSON object), size, ttl in ms, and "sharded" to SPUBLISH (a cluster).
/// Returns {seq, epoch, receivers}.
pub const PUBLISH: &str = include_str!("../../../deploy/redis/history-publish.lua");

/// KEYS: meta, hist. ARGV: "after" or "last", a seq or a count, and the ttl
/// in ms with which to start the room's epoch if it has none (0: don't).
/// Returns {epoch or "", last seq, oldest kept seq, {entries}}.
pub const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[3] == '0' then
    return {'', 0, 1, {}}
  end
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('DEL', KEYS[2])
end
local top = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local oldest = top + 1
if first[2] then
  oldest = tonumber(first[2])
end
local entries = {}
if ARGV[1] == 'after' then
  entries = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[2], '+inf')
elseif tonumber(ARGV[2]) > 0 then
  entries = redis.call('ZRANGE', KEYS[2], -tonumber(ARGV[2]), -1)
end
return {epoch, top, oldest, entries}
"#;

/// The SHA-1s of the loaded scripts.
#[derive(Debug, Clone)]
pub struct Scripts {
    pub publish: String,
    pub read: String,
}

/// Load both scripts (idempotent: the SHA-1 of a text never changes).
pub async fn load(conn: &mut MultiplexedConnection) -> redis::RedisResult<Scripts> {
    let (publish, read): (String, String) = redis::pipe()
        .cmd("SCRIPT")
        .arg("LOAD")
        .arg(PUBLISH)
        .cmd("SCRIPT")
        .arg("LOAD")
        .arg(READ)
        .query_async(conn)
        .await?;
    Ok(Scripts { publish, read })
}

/// A room channel's two keys.
pub fn keys(channel: &str) -> [String; 2] {
    [format!("{{{channel}}}:meta"), format!("{{{channel}}}:hist")]
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// Add the publish of `envelope` to `channel`'s history to `pipe`
/// (`sharded`: with SPUBLISH, on a Redis Cluster).
pub fn publish(
    pipe: &mut redis::Pipeline,
    scripts: &Scripts,
    channel: &str,
    envelope: &[u8],
    rule: History,
    sharded: bool,
) {
    let [meta, hist] = keys(channel);
    pipe.cmd("EVALSHA")
        .arg(&scripts.publish)
        .arg(2)
        .arg(meta)
        .arg(hist)
        .arg(channel)
        .arg(envelope)
        .arg(rule.size)
        .arg(millis(rule.ttl));
    if sharded {
        pipe.arg("sharded");
    }
}

/// The read of `channel`'s history; with `start` (the room's ttl), a room
/// without an epoch is given one.
pub fn read(scripts: &Scripts, channel: &str, pick: Pick, start: Option<Duration>) -> redis::Cmd {
    let [meta, hist] = keys(channel);
    let (mode, n) = match pick {
        Pick::After(seq) => ("after", seq),
        Pick::Last(n) => ("last", n as u64),
    };
    redis::cmd("EVALSHA")
        .arg(&scripts.read)
        .arg(2)
        .arg(meta)
        .arg(hist)
        .arg(mode)
        .arg(n)
        .arg(start.map_or(0, millis))
        .to_owned()
}

/// The reply of [`PUBLISH`]: (seq, receivers).
pub fn published(reply: &Value) -> Option<(u64, i64)> {
    match reply {
        Value::Array(items) if items.len() == 3 => {
            let seq = int(&items[0])?;
            let receivers = int(&items[2])?;
            Some((u64::try_from(seq).ok()?, receivers))
        }
        _ => None,
    }
}

/// The reply of [`READ`]; an empty epoch means the room has none.
pub fn page(reply: Value) -> Option<Page> {
    let Value::Array(items) = reply else {
        return None;
    };
    let [epoch, top, oldest, entries]: [Value; 4] = items.try_into().ok()?;
    let Value::Array(entries) = entries else {
        return None;
    };
    Some(Page {
        epoch: text(&epoch)?,
        top: u64::try_from(int(&top)?).ok()?,
        oldest: u64::try_from(int(&oldest)?).ok()?,
        entries: entries
            .into_iter()
            .map(|e| match e {
                Value::BulkString(b) => Some(Bytes::from(b)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
    })
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}
