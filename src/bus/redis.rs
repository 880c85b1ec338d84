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
//! We do not use redis-rs's `ConnectionManager` resubscription: measured, it
//! recovered from a 1 s outage but not from a 15 s one until another command
//! ran, and its first PUBLISH after a restart failed once. Here both
//! connections are replaced together, so the first publish after the bus is
//! up again uses a fresh connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use parking_lot::RwLock;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod presence;

use super::{Bus, BusError, Deliver, PublishResult, Published, Report, Snapshot, SubCmd};
use crate::config::{redact_url, RedisConfig};
use crate::metrics::Metrics;
use crate::topic::Topic;

/// Rooms per SUBSCRIBE command when re-subscribing after a reconnect.
const RESUBSCRIBE_BATCH: usize = 512;

struct RedisBus {
    config: RedisConfig,
    /// This node's presence keys (and everyone's, by prefix).
    presence: presence::Keys,
    node_id: String,
    /// The publishing connection while the bus is up, with the generation
    /// it belongs to.
    publisher: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// Bumped each time the connections are declared dead: a reply that
    /// arrives on an older generation is not trusted (the node's
    /// subscriptions may have been gone when Redis handled the publish).
    generation: AtomicU64,
    up: AtomicBool,
    /// A publish failed: the supervisor should check the connection now.
    suspect: Notify,
}

impl RedisBus {
    fn channel(&self, topic: &Topic) -> String {
        topic.channel(&self.config.channel_prefix)
    }

    fn set_up(&self, metrics: &Metrics, publisher: Option<MultiplexedConnection>) {
        let up = publisher.is_some();
        let generation = match up {
            true => self.generation.load(Ordering::Acquire),
            false => self.generation.fetch_add(1, Ordering::AcqRel) + 1,
        };
        *self.publisher.write() = publisher.map(|p| (generation, p));
        self.up.store(up, Ordering::Release);
        metrics.bus_up.set(if up { 1.0 } else { 0.0 });
    }

    /// The publishing connection, or why there is none.
    fn connection(&self) -> Result<(u64, MultiplexedConnection), BusError> {
        self.publisher
            .read()
            .clone()
            .ok_or_else(|| BusError::Unavailable("redis is not connected".into()))
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
    /// Every PUBLISH of the batch in one pipeline: one write, one round trip.
    fn publish_batch<'a>(
        &'a self,
        items: &'a [(Topic, Bytes)],
    ) -> BoxFuture<'a, Vec<PublishResult>> {
        async move {
            // The same failure for every item.
            let all_of = |err: BusError| -> Vec<PublishResult> {
                items.iter().map(|_| Err(err.clone())).collect()
            };
            let (generation, mut conn) = match self.connection() {
                Ok(c) => c,
                Err(e) => return all_of(e),
            };
            let mut pipe = redis::pipe();
            for (topic, envelope) in items {
                pipe.cmd("PUBLISH")
                    .arg(self.channel(topic))
                    .arg(&envelope[..]);
            }
            // One receiver count per PUBLISH.
            match timeout(self.config.timeout, pipe.query_async::<Vec<i64>>(&mut conn)).await {
                Ok(Ok(receivers)) if self.generation.load(Ordering::Acquire) == generation => {
                    receivers.iter().map(|_| Ok(Published::default())).collect()
                }
                Ok(Ok(receivers)) => {
                    // Answered on a connection declared dead meanwhile: Redis
                    // may have handled it while this node's subscriptions were
                    // gone. Only "nobody received it" is certain.
                    receivers
                        .iter()
                        .map(|&n| {
                            Err(match n {
                                0 => BusError::Unavailable(
                                    "redis connection was lost; nobody received the message".into(),
                                ),
                                _ => BusError::Unconfirmed(
                                    "redis connection was lost; some nodes may not have received the message".into(),
                                ),
                            })
                        })
                        .collect()
                }
                Ok(Err(e)) => all_of(self.failed("publish", Some(e))),
                Err(_) => all_of(self.failed("publish", None)),
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
            let (_, mut conn) = self.connection()?;
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
            let (_, mut conn) = self.connection()?;
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
    };
    tracker.spawn(supervisor.run());
    bus
}

struct Supervisor {
    bus: Arc<RedisBus>,
    sink: Arc<dyn Deliver>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Topics that should be subscribed: the node's, in command order.
    desired: HashSet<Topic>,
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
                self.desired.remove(&topic);
            }
            SubCmd::Sync(done) => {
                let _ = done.send(false);
            }
        }
    }

    async fn connect(
        &mut self,
    ) -> Result<(PubSubSink, PubSubStream, MultiplexedConnection), String> {
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
        let publisher = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await
            .map_err(|e| e.to_string())?;
        Ok((sink, stream, publisher))
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
        publisher: MultiplexedConnection,
    ) -> Ended {
        let cfg = self.bus.config.clone();
        let prefix = cfg.channel_prefix.clone();
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
        // Kept for PINGs and canaries; handed to publishers once up.
        let conn = publisher.clone();
        let mut publisher = Some(publisher);
        if canaries {
            canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
        } else {
            self.bus.set_up(&self.metrics, publisher.take());
        }
        let far = Instant::now() + Duration::from_secs(3600);
        loop {
            let deadline = canary.map_or(far, |(_, d)| d);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ended::Shutdown,
                _ = tokio::time::sleep_until(deadline), if canary.is_some() => {
                    self.metrics.bus_canary_failures.inc();
                    return Ended::Failed("the canary did not come back through redis in time".into());
                }
                _ = canary_tick.tick(), if canaries && canary.is_none() => {
                    canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
                }
                msg = stream.next() => {
                    let Some(first) = msg else {
                        return Ended::Failed("subscriber connection closed".into());
                    };
                    // Take whatever else has already arrived and deliver it as one batch.
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
                    if let Some((seq, _)) = canary {
                        let back = batch.iter().any(|m| {
                            m.get_channel_name() == self.canary_channel
                                && m.get_payload_bytes() == seq.to_string().as_bytes()
                        });
                        if back {
                            canary = None;
                            if let Some(p) = publisher.take() {
                                self.bus.set_up(&self.metrics, Some(p));
                            }
                        }
                    }
                    let items: Vec<(&str, &[u8])> = batch
                        .iter()
                        .filter_map(|m| Some((m.get_channel_name().strip_prefix(&prefix)?, m.get_payload_bytes())))
                        .collect();
                    self.sink.deliver_batch(&items);
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
                        return Ended::Failed(reason);
                    }
                }
                _ = ping.tick() => {
                    if let Err(reason) = self.check(&mut sink, &conn, cfg.timeout).await {
                        return Ended::Failed(reason);
                    }
                }
                _ = self.bus.suspect.notified() => {
                    if let Err(reason) = self.check(&mut sink, &conn, cfg.timeout).await {
                        return Ended::Failed(reason);
                    }
                }
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
            };
            let mut topics = vec![first];
            while let Some(next) = cmds.next_if(|c| match c {
                SubCmd::Subscribe(_) => subscribe,
                SubCmd::Unsubscribe(_) => !subscribe,
                SubCmd::Sync(_) => false,
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

    /// PING both connections; a dead link is not trusted forever.
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
        match timeout(
            limit,
            redis::cmd("PING").query_async::<String>(&mut publisher),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("publisher ping failed: {e}")),
            Err(_) => Err("publisher ping timed out".into()),
        }
    }
}
