//! Which shard serves which channel: Redis Cluster hash slots, and the
//! cluster's map of slots to primaries (`CLUSTER SLOTS`).
//!
//! A single Redis is one shard that serves every slot ([`Topology::single`]).

use std::time::Duration;

use redis::{ConnectionAddr, Value};
use tokio::time::timeout;

/// Slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The hash slot of a key or shard channel: CRC16 (XMODEM) of its hash tag
/// (the part between the first `{` and the next `}`, if not empty) or of
/// the whole name.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) % SLOTS as u16
}

/// The primaries and the slots each serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Each primary's address, `host:port` (a single Redis: its URL).
    pub primaries: Vec<String>,
    /// Per slot, the index of its primary in `primaries`; `None`: no primary
    /// serves it (the cluster is missing it).
    owners: Vec<Option<u16>>,
    /// Every slot has a primary.
    complete: bool,
}

impl Topology {
    /// One Redis that serves everything.
    pub fn single(name: String) -> Topology {
        Topology {
            primaries: vec![name],
            owners: vec![Some(0); SLOTS],
            complete: true,
        }
    }

    /// Nothing known yet.
    pub fn none() -> Topology {
        Topology {
            primaries: Vec::new(),
            owners: vec![None; SLOTS],
            complete: false,
        }
    }

    /// The primary (index) serving `key`'s slot.
    pub fn owner(&self, key: &[u8]) -> Option<usize> {
        match (self.complete, self.primaries.len()) {
            (true, 1) => Some(0),
            _ => self.owners[slot(key) as usize].map(usize::from),
        }
    }

    /// The `CLUSTER SLOTS` reply: [[start, end, [ip, port, id, …], replicas…], …].
    pub fn parse(reply: &Value) -> Option<Topology> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut topology = Topology::none();
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (start, end) = (int(fields.first()?)?, int(fields.get(1)?)?);
            let Value::Array(primary) = fields.get(2)? else {
                return None;
            };
            let host = match primary.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let addr = format!("{host}:{}", int(primary.get(1)?)?);
            let index = match topology.primaries.iter().position(|p| *p == addr) {
                Some(i) => i,
                None => {
                    topology.primaries.push(addr);
                    topology.primaries.len() - 1
                }
            };
            if start > end || end as usize >= SLOTS {
                return None;
            }
            for slot in start..=end {
                topology.owners[slot as usize] = Some(index as u16);
            }
        }
        topology.complete = topology.owners.iter().all(Option::is_some);
        Some(topology)
    }

    /// Every slot has a primary.
    pub fn complete(&self) -> bool {
        self.complete
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// A client for primary `addr` (`host:port`) with the seed's settings
/// (credentials, TLS).
pub fn client_for(seed: &redis::Client, addr: &str) -> Result<redis::Client, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("bad primary address {addr:?}"))?;
    let info = seed.get_connection_info().clone();
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    redis::Client::open(info.set_addr(addr)).map_err(|e| e.to_string())
}

/// The cluster's topology as `client`'s node sees it.
pub async fn discover(client: &redis::Client, limit: Duration) -> Result<Topology, String> {
    let work = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Value>(&mut conn)
            .await
    };
    match timeout(limit, work).await {
        Ok(Ok(reply)) => {
            Topology::parse(&reply).ok_or_else(|| "CLUSTER SLOTS answered oddly".to_string())
        }
        Ok(Err(e)) => Err(format!("CLUSTER SLOTS failed: {e}")),
        Err(_) => Err("CLUSTER SLOTS timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from Redis's CLUSTER KEYSLOT.
        assert_eq!(slot(b"roomcast:room:h:1"), 1915);
        assert_eq!(slot(b"{roomcast:room:h:1}:meta"), 1915);
        assert_eq!(slot(b"{roomcast:room:h:1}:hist"), 1915);
        assert_eq!(slot(b"foo"), 12182);
        // An empty tag does not count: the whole name is hashed.
        assert_eq!(slot(b"{}foo"), 9500);
        assert_eq!(slot(b"a{b}c{d}"), slot(b"b"));
    }

    #[test]
    fn cluster_slots_reply_maps_every_slot() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node(7001),
                node(7004),
            ]),
            Value::Array(vec![Value::Int(8192), Value::Int(16383), node(7002)]),
        ]);
        let t = Topology::parse(&reply).unwrap();
        assert_eq!(t.primaries, ["127.0.0.1:7001", "127.0.0.1:7002"]);
        assert!(t.complete());
        assert_eq!(t.owners[8191], Some(0));
        assert_eq!(t.owners[8192], Some(1));
        assert_eq!(t.owner(b"{roomcast:room:h:1}:meta"), Some(0));
    }
}
