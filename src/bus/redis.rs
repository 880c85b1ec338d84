//! The Redis bus: Redis pub/sub, one channel per topic (`<prefix>room:<room>`,
//! `<prefix>user:<id>`; [`Topic::channel`]), on a single Redis or on a
//! Redis Cluster with sharded pub/sub (SSUBSCRIBE/SPUBLISH: a message
//! travels only within the shard that serves its channel's slot).
//!
//! The parts, one file each:
//! - `router.rs`: one task takes the node's subscription commands and hands
//!   each room to the session of its shard; on a cluster it follows the
//!   topology (failover, resharding, shards added) and moves rooms.
//! - `session.rs`: per shard (one on a single Redis), one task owns that
//!   shard's subscriber connection (`subscriber.rs`) and publishing
//!   connection, PINGs and canaries them, reconnects, and repairs history
//!   rooms after every gap (`repair.rs`).
//! - `topology.rs`: hash slots and `CLUSTER SLOTS`.
//! - `history.rs`, `presence.rs`: the keys and scripts of history and presence.
//!
//! This file is what the node calls ([`Bus`]): publishes are grouped by
//! shard and pipelined per shard (all shards at once), history reads and
//! presence go to the shard of their keys. A shard is usable while its
//! session has declared it up; the bus is up while every shard is.
//!
//! We do not use redis-rs's `ConnectionManager` resubscription: measured, it
//! recovered from a 1 s outage but not from a 15 s one until another command
//! ran, and its first PUBLISH after a restart failed once. Nor its cluster
//! connection: its subscription tracker drops a shard channel when Redis
//! pushes `sunsubscribe` on a slot migration, so the room would never be
//! subscribed again, and it hides which shard's link failed, which the
//! history repair needs to know (docs/cluster.md). Here each shard's two
//! connections are replaced together, so the first publish after a shard is
//! up again uses a fresh connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use parking_lot::RwLock;
use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, Notify};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod history;
mod presence;
mod repair;
mod router;
mod session;
mod subscriber;
mod topology;

use super::{
    Bus, BusError, Deliver, Message, Page, Pick, PublishResult, Published, Report, Snapshot, SubCmd,
};
use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::namespace::History;
use crate::topic::Topic;
use history::Scripts;
use topology::Topology;

struct RedisBus {
    config: RedisConfig,
    /// This node's presence keys (and everyone's, by prefix).
    presence: presence::Keys,
    node_id: String,
    metrics: Arc<Metrics>,
    /// The shards and which serves which slot (set by the router).
    routes: RwLock<Arc<Routes>>,
    up: AtomicBool,
    /// Something suggests the cluster's topology changed (MOVED, ASK).
    refresh: Notify,
}

/// The shards as the publishing side sees them: `shards[i]` serves the
/// slots of `topology.primaries[i]`.
struct Routes {
    topology: Arc<Topology>,
    shards: Vec<Arc<Shard>>,
}

/// One shard: its name (the primary's address) and, while its session has
/// it up, its publishing connection.
struct Shard {
    name: String,
    publisher: RwLock<Option<Publisher>>,
    /// Bumped each time the connections are declared dead: a reply that
    /// arrives on an older generation is not trusted (the node's
    /// subscriptions may have been gone when Redis handled the publish).
    generation: AtomicU64,
    up: AtomicBool,
    /// A publish failed: the session should check the connection now.
    suspect: Notify,
}

impl Shard {
    fn new(name: String) -> Shard {
        Shard {
            name,
            publisher: RwLock::new(None),
            generation: AtomicU64::new(0),
            up: AtomicBool::new(false),
            suspect: Notify::new(),
        }
    }

    /// The publishing connection, or why there is none.
    fn connection(&self) -> Result<Publisher, BusError> {
        self.publisher.read().clone().ok_or_else(|| {
            BusError::Unavailable(format!("redis shard {} is not connected", self.name))
        })
    }
}

/// A publishing connection, the generation it belongs to, and the SHA-1s
/// of the history scripts as loaded on it.
#[derive(Clone)]
struct Publisher {
    generation: u64,
    conn: MultiplexedConnection,
    scripts: Arc<Scripts>,
}

impl RedisBus {
    fn channel(&self, topic: &Topic) -> String {
        topic.channel(&self.config.channel_prefix)
    }

    fn routes(&self) -> Arc<Routes> {
        self.routes.read().clone()
    }

    fn set_routes(&self, routes: Routes) {
        self.metrics.bus_shards.set(routes.shards.len() as i64);
        *self.routes.write() = Arc::new(routes);
    }

    /// The shard serving `key` (a channel or a key), or why none does.
    fn shard(&self, key: &[u8]) -> Result<Arc<Shard>, BusError> {
        let routes = self.routes();
        match routes
            .topology
            .owner(key)
            .and_then(|i| routes.shards.get(i))
        {
            Some(shard) => Ok(shard.clone()),
            None => {
                self.refresh.notify_one();
                Err(BusError::Unavailable(
                    "no redis shard serves this room's slot".into(),
                ))
            }
        }
    }

    /// A shard's session declares it up (with its publishing connection) or down.
    fn set_up(&self, shard: &Shard, publisher: Option<(MultiplexedConnection, Arc<Scripts>)>) {
        let up = publisher.is_some();
        let generation = match up {
            true => shard.generation.load(Ordering::Acquire),
            false => shard.generation.fetch_add(1, Ordering::AcqRel) + 1,
        };
        *shard.publisher.write() = publisher.map(|(conn, scripts)| Publisher {
            generation,
            conn,
            scripts,
        });
        shard.up.store(up, Ordering::Release);
        self.update_up();
    }

    /// This node's canary channel on `shard`: in one of the shard's slots.
    fn canary_channel(&self, shard: &Arc<Shard>) -> Option<String> {
        let base = format!("{}canary:{}", self.config.channel_prefix, self.node_id);
        if !self.config.cluster {
            return Some(base);
        }
        let routes = self.routes();
        let index = routes.shards.iter().position(|s| Arc::ptr_eq(s, shard))?;
        // A third of the tags hit a shard of three: a few tries.
        (0..100_000u32)
            .map(|i| format!("{base}:{{{i}}}"))
            .find(|c| routes.topology.owner(c.as_bytes()) == Some(index))
    }

    /// Up while every shard is.
    fn update_up(&self) {
        let routes = self.routes();
        let up = !routes.shards.is_empty()
            && routes.topology.complete()
            && routes.shards.iter().all(|s| s.up.load(Ordering::Acquire));
        let shards_up = routes
            .shards
            .iter()
            .filter(|s| s.up.load(Ordering::Acquire))
            .count();
        self.up.store(up, Ordering::Release);
        self.metrics.bus_up.set(if up { 1.0 } else { 0.0 });
        self.metrics.bus_shards_up.set(shards_up as i64);
    }

    /// What one reply of a publish pipeline means for its message.
    fn outcome(
        &self,
        shard: &Shard,
        history: bool,
        reply: redis::RedisResult<redis::Value>,
        current: bool,
    ) -> PublishResult {
        let reply = match reply {
            Ok(reply) => reply,
            // Redis refused this command (NOSCRIPT, a script error, MOVED,
            // CLUSTERDOWN): it did not run.
            Err(e) => {
                if e.redirect_node().is_some() {
                    self.refresh.notify_one();
                } else {
                    shard.suspect.notify_one();
                }
                return Err(BusError::Unavailable(format!(
                    "redis refused the publish: {e}"
                )));
            }
        };
        if history {
            // Stored in the room's history: every node subscribed then gets it,
            // live or by repairing from history, even if this connection died.
            return match history::published(&reply) {
                Some((seq, _)) => Ok(Published { seq: Some(seq) }),
                None => Err(BusError::Unconfirmed(
                    "redis answered the history publish oddly".into(),
                )),
            };
        }
        match (current, reply) {
            (true, _) => Ok(Published::default()),
            // Only "nobody received it" is certain.
            (false, redis::Value::Int(0)) => Err(BusError::Unavailable(
                "redis connection was lost; nobody received the message".into(),
            )),
            (false, _) => Err(BusError::Unconfirmed(
                "redis connection was lost; some nodes may not have received the message".into(),
            )),
        }
    }

    /// A command on a publishing connection failed (or timed out, `None`):
    /// what that means, and have the session check the connection.
    fn failed(&self, shard: &Shard, what: &str, e: Option<redis::RedisError>) -> BusError {
        shard.suspect.notify_one();
        match e {
            // Redis answering with an error refused the command; a broken
            // connection may have carried it first.
            Some(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                BusError::Unconfirmed(format!("redis {what} failed: {e}"))
            }
            Some(e) => {
                if e.redirect_node().is_some() {
                    self.refresh.notify_one();
                }
                BusError::Unavailable(format!("redis {what} failed: {e}"))
            }
            None => BusError::Unconfirmed(format!("redis {what} timed out")),
        }
    }

    /// Publish `items[i]` for each `i` of `indices` on `shard`, in one
    /// pipeline: a result each, in the same order.
    async fn publish_on(
        &self,
        shard: &Shard,
        items: &[Message],
        indices: &[usize],
    ) -> Vec<PublishResult> {
        let all_of = |err: BusError| -> Vec<PublishResult> {
            indices.iter().map(|_| Err(err.clone())).collect()
        };
        let Publisher {
            generation,
            mut conn,
            scripts,
        } = match shard.connection() {
            Ok(c) => c,
            Err(e) => return all_of(e),
        };
        let sharded = self.config.cluster;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for &i in indices {
            let m = &items[i];
            let channel = self.channel(&m.topic);
            match m.history {
                None => {
                    pipe.cmd(if sharded { "SPUBLISH" } else { "PUBLISH" })
                        .arg(channel)
                        .arg(&m.envelope[..]);
                }
                Some(rule) => {
                    history::publish(&mut pipe, &scripts, &channel, &m.envelope, rule, sharded)
                }
            }
        }
        // History messages must be on `wait_replicas` replicas before they
        // are acked: one WAIT after them covers the whole pipeline.
        let wait =
            self.config.wait_replicas > 0 && indices.iter().any(|&i| items[i].history.is_some());
        if wait {
            pipe.cmd("WAIT")
                .arg(self.config.wait_replicas)
                .arg((self.config.timeout / 2).as_millis().max(1) as u64);
        }
        let mut replies = match timeout(
            self.config.timeout,
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
        )
        .await
        {
            Ok(Ok(replies)) => replies,
            Ok(Err(e)) => return all_of(self.failed(shard, "publish", Some(e))),
            Err(_) => return all_of(self.failed(shard, "publish", None)),
        };
        let replicated = match wait {
            false => true,
            true => {
                matches!(replies.pop(), Some(Ok(redis::Value::Int(n))) if n >= i64::from(self.config.wait_replicas))
            }
        };
        // Answered on a connection declared dead meanwhile: Redis may have
        // handled it while this node's subscriptions were gone.
        let current = shard.generation.load(Ordering::Acquire) == generation;
        indices
            .iter()
            .zip(replies)
            .map(|(&i, reply)| {
                let history = items[i].history.is_some();
                match self.outcome(shard, history, reply, current) {
                    Ok(_) if history && !replicated => Err(BusError::Unconfirmed(
                        "stored on the primary, but not on enough replicas in time".into(),
                    )),
                    outcome => outcome,
                }
            })
            .collect()
    }
}

impl Bus for RedisBus {
    /// The batch's messages grouped by shard, one pipeline per shard (PUBLISH
    /// or SPUBLISH, or the history script in history rooms), all shards at
    /// once: one write and one round trip each.
    fn publish_batch<'a>(&'a self, items: &'a [Message]) -> BoxFuture<'a, Vec<PublishResult>> {
        async move {
            let routes = self.routes();
            if routes.shards.len() == 1 && routes.topology.complete() {
                let all: Vec<usize> = (0..items.len()).collect();
                return self.publish_on(&routes.shards[0], items, &all).await;
            }
            let mut results: Vec<Option<PublishResult>> = vec![None; items.len()];
            let mut groups: Vec<(Arc<Shard>, Vec<usize>)> = Vec::new();
            for (i, m) in items.iter().enumerate() {
                match self.shard(self.channel(&m.topic).as_bytes()) {
                    Ok(shard) => match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &shard)) {
                        Some((_, group)) => group.push(i),
                        None => groups.push((shard, vec![i])),
                    },
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            let answers = join_all(
                groups
                    .iter()
                    .map(|(shard, indices)| self.publish_on(shard, items, indices)),
            )
            .await;
            for ((_, indices), answer) in groups.iter().zip(answers) {
                for (&i, result) in indices.iter().zip(answer) {
                    results[i] = Some(result);
                }
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(BusError::Unavailable("not sent".into()))))
                .collect()
        }
        .boxed()
    }

    fn history<'a>(
        &'a self,
        topic: &'a Topic,
        rule: History,
        pick: Pick,
    ) -> BoxFuture<'a, Result<Page, BusError>> {
        async move {
            let channel = self.channel(topic);
            let shard = self.shard(channel.as_bytes())?;
            let Publisher {
                mut conn, scripts, ..
            } = shard.connection()?;
            let cmd = history::read(&scripts, &channel, pick, Some(rule.ttl));
            match timeout(
                self.config.timeout,
                cmd.query_async::<redis::Value>(&mut conn),
            )
            .await
            {
                Ok(Ok(reply)) => history::page(reply).ok_or_else(|| {
                    BusError::Unavailable("redis answered the history read oddly".into())
                }),
                Ok(Err(e)) => Err(self.failed(&shard, "history read", Some(e))),
                Err(_) => Err(self.failed(&shard, "history read", None)),
            }
        }
        .boxed()
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// One script on the shard of the presence keys (see `redis/presence.rs`).
    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Result<Snapshot, BusError>> {
        async move {
            let shard = self.shard(self.presence.slot_key().as_bytes())?;
            let mut conn = shard.connection()?.conn;
            let cmd = presence::exchange(&self.presence, &self.node_id, &report);
            match timeout(
                self.config.timeout,
                cmd.query_async::<presence::Reply>(&mut conn),
            )
            .await
            {
                Ok(Ok(reply)) => Ok(presence::snapshot(reply)),
                Ok(Err(e)) => Err(self.failed(&shard, "presence", Some(e))),
                Err(_) => Err(self.failed(&shard, "presence", None)),
            }
        }
        .boxed()
    }

    fn watch_seconds<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<f64, BusError>> {
        async move {
            let key = self.presence.watch(room);
            let shard = self.shard(key.as_bytes())?;
            let mut conn = shard.connection()?.conn;
            let get = redis::cmd("GET").arg(key).to_owned();
            match timeout(
                self.config.timeout,
                get.query_async::<Option<f64>>(&mut conn),
            )
            .await
            {
                Ok(Ok(seconds)) => Ok(seconds.unwrap_or(0.0)),
                Ok(Err(e)) => Err(self.failed(&shard, "read of watch time", Some(e))),
                Err(_) => Err(self.failed(&shard, "read of watch time", None)),
            }
        }
        .boxed()
    }
}

/// A client for `url`; for `rediss://`, trusting `cfg.tls_ca_file` if set.
fn client(cfg: &RedisConfig, url: &str) -> Result<redis::Client, String> {
    let client = match &cfg.tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("bus.redis.tls_ca_file {}: {e}", path.display()))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(url, certs)
        }
        None => redis::Client::open(url),
    };
    client.map_err(|e| e.to_string())
}

pub fn start(
    config: RedisConfig,
    node_id: &str,
    sink: Arc<dyn Deliver>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Arc<dyn Bus> {
    metrics.bus_up.set(0.0);
    let seeds: Vec<redis::Client> = config
        .seeds
        .iter()
        .filter_map(|url| match client(&config, url) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "bad redis url");
                None
            }
        })
        .collect();
    let bus = Arc::new(RedisBus {
        presence: presence::Keys::new(&config.channel_prefix, node_id),
        node_id: node_id.to_owned(),
        config,
        metrics: metrics.clone(),
        routes: RwLock::new(Arc::new(Routes {
            topology: Arc::new(Topology::none()),
            shards: Vec::new(),
        })),
        up: AtomicBool::new(false),
        refresh: Notify::new(),
    });
    if seeds.is_empty() {
        return bus;
    }
    let router = router::Router::new(
        bus.clone(),
        seeds,
        sink,
        subs,
        metrics,
        tracker.clone(),
        shutdown,
    );
    tracker.spawn(router.run());
    bus
}
