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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    Bus, BusError, Count, Deliver, Message, Page, Pick, PublishResult, Published, Report, Snapshot,
    SubCmd,
};
use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::namespace::History;
use crate::topic::Topic;
use history::Scripts;
use presence::Mode;
use topology::Topology;

struct RedisBus {
    config: RedisConfig,
    /// The per-node keys of presence.
    presence: presence::Nodes,
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

/// A shard and the indices of the commands (or messages) it serves.
type ShardGroup = (Arc<Shard>, Vec<usize>);

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
            Err(e) => return Err(self.refused(shard, "publish", e)),
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

    /// Redis refused one command of a pipeline (NOSCRIPT, a script error,
    /// MOVED, CLUSTERDOWN): it did not run.
    fn refused(&self, shard: &Shard, what: &str, e: redis::RedisError) -> BusError {
        if e.redirect_node().is_some() {
            self.refresh.notify_one();
        } else {
            shard.suspect.notify_one();
        }
        BusError::Unavailable(format!("redis refused the {what}: {e}"))
    }

    /// Group `keys` (channels or keys) by the shard serving them: the
    /// indices of each shard's, in order, and the keys no shard serves.
    fn by_shard<'k>(
        &self,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> (Vec<ShardGroup>, Vec<(usize, BusError)>) {
        let (mut groups, mut homeless) = (Vec::<ShardGroup>::new(), Vec::new());
        for (i, key) in keys.enumerate() {
            match self.shard(key) {
                Ok(shard) => match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &shard)) {
                    Some((_, group)) => group.push(i),
                    None => groups.push((shard, vec![i])),
                },
                Err(e) => homeless.push((i, e)),
            }
        }
        (groups, homeless)
    }

    /// Run `cmds` (each with a key that routes it), one pipeline per shard,
    /// all shards at once: each command's reply, in the same order.
    async fn on_shards(
        &self,
        what: &str,
        cmds: &[(String, redis::Cmd)],
    ) -> Vec<Result<redis::Value, BusError>> {
        let mut results: Vec<Option<Result<redis::Value, BusError>>> = vec![None; cmds.len()];
        let (groups, homeless) = self.by_shard(cmds.iter().map(|(key, _)| key.as_bytes()));
        for (i, e) in homeless {
            results[i] = Some(Err(e));
        }
        let run = |shard: Arc<Shard>, indices: Vec<usize>| async move {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &indices {
                pipe.add_command(cmds[i].1.clone());
            }
            let replies = match shard.connection() {
                Err(e) => Err(e),
                Ok(Publisher { mut conn, .. }) => {
                    let query =
                        pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn);
                    match timeout(self.config.timeout, query).await {
                        Ok(Ok(replies)) => Ok(replies),
                        Ok(Err(e)) => Err(self.failed(&shard, what, Some(e))),
                        Err(_) => Err(self.failed(&shard, what, None)),
                    }
                }
            };
            let answers: Vec<Result<redis::Value, BusError>> = match replies {
                Ok(replies) => replies
                    .into_iter()
                    .map(|r| r.map_err(|e| self.refused(&shard, what, e)))
                    .collect(),
                Err(e) => indices.iter().map(|_| Err(e.clone())).collect(),
            };
            (indices, answers)
        };
        for (indices, answers) in join_all(groups.into_iter().map(|(s, i)| run(s, i))).await {
            for (i, answer) in indices.into_iter().zip(answers) {
                results[i] = Some(answer);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BusError::Unavailable("not sent".into()))))
            .collect()
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
            let channels: Vec<String> = items.iter().map(|m| self.channel(&m.topic)).collect();
            let (groups, homeless) = self.by_shard(channels.iter().map(|c| c.as_bytes()));
            for (i, e) in homeless {
                results[i] = Some(Err(e));
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

    /// The rooms' script calls, grouped by slot (on a cluster) in calls of
    /// at most [`presence::ROOMS_PER_CALL`], and the node's own keys, all
    /// shards at once (see `redis/presence.rs`).
    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Snapshot> {
        async move {
            let (mode, fresh, watch_ttl) = match &report {
                Report::Read { .. } => (Mode::Read, Duration::ZERO, Duration::ZERO),
                Report::Counts {
                    fresh_for,
                    watch_ttl,
                    ..
                } => (Mode::Counts, *fresh_for, *watch_ttl),
                Report::Leaving { watch_ttl, .. } => (Mode::Leaving, Duration::ZERO, *watch_ttl),
            };
            let entries: Vec<(String, u64, f64)> = match &report {
                Report::Read { rooms } => rooms
                    .iter()
                    .map(|room| (self.channel(&Topic::room(room)), 0, 0.0))
                    .collect(),
                Report::Counts { rooms, .. } | Report::Leaving { rooms, .. } => rooms
                    .iter()
                    .map(|r| (self.channel(&Topic::room(r.room)), r.online, r.watch))
                    .collect(),
            };
            let mut by_slot: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
            for (i, (channel, _, _)) in entries.iter().enumerate() {
                let slot = if self.config.cluster {
                    topology::slot(channel.as_bytes())
                } else {
                    0
                };
                by_slot.entry(slot).or_default().push(i);
            }
            let calls: Vec<&[usize]> = by_slot
                .values()
                .flat_map(|rooms| rooms.chunks(presence::ROOMS_PER_CALL))
                .collect();
            let times = presence::Times { fresh, watch_ttl };
            let mut cmds: Vec<(String, redis::Cmd)> = calls
                .iter()
                .map(|rooms| {
                    let group: Vec<(String, u64, f64)> =
                        rooms.iter().map(|&i| entries[i].clone()).collect();
                    let cmd = presence::rooms(mode, &self.node_id, times, &group);
                    (group[0].0.clone(), cmd)
                })
                .collect();
            let live = self.presence.live(mode, &self.node_id, fresh);
            cmds.push((self.presence.set().to_owned(), live));
            if mode != Mode::Read {
                let own: Vec<(&str, u64)> = match &report {
                    Report::Counts { rooms, .. } => rooms
                        .iter()
                        .filter(|r| r.online > 0)
                        .map(|r| (r.room, r.online))
                        .collect(),
                    _ => Vec::new(),
                };
                let replace = self.presence.replace(&self.node_id, &own, fresh);
                cmds.push((self.presence.rooms_of(&self.node_id), replace));
            }
            let mut replies = self.on_shards("presence", &cmds).await;
            let replaced = match mode {
                Mode::Read => Ok(redis::Value::Nil),
                _ => replies.pop().unwrap_or(Ok(redis::Value::Nil)),
            };
            let nodes = match replies.pop().map(|r| r.map(presence::live)) {
                Some(Ok(Some(live))) if replaced.is_ok() => {
                    Some(live.iter().filter(|n| **n != self.node_id).count())
                }
                _ => None,
            };
            let mut rooms: Vec<Result<Vec<Count>, BusError>> =
                vec![Err(BusError::Unavailable("not sent".into())); entries.len()];
            for (call, reply) in calls.iter().zip(replies) {
                let counts = reply.and_then(|value| {
                    presence::counts(value, call.len()).ok_or_else(|| {
                        BusError::Unconfirmed("redis answered the presence script oddly".into())
                    })
                });
                match counts {
                    Ok(counts) => {
                        for (&i, room) in call.iter().zip(counts) {
                            rooms[i] = Ok(room);
                        }
                    }
                    Err(e) => {
                        for &i in call.iter() {
                            rooms[i] = Err(e.clone());
                        }
                    }
                }
            }
            Snapshot { rooms, nodes }
        }
        .boxed()
    }

    /// The live nodes, then every other live node's rooms hash.
    fn reported_rooms(&self) -> BoxFuture<'_, Result<HashMap<String, u64>, BusError>> {
        async move {
            let set = self.presence.set().to_owned();
            let live = self
                .presence
                .live(Mode::Read, &self.node_id, Duration::ZERO);
            let reply = self.on_shards("presence read", &[(set, live)]).await;
            let odd = || BusError::Unavailable("redis answered the presence read oddly".into());
            let nodes = match reply.into_iter().next() {
                Some(Ok(value)) => presence::live(value).ok_or_else(odd)?,
                Some(Err(e)) => return Err(e),
                None => return Err(odd()),
            };
            let reads: Vec<(String, redis::Cmd)> = nodes
                .iter()
                .filter(|n| **n != self.node_id)
                .map(|n| {
                    let key = self.presence.rooms_of(n);
                    let cmd = redis::cmd("HGETALL").arg(&key).to_owned();
                    (key, cmd)
                })
                .collect();
            let mut sums = HashMap::new();
            for reply in self.on_shards("presence read", &reads).await {
                presence::add_rooms(reply?, &mut sums).ok_or_else(odd)?;
            }
            Ok(sums)
        }
        .boxed()
    }

    fn watch_seconds<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<f64, BusError>> {
        async move {
            let [_, key] = presence::room_keys(&self.channel(&Topic::room(room)));
            let get = redis::cmd("GET").arg(&key).to_owned();
            let reply = self.on_shards("read of watch time", &[(key, get)]).await;
            let value = reply.into_iter().next().unwrap_or(Ok(redis::Value::Nil))?;
            redis::from_redis_value::<Option<f64>>(value)
                .map(|seconds| seconds.unwrap_or(0.0))
                .map_err(|_| BusError::Unavailable("redis answered the watch time oddly".into()))
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
        presence: presence::Nodes::new(&config.channel_prefix),
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
