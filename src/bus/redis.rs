//! The Redis bus: Redis pub/sub, one channel per topic (`<prefix>room:<room>`,
//! `<prefix>user:<id>`; [`Topic::channel`]).
//!
//! One supervisor task owns the node's two Redis connections: a dedicated
//! subscriber connection (SUBSCRIBE only to rooms with local clients) and a
//! multiplexed connection that pipelines every PUBLISH of the node. It
//! applies the node's subscription commands in order, hands received messages
//! to the node ([`Deliver`]), PINGs the subscriber connection to catch a dead link, and on
//! any failure marks the bus down, reconnects with capped, jittered backoff
//! and re-subscribes every room that still has local clients.
//!
//! PINGs prove that Redis answers, not that it delivers. So every
//! `canary_interval` the node publishes a canary on a channel of its own
//! (`<prefix>canary:<node id>`, subscribed on the subscriber connection) and
//! expects it back within `timeout`; a lost canary counts
//! `roomcast_bus_canary_failures_total` and is handled like a dead link.
//! After a (re)connect the bus is declared up only once a first canary has
//! come back.
//!
//! Presence (per-room counts, watch time) runs its scripts on the publisher
//! connection; the keys and the script are in `redis/presence.rs`.
//!
//! History rooms are published with a script that stamps, stores and
//! publishes each message (`redis/history.rs`); in the same pipeline as the
//! plain PUBLISHes of other rooms. What the subscriber receives of them is
//! checked for gaps and repaired from history before it is delivered
//! (`redis/repair.rs`), also after every reconnect.
//!
//! We do not use redis-rs's `ConnectionManager` resubscription: measured, it
//! recovered from a 1 s outage but not from a 15 s one until another command
//! ran, and its first PUBLISH after a restart failed once. Here both
//! connections are replaced together, so the first publish after the bus is
//! up again uses a fresh connection.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::RwLock;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod history;
mod presence;
mod repair;

use super::{
    Bus, BusError, Deliver, Message, Page, Pick, PublishResult, Published, Report, Snapshot, SubCmd,
};
use crate::config::{redact_url, RedisConfig};
use crate::metrics::Metrics;
use crate::namespace::History;
use crate::protocol::epoch_key;
use crate::topic::Topic;
use history::Scripts;
use repair::{Fate, Seen};

/// Rooms per SUBSCRIBE command when re-subscribing after a reconnect.
const RESUBSCRIBE_BATCH: usize = 512;

/// How long a failed session still takes what its subscriber connection
/// yields (it ends at once when Redis closed it).
const DRAIN: Duration = Duration::from_millis(200);

struct RedisBus {
    config: RedisConfig,
    /// This node's presence keys (and everyone's, by prefix).
    presence: presence::Keys,
    node_id: String,
    /// The publishing connection while the bus is up.
    publisher: RwLock<Option<Publisher>>,
    /// Bumped each time the connections are declared dead: a reply that
    /// arrives on an older generation is not trusted (the node's
    /// subscriptions may have been gone when Redis handled the publish).
    generation: AtomicU64,
    up: AtomicBool,
    /// A publish failed: the supervisor should check the connection now.
    suspect: Notify,
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

    fn set_up(&self, metrics: &Metrics, publisher: Option<(MultiplexedConnection, Arc<Scripts>)>) {
        let up = publisher.is_some();
        let generation = match up {
            true => self.generation.load(Ordering::Acquire),
            false => self.generation.fetch_add(1, Ordering::AcqRel) + 1,
        };
        *self.publisher.write() = publisher.map(|(conn, scripts)| Publisher {
            generation,
            conn,
            scripts,
        });
        self.up.store(up, Ordering::Release);
        metrics.bus_up.set(if up { 1.0 } else { 0.0 });
    }

    /// The publishing connection, or why there is none.
    fn connection(&self) -> Result<Publisher, BusError> {
        self.publisher
            .read()
            .clone()
            .ok_or_else(|| BusError::Unavailable("redis is not connected".into()))
    }

    /// What one reply of a publish pipeline means for its message.
    fn outcome(
        &self,
        history: bool,
        reply: redis::RedisResult<redis::Value>,
        current: bool,
    ) -> PublishResult {
        let reply = match reply {
            Ok(reply) => reply,
            // Redis refused this command (NOSCRIPT, a script error): it did not run.
            Err(e) => {
                self.suspect.notify_one();
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

    /// A command on the publishing connection failed (or timed out, `None`):
    /// what that means, and have the supervisor check the connection.
    fn failed(&self, what: &str, e: Option<redis::RedisError>) -> BusError {
        self.suspect.notify_one();
        match e {
            // Redis answering with an error refused the command; a broken
            // connection may have carried it first.
            Some(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                BusError::Unconfirmed(format!("redis {what} failed: {e}"))
            }
            Some(e) => BusError::Unavailable(format!("redis {what} failed: {e}")),
            None => BusError::Unconfirmed(format!("redis {what} timed out")),
        }
    }
}

impl Bus for RedisBus {
    /// Every message of the batch in one pipeline (PUBLISH, or the history
    /// script in history rooms): one write, one round trip.
    fn publish_batch<'a>(&'a self, items: &'a [Message]) -> BoxFuture<'a, Vec<PublishResult>> {
        async move {
            // The same failure for every item.
            let all_of = |err: BusError| -> Vec<PublishResult> {
                items.iter().map(|_| Err(err.clone())).collect()
            };
            let Publisher {
                generation,
                mut conn,
                scripts,
            } = match self.connection() {
                Ok(c) => c,
                Err(e) => return all_of(e),
            };
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for m in items {
                let channel = self.channel(&m.topic);
                match m.history {
                    None => {
                        pipe.cmd("PUBLISH").arg(channel).arg(&m.envelope[..]);
                    }
                    Some(rule) => {
                        history::publish(&mut pipe, &scripts, &channel, &m.envelope, rule)
                    }
                }
            }
            let replies = match timeout(
                self.config.timeout,
                pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
            )
            .await
            {
                Ok(Ok(replies)) => replies,
                Ok(Err(e)) => return all_of(self.failed("publish", Some(e))),
                Err(_) => return all_of(self.failed("publish", None)),
            };
            // Answered on a connection declared dead meanwhile: Redis may have
            // handled it while this node's subscriptions were gone.
            let current = self.generation.load(Ordering::Acquire) == generation;
            items
                .iter()
                .zip(replies)
                .map(|(m, reply)| self.outcome(m.history.is_some(), reply, current))
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
            let Publisher {
                mut conn, scripts, ..
            } = self.connection()?;
            let cmd = history::read(&scripts, &self.channel(topic), pick, Some(rule.ttl));
            match timeout(
                self.config.timeout,
                cmd.query_async::<redis::Value>(&mut conn),
            )
            .await
            {
                Ok(Ok(reply)) => history::page(reply).ok_or_else(|| {
                    BusError::Unavailable("redis answered the history read oddly".into())
                }),
                Ok(Err(e)) => Err(self.failed("history read", Some(e))),
                Err(_) => Err(self.failed("history read", None)),
            }
        }
        .boxed()
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// One script on the publisher connection (see `redis/presence.rs`).
    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Result<Snapshot, BusError>> {
        async move {
            let mut conn = self.connection()?.conn;
            let cmd = presence::exchange(&self.presence, &self.node_id, &report);
            match timeout(
                self.config.timeout,
                cmd.query_async::<presence::Reply>(&mut conn),
            )
            .await
            {
                Ok(Ok(reply)) => Ok(presence::snapshot(reply)),
                Ok(Err(e)) => Err(self.failed("presence", Some(e))),
                Err(_) => Err(self.failed("presence", None)),
            }
        }
        .boxed()
    }

    fn watch_seconds<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<f64, BusError>> {
        async move {
            let mut conn = self.connection()?.conn;
            let get = redis::cmd("GET").arg(self.presence.watch(room)).to_owned();
            match timeout(
                self.config.timeout,
                get.query_async::<Option<f64>>(&mut conn),
            )
            .await
            {
                Ok(Ok(seconds)) => Ok(seconds.unwrap_or(0.0)),
                Ok(Err(e)) => Err(self.failed("read of watch time", Some(e))),
                Err(_) => Err(self.failed("read of watch time", None)),
            }
        }
        .boxed()
    }
}

/// A client for `cfg.url`; for `rediss://`, trusting `cfg.tls_ca_file` if set.
fn client(cfg: &RedisConfig) -> Result<redis::Client, String> {
    let client = match &cfg.tls_ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("bus.redis.tls_ca_file {}: {e}", path.display()))?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(cfg.url.as_str(), certs)
        }
        None => redis::Client::open(cfg.url.as_str()),
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
    let bus = Arc::new(RedisBus {
        presence: presence::Keys::new(&config.channel_prefix, node_id),
        node_id: node_id.to_owned(),
        config,
        publisher: RwLock::new(None),
        generation: AtomicU64::new(0),
        up: AtomicBool::new(false),
        suspect: Notify::new(),
    });
    let supervisor = Supervisor {
        canary_channel: format!("{}canary:{node_id}", bus.config.channel_prefix),
        canary_seq: 0,
        bus: bus.clone(),
        sink,
        subs,
        metrics,
        shutdown,
        desired: HashSet::new(),
        seen: Seen::default(),
    };
    tracker.spawn(supervisor.run());
    bus
}

/// A publishing connection and its loaded scripts.
type Conn = (MultiplexedConnection, Arc<Scripts>);

struct Supervisor {
    bus: Arc<RedisBus>,
    sink: Arc<dyn Deliver>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Topics that should be subscribed: the node's, in command order.
    desired: HashSet<Topic>,
    /// What was received of each subscribed history room (`redis/repair.rs`).
    seen: Seen,
    /// This node's private channel for canaries.
    canary_channel: String,
    /// The last canary sent (its payload).
    canary_seq: u64,
}

/// Why a connected session ended.
enum Ended {
    Shutdown,
    Failed(String),
}

impl Supervisor {
    async fn run(mut self) {
        let cfg = self.bus.config.clone();
        let mut backoff = cfg.backoff_min;
        loop {
            let shutdown = self.shutdown.clone();
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.connect() => c,
            };
            match connected {
                Ok((sink, stream, publisher)) => {
                    backoff = cfg.backoff_min;
                    self.metrics.bus_reconnects.inc();
                    tracing::info!(url = %redact_url(&cfg.url), topics = self.desired.len(), "redis bus connected");
                    let ended = self.serve(sink, stream, publisher).await;
                    self.bus.set_up(&self.metrics, None);
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Failed(reason) => {
                            tracing::warn!(%reason, "redis bus lost; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "redis connect failed")
                }
            }
            // Jittered wait in [backoff/2, backoff], still applying commands.
            let delay = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(cfg.backoff_max);
            let deadline = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    cmd = self.subs.recv() => match cmd {
                        Some(cmd) => self.apply_offline(cmd),
                        None => return,
                    },
                }
            }
        }
    }

    /// Commands while disconnected only change the desired set (the
    /// subscriptions are made on reconnect); barriers answer "not in effect".
    fn apply_offline(&mut self, cmd: SubCmd) {
        match cmd {
            SubCmd::Subscribe(topic) => {
                self.desired.insert(topic);
            }
            SubCmd::Unsubscribe(topic) => {
                self.seen.forget(topic.key());
                self.desired.remove(&topic);
            }
            SubCmd::Sync(done) => {
                let _ = done.send(false);
            }
            SubCmd::Position(topic, at) => self.seen.position(topic.key(), at),
        }
    }

    async fn connect(&mut self) -> Result<(PubSubSink, PubSubStream, Conn), String> {
        let cfg = &self.bus.config;
        let client = client(cfg)?;
        let pubsub = timeout(cfg.timeout, client.get_async_pubsub())
            .await
            .map_err(|_| "timed out connecting".to_string())?
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = pubsub.split();
        let mut channels: Vec<String> = self.desired.iter().map(|t| self.bus.channel(t)).collect();
        channels.push(self.canary_channel.clone());
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            timeout(cfg.timeout, sink.subscribe(batch))
                .await
                .map_err(|_| "timed out subscribing".to_string())?
                .map_err(|e| e.to_string())?;
        }
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout));
        let mut publisher = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await
            .map_err(|e| e.to_string())?;
        let scripts = timeout(cfg.timeout, history::load(&mut publisher))
            .await
            .map_err(|_| "timed out loading scripts".to_string())?
            .map_err(|e| format!("loading scripts failed: {e}"))?;
        Ok((sink, stream, (publisher, Arc::new(scripts))))
    }

    /// Publish the next canary (on a task of its own, so a stuck PUBLISH
    /// never stalls the subscriber) and return when it must be back.
    fn send_canary(&mut self, publisher: &MultiplexedConnection) -> Instant {
        self.canary_seq += 1;
        let mut conn = publisher.clone();
        let cmd = redis::cmd("PUBLISH")
            .arg(&self.canary_channel)
            .arg(self.canary_seq)
            .to_owned();
        let limit = self.bus.config.timeout;
        tokio::spawn(async move {
            let _ = timeout(limit, cmd.query_async::<i64>(&mut conn)).await;
        });
        Instant::now() + limit
    }

    async fn serve(
        &mut self,
        mut sink: PubSubSink,
        mut stream: PubSubStream,
        publisher: Conn,
    ) -> Ended {
        let cfg = self.bus.config.clone();
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        let canaries = !cfg.canary_interval.is_zero();
        // Placeholders when canaries are off: the branches below are disabled then.
        let period = if canaries {
            cfg.canary_interval
        } else {
            Duration::from_secs(3600)
        };
        let mut canary_tick = tokio::time::interval_at(Instant::now() + period, period);
        // The canary in flight: (payload, deadline). Up only after the first one is back.
        let mut canary: Option<(u64, Instant)> = None;
        // Kept for PINGs, canaries and repairs; handed to publishers once up.
        let (conn, scripts) = publisher.clone();
        let mut publisher = Some(publisher);
        // What was published in history rooms while this node was not
        // subscribed comes from history, before anything of the new stream.
        self.catch_up(&conn, &scripts).await;
        if canaries {
            canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
        } else {
            self.bus.set_up(&self.metrics, publisher.take());
        }
        let far = Instant::now() + Duration::from_secs(3600);
        let ended = loop {
            let deadline = canary.map_or(far, |(_, d)| d);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ended::Shutdown,
                _ = tokio::time::sleep_until(deadline), if canary.is_some() => {
                    self.metrics.bus_canary_failures.inc();
                    break Ended::Failed("the canary did not come back through redis in time".into());
                }
                _ = canary_tick.tick(), if canaries && canary.is_none() => {
                    canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
                }
                msg = stream.next() => {
                    let Some(first) = msg else {
                        return Ended::Failed("subscriber connection closed".into());
                    };
                    let waiting = canary.map(|(seq, _)| seq);
                    let (closed, back) = self.deliver(first, &mut stream, &conn, &scripts, waiting).await;
                    if back {
                        canary = None;
                        if let Some(p) = publisher.take() {
                            self.bus.set_up(&self.metrics, Some(p));
                        }
                    }
                    if closed {
                        return Ended::Failed("subscriber connection closed".into());
                    }
                }
                cmd = self.subs.recv() => {
                    let Some(cmd) = cmd else { return Ended::Shutdown };
                    // Take every change already queued: a join storm becomes a few
                    // SUBSCRIBE commands instead of one round trip per room.
                    let mut cmds = vec![cmd];
                    while cmds.len() < RESUBSCRIBE_BATCH {
                        match self.subs.try_recv() {
                            Ok(next) => cmds.push(next),
                            Err(_) => break,
                        }
                    }
                    if let Err(reason) = self.apply(&mut sink, cmds, cfg.timeout).await {
                        break Ended::Failed(reason);
                    }
                }
                _ = ping.tick() => {
                    if let Err(reason) = self.check(&mut sink, &conn, cfg.timeout).await {
                        break Ended::Failed(reason);
                    }
                }
                _ = self.bus.suspect.notified() => {
                    if let Err(reason) = self.check(&mut sink, &conn, cfg.timeout).await {
                        break Ended::Failed(reason);
                    }
                }
            }
        };
        // What Redis sent just before it failed may still be unread (a
        // publish failing first wakes the check above): deliver it.
        self.drain(&mut stream, &conn, &scripts).await;
        ended
    }

    /// Deliver `first` and whatever else has already arrived, as one batch
    /// (in order, repaired); answers whether the stream ended and whether
    /// the canary `waiting` for came back in it.
    async fn deliver(
        &mut self,
        first: redis::Msg,
        stream: &mut PubSubStream,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        waiting: Option<u64>,
    ) -> (bool, bool) {
        let mut batch = vec![first];
        let mut closed = false;
        while batch.len() < super::MAX_BATCH {
            match stream.next().now_or_never() {
                Some(Some(next)) => batch.push(next),
                Some(None) => {
                    closed = true;
                    break;
                }
                None => break,
            }
        }
        let back = waiting.is_some_and(|seq| {
            batch.iter().any(|m| {
                m.get_channel_name() == self.canary_channel
                    && m.get_payload_bytes() == seq.to_string().as_bytes()
            })
        });
        let prefix = &self.bus.config.channel_prefix;
        let items: Vec<(&str, &[u8])> = batch
            .iter()
            .filter_map(|m| {
                Some((
                    m.get_channel_name().strip_prefix(prefix.as_str())?,
                    m.get_payload_bytes(),
                ))
            })
            .collect();
        if items.iter().any(|(_, p)| Seen::stamp(p).is_some()) {
            let ordered = self.repair(items, conn, scripts).await;
            let items: Vec<(&str, &[u8])> = ordered.iter().map(|(k, p)| (*k, &p[..])).collect();
            self.sink.deliver_batch(&items);
        } else {
            self.sink.deliver_batch(&items);
        }
        (closed, back)
    }

    /// The connections are being given up: deliver what the subscriber
    /// connection still yields, until it ends or [`DRAIN`] passes.
    async fn drain(
        &mut self,
        stream: &mut PubSubStream,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
    ) {
        let until = Instant::now() + DRAIN;
        while let Ok(Some(first)) = tokio::time::timeout_at(until, stream.next()).await {
            if self.deliver(first, stream, conn, scripts, None).await.0 {
                return;
            }
        }
    }

    /// Apply subscription commands in order; consecutive subscribes (or
    /// unsubscribes) go to Redis as one command.
    async fn apply(
        &mut self,
        sink: &mut PubSubSink,
        cmds: Vec<SubCmd>,
        limit: Duration,
    ) -> Result<(), String> {
        let mut cmds = cmds.into_iter().peekable();
        while let Some(cmd) = cmds.next() {
            let (subscribe, first) = match cmd {
                SubCmd::Subscribe(topic) => (true, topic),
                SubCmd::Unsubscribe(topic) => (false, topic),
                SubCmd::Sync(done) => {
                    // Everything before the barrier has been applied.
                    let _ = done.send(true);
                    continue;
                }
                SubCmd::Position(topic, at) => {
                    self.seen.position(topic.key(), at);
                    continue;
                }
            };
            let mut topics = vec![first];
            while let Some(next) = cmds.next_if(|c| match c {
                SubCmd::Subscribe(_) => subscribe,
                SubCmd::Unsubscribe(_) => !subscribe,
                SubCmd::Sync(_) | SubCmd::Position(..) => false,
            }) {
                if let SubCmd::Subscribe(topic) | SubCmd::Unsubscribe(topic) = next {
                    topics.push(topic);
                }
            }
            let channels: Vec<String> = topics.iter().map(|t| self.bus.channel(t)).collect();
            let result = if subscribe {
                self.desired.extend(topics);
                timeout(limit, sink.subscribe(&channels)).await
            } else {
                for topic in &topics {
                    self.seen.forget(topic.key());
                    self.desired.remove(topic);
                }
                timeout(limit, sink.unsubscribe(&channels)).await
            };
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("subscription change failed: {e}")),
                Err(_) => return Err("subscription change timed out".into()),
            }
        }
        Ok(())
    }

    /// Read from history what was published in the tracked history rooms
    /// after what this node last delivered, and deliver it (one pipeline
    /// per chunk of rooms). A room whose history started over while the
    /// node was away (Redis lost it: another epoch) gets all of the new
    /// epoch; one without history yet is forgotten (its next message
    /// starts it again).
    async fn catch_up(&mut self, conn: &MultiplexedConnection, scripts: &Scripts) {
        let tracked = self.seen.rooms();
        for chunk in tracked.chunks(RESUBSCRIBE_BATCH) {
            let reads: Vec<(&str, u64)> = chunk
                .iter()
                .map(|(k, _, last)| (k.as_str(), *last))
                .collect();
            let Some(mut pages) = self.read_pages(conn, scripts, &reads).await else {
                tracing::warn!(
                    rooms = chunk.len(),
                    "history catch-up failed; those rooms may miss messages"
                );
                continue;
            };
            let over: Vec<usize> = (0..chunk.len())
                .filter(|&i| {
                    pages[i]
                        .as_ref()
                        .is_some_and(|p| !p.epoch.is_empty() && epoch_key(&p.epoch) != chunk[i].1)
                })
                .collect();
            if !over.is_empty() {
                let reads: Vec<(&str, u64)> =
                    over.iter().map(|&i| (chunk[i].0.as_str(), 0)).collect();
                let fresh = self
                    .read_pages(conn, scripts, &reads)
                    .await
                    .unwrap_or_default();
                for (i, page) in over.into_iter().zip(fresh) {
                    pages[i] = page;
                }
            }
            for ((key, epoch, last), page) in chunk.iter().zip(pages) {
                let entries = self.continuation(key, *epoch, *last, page);
                let items: Vec<(&str, &[u8])> =
                    entries.iter().map(|e| (key.as_str(), &e[..])).collect();
                if !items.is_empty() {
                    self.sink.deliver_batch(&items);
                }
            }
        }
    }

    /// Read rooms' history after a seq each, in one pipeline: a page (or
    /// `None`) per room, or `None` when the pipeline failed.
    async fn read_pages(
        &self,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        reads: &[(&str, u64)],
    ) -> Option<Vec<Option<Page>>> {
        let prefix = &self.bus.config.channel_prefix;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (key, after) in reads {
            pipe.add_command(history::read(
                scripts,
                &format!("{prefix}{key}"),
                Pick::After(*after),
                None,
            ));
        }
        let mut conn = conn.clone();
        match timeout(
            self.bus.config.timeout,
            pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut conn),
        )
        .await
        {
            Ok(Ok(replies)) => Some(
                replies
                    .into_iter()
                    .map(|r| r.ok().and_then(history::page))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// What of `page` continues room `key` after (`epoch`, `last`): the
    /// entries to deliver, counted. `page` is of the same epoch (read after
    /// `last`) or of a new one (read from its start).
    fn continuation(
        &mut self,
        key: &str,
        epoch: u64,
        last: u64,
        page: Option<Page>,
    ) -> Vec<bytes::Bytes> {
        let page = match page {
            Some(page) if !page.epoch.is_empty() => page,
            // No history at all (Redis lost it, and nothing was published since).
            Some(_) => {
                self.seen.forget(key);
                return Vec::new();
            }
            None => {
                tracing::warn!(
                    room = key,
                    "history catch-up failed for a room; it may miss messages"
                );
                return Vec::new();
            }
        };
        if epoch_key(&page.epoch) == epoch && page.oldest > last + 1 {
            self.metrics
                .history_unrepaired
                .inc_by(page.oldest - last - 1);
        }
        let mut out = Vec::with_capacity(page.entries.len());
        for entry in page.entries {
            let Some((seq, e)) = Seen::stamp(&entry) else {
                continue;
            };
            match self.seen.classify(key, seq, e) {
                Fate::Duplicate => continue,
                Fate::Gap { after } => self.metrics.history_unrepaired.inc_by(seq - after - 1),
                Fate::Pass => {}
            }
            out.push(entry);
        }
        self.metrics.history_repaired.inc_by(out.len() as u64);
        out
    }

    /// Put a received batch in order: drop what was delivered already, and
    /// fill each gap in a history room from its history before the message
    /// after it (one read per gap, while the stream waits).
    async fn repair<'m>(
        &mut self,
        items: Vec<(&'m str, &'m [u8])>,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
    ) -> Vec<(&'m str, Cow<'m, [u8]>)> {
        let mut out = Vec::with_capacity(items.len());
        for (key, payload) in items {
            let Some((seq, epoch)) = Seen::stamp(payload) else {
                out.push((key, Cow::Borrowed(payload)));
                continue;
            };
            match self.seen.classify(key, seq, epoch) {
                Fate::Pass => {}
                Fate::Duplicate => continue,
                Fate::Gap { after } => {
                    let channel = format!("{}{key}", self.bus.config.channel_prefix);
                    let cmd = history::read(scripts, &channel, Pick::After(after), None);
                    let mut conn = conn.clone();
                    let page = match timeout(
                        self.bus.config.timeout,
                        cmd.query_async::<redis::Value>(&mut conn),
                    )
                    .await
                    {
                        Ok(Ok(reply)) => history::page(reply),
                        _ => None,
                    };
                    let missing: Vec<bytes::Bytes> = match page.filter(|p| p.epoch == epoch) {
                        Some(page) => page
                            .entries
                            .into_iter()
                            .filter(|e| Seen::stamp(e).is_some_and(|(s, _)| s > after && s < seq))
                            .collect(),
                        None => Vec::new(),
                    };
                    let lost = (seq - after - 1).saturating_sub(missing.len() as u64);
                    self.metrics.history_repaired.inc_by(missing.len() as u64);
                    self.metrics.history_unrepaired.inc_by(lost);
                    if lost > 0 {
                        tracing::warn!(
                            room = key,
                            after,
                            seq,
                            lost,
                            "messages missed on the bus are no longer in history"
                        );
                    }
                    out.extend(missing.into_iter().map(|e| (key, Cow::Owned(e.to_vec()))));
                }
            }
            out.push((key, Cow::Borrowed(payload)));
        }
        out
    }

    /// PING both connections (and load the history scripts again, should
    /// Redis have lost them); a dead link is not trusted forever.
    async fn check(
        &mut self,
        sink: &mut PubSubSink,
        publisher: &MultiplexedConnection,
        limit: Duration,
    ) -> Result<(), String> {
        match timeout(limit, sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("subscriber ping failed: {e}")),
            Err(_) => return Err("subscriber ping timed out".into()),
        }
        let mut publisher = publisher.clone();
        match timeout(limit, history::load(&mut publisher)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("publisher check failed: {e}")),
            Err(_) => Err("publisher check timed out".into()),
        }
    }
}
