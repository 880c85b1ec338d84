//! One shard's connections, kept alive by one task: a subscriber connection
//! (SUBSCRIBE, or SSUBSCRIBE on a cluster, only to rooms with local clients
//! whose slot this shard serves) and a multiplexed publishing connection.
//!
//! The session applies the subscription commands the router hands it, in
//! order, delivers what arrives ([`Deliver`]), PINGs the subscriber to catch
//! a dead link, sends canaries, and on any failure marks its shard down,
//! reconnects with capped, jittered backoff and subscribes again to every
//! room it still has. After every (re)connect, and for rooms it adopts from
//! another shard, it reads the history rooms' history after what was last
//! delivered before the new stream (`repair.rs`). A room whose slot is not
//! (or no longer) on this shard goes back to the router ([`Note::Lost`]).
//!
//! PINGs prove that Redis answers, not that it delivers. So every
//! `canary_interval` the session publishes a canary on a channel of its own
//! in one of its shard's slots and expects it back within `timeout`; a
//! lost canary counts `roomcast_bus_canary_failures_total` and is handled
//! like a dead link. After a (re)connect the shard is declared up only once
//! a first canary has come back.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::history::{self, Scripts};
use super::repair::{Fate, Seen};
use super::router::{Note, ShardCmd};
use super::subscriber::{Event, Subscriber};
use super::{RedisBus, Shard};
use crate::bus::{Deliver, Page, Pick, SubCmd, MAX_BATCH};
use crate::metrics::Metrics;
use crate::protocol::epoch_key;
use crate::topic::Topic;

/// Rooms per subscription command batch (and per history read pipeline).
pub const RESUBSCRIBE_BATCH: usize = 512;

/// How long a failed session still takes what its subscriber connection
/// yields (it ends at once when Redis closed it).
const DRAIN: Duration = Duration::from_millis(200);

/// A publishing connection and its loaded scripts.
type Conn = (MultiplexedConnection, Arc<Scripts>);

pub struct Session {
    pub bus: Arc<RedisBus>,
    pub shard: Arc<Shard>,
    pub client: redis::Client,
    pub sink: Arc<dyn Deliver>,
    pub cmds: mpsc::UnboundedReceiver<ShardCmd>,
    pub notes: mpsc::UnboundedSender<Note>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Topics that should be subscribed on this shard, in command order.
    pub desired: HashSet<Topic>,
    /// What was received of each subscribed history room (shared by the
    /// shards: a room that moves keeps its place).
    pub seen: Arc<Mutex<Seen>>,
    /// This node's private channel for canaries, in one of this shard's slots.
    pub canary_channel: String,
    /// The last canary sent (its payload).
    pub canary_seq: u64,
}

/// Why a connected session ended.
enum Ended {
    Shutdown,
    Failed(String),
}

impl Session {
    fn sharded(&self) -> bool {
        self.bus.config.cluster
    }

    pub async fn run(mut self) {
        let cfg = self.bus.config.clone();
        let mut backoff = cfg.backoff_min;
        loop {
            let shutdown = self.shutdown.clone();
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = self.connect() => c,
            };
            match connected {
                Ok((subscriber, publisher)) => {
                    backoff = cfg.backoff_min;
                    self.metrics.bus_reconnects.inc();
                    tracing::info!(shard = %self.shard.name, topics = self.desired.len(), "redis bus connected");
                    let ended = self.serve(subscriber, publisher).await;
                    self.bus.set_up(&self.shard, None);
                    match ended {
                        Ended::Shutdown => return,
                        Ended::Failed(reason) => {
                            tracing::warn!(shard = %self.shard.name, %reason, "redis bus lost; reconnecting")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = %self.shard.name, error = %e, retry_ms = backoff.as_millis() as u64, "redis connect failed")
                }
            }
            // A failover or a reshard may be why: have the router look.
            let _ = self.notes.send(Note::Down);
            // Jittered wait in [backoff/2, backoff], still applying commands.
            let delay = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            backoff = (backoff * 2).min(cfg.backoff_max);
            let deadline = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    cmd = self.cmds.recv() => match cmd {
                        Some(cmd) => self.apply_offline(cmd),
                        None => return,
                    },
                }
            }
        }
    }

    /// Commands while disconnected only change the desired set (the
    /// subscriptions are made on reconnect); barriers answer "not in effect".
    fn apply_offline(&mut self, cmd: ShardCmd) {
        match cmd {
            ShardCmd::Sub(SubCmd::Subscribe(topic)) => {
                self.desired.insert(topic);
            }
            ShardCmd::Sub(SubCmd::Unsubscribe(topic)) => {
                self.desired.remove(&topic);
            }
            ShardCmd::Sub(SubCmd::Sync(done)) => {
                let _ = done.send(false);
            }
            ShardCmd::Sub(SubCmd::Position(..)) => {}
            ShardCmd::Adopt(topics) => self.desired.extend(topics),
            ShardCmd::Release(topics) => {
                for topic in &topics {
                    self.desired.remove(topic);
                }
            }
        }
    }

    /// Topics Redis says are not on this shard: back to the router.
    fn lose(&mut self, channels: Vec<String>) {
        if channels.is_empty() {
            return;
        }
        let prefix = &self.bus.config.channel_prefix;
        let topics: Vec<Topic> = channels
            .iter()
            .filter_map(|c| self.desired.take(c.strip_prefix(prefix.as_str())?))
            .collect();
        tracing::info!(shard = %self.shard.name, rooms = topics.len(), "rooms moved to another shard");
        if !topics.is_empty() {
            let _ = self.notes.send(Note::Lost(topics));
        }
    }

    async fn connect(&mut self) -> Result<(Subscriber, Conn), String> {
        self.canary_channel = self
            .bus
            .canary_channel(&self.shard)
            .ok_or("this shard serves no slot now")?;
        let cfg = self.bus.config.clone();
        let mut subscriber = Subscriber::connect(&self.client, self.sharded(), cfg.timeout).await?;
        let mut channels: Vec<String> = self.desired.iter().map(|t| self.bus.channel(t)).collect();
        channels.push(self.canary_channel.clone());
        let mut moved = Vec::new();
        for batch in channels.chunks(RESUBSCRIBE_BATCH) {
            moved.extend(subscriber.subscribe(batch, cfg.timeout).await?);
        }
        if moved.contains(&self.canary_channel) {
            return Err("the canary's slot is not on this shard any more".into());
        }
        self.lose(moved);
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout));
        let mut publisher = timeout(
            cfg.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&conn_config),
        )
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|e| e.to_string())?;
        let scripts = timeout(cfg.timeout, history::load(&mut publisher))
            .await
            .map_err(|_| "timed out loading scripts".to_string())?
            .map_err(|e| format!("loading scripts failed: {e}"))?;
        Ok((subscriber, (publisher, Arc::new(scripts))))
    }

    /// Publish the next canary (on a task of its own, so a stuck PUBLISH
    /// never stalls the subscriber) and return when it must be back.
    fn send_canary(&mut self, publisher: &MultiplexedConnection) -> Instant {
        self.canary_seq += 1;
        let mut conn = publisher.clone();
        let cmd = redis::cmd(if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        })
        .arg(&self.canary_channel)
        .arg(self.canary_seq)
        .to_owned();
        let limit = self.bus.config.timeout;
        tokio::spawn(async move {
            let _ = timeout(limit, cmd.query_async::<i64>(&mut conn)).await;
        });
        Instant::now() + limit
    }

    async fn serve(&mut self, mut sub: Subscriber, publisher: Conn) -> Ended {
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
        self.catch_up(&conn, &scripts, None).await;
        if canaries {
            canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
        } else {
            self.bus.set_up(&self.shard, publisher.take());
        }
        let far = Instant::now() + Duration::from_secs(3600);
        let ended = loop {
            let deadline = canary.map_or(far, |(_, d)| d);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break Ended::Shutdown,
                _ = tokio::time::sleep_until(deadline), if canary.is_some() => {
                    self.metrics.bus_canary_failures.inc();
                    break Ended::Failed("canary not received in time".into());
                }
                _ = canary_tick.tick(), if canaries && canary.is_none() => {
                    canary = Some((self.canary_seq + 1, self.send_canary(&conn)));
                }
                event = sub.next() => {
                    let Some(first) = event else {
                        break Ended::Failed("subscriber connection closed".into());
                    };
                    let waiting = canary.map(|(seq, _)| seq);
                    let (closed, back) = self.deliver(first, &mut sub, &conn, &scripts, waiting).await;
                    if back {
                        canary = None;
                        if let Some(p) = publisher.take() {
                            self.bus.set_up(&self.shard, Some(p));
                        }
                    }
                    if closed {
                        break Ended::Failed("subscriber connection closed".into());
                    }
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { break Ended::Shutdown };
                    // Take every change already queued: a join storm becomes a few
                    // subscription commands instead of one round trip per room.
                    let mut cmds = vec![cmd];
                    while cmds.len() < RESUBSCRIBE_BATCH {
                        match self.cmds.try_recv() {
                            Ok(next) => cmds.push(next),
                            Err(_) => break,
                        }
                    }
                    if let Err(reason) = self.apply(&mut sub, cmds, &conn, &scripts).await {
                        break Ended::Failed(reason);
                    }
                }
                _ = ping.tick() => {
                    if let Err(reason) = self.check(&mut sub, &conn, cfg.timeout).await {
                        break Ended::Failed(reason);
                    }
                }
                _ = self.shard.suspect.notified() => {
                    if let Err(reason) = self.check(&mut sub, &conn, cfg.timeout).await {
                        break Ended::Failed(reason);
                    }
                }
            }
        };
        // What Redis sent just before it failed may still be unread (a
        // publish failing first wakes the check above): deliver it.
        self.drain(&mut sub, &conn, &scripts).await;
        ended
    }

    /// Deliver `first` and whatever else has already arrived, as one batch
    /// (in order, repaired); answers whether the stream ended and whether
    /// the canary `waiting` for came back in it. Rooms Redis moved to
    /// another shard go back to the router.
    async fn deliver(
        &mut self,
        first: Event,
        sub: &mut Subscriber,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        waiting: Option<u64>,
    ) -> (bool, bool) {
        let mut batch = Vec::new();
        let mut moved = Vec::new();
        let mut closed = false;
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Event::Msg(m) => batch.push(m),
                Event::Moved(channel) => moved.push(channel),
            }
            if batch.len() >= MAX_BATCH {
                break;
            }
            match sub.try_next() {
                Some(Some(event)) => next = Some(event),
                Some(None) => closed = true,
                None => {}
            }
        }
        self.lose(moved);
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
        } else if !items.is_empty() {
            self.sink.deliver_batch(&items);
        }
        (closed, back)
    }

    /// The connections are being given up: deliver what the subscriber
    /// connection still yields, until it ends or [`DRAIN`] passes.
    async fn drain(
        &mut self,
        sub: &mut Subscriber,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
    ) {
        let until = Instant::now() + DRAIN;
        while let Ok(Some(first)) = tokio::time::timeout_at(until, sub.next()).await {
            if self.deliver(first, sub, conn, scripts, None).await.0 {
                return;
            }
        }
    }

    /// Apply subscription commands in order; consecutive subscribes (or
    /// unsubscribes) go to Redis as one round trip.
    async fn apply(
        &mut self,
        sub: &mut Subscriber,
        cmds: Vec<ShardCmd>,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
    ) -> Result<(), String> {
        let limit = self.bus.config.timeout;
        let mut cmds = cmds.into_iter().peekable();
        while let Some(cmd) = cmds.next() {
            let (subscribe, mut topics, adopted) = match cmd {
                ShardCmd::Sub(SubCmd::Subscribe(topic)) => (true, vec![topic], false),
                ShardCmd::Sub(SubCmd::Unsubscribe(topic)) => (false, vec![topic], false),
                ShardCmd::Adopt(topics) => (true, topics, true),
                ShardCmd::Release(topics) => (false, topics, false),
                ShardCmd::Sub(SubCmd::Sync(done)) => {
                    // Everything before the barrier has been applied.
                    let _ = done.send(true);
                    continue;
                }
                ShardCmd::Sub(SubCmd::Position(..)) => continue,
            };
            if !adopted {
                while let Some(next) = cmds.next_if(|c| match c {
                    ShardCmd::Sub(SubCmd::Subscribe(_)) => subscribe,
                    ShardCmd::Sub(SubCmd::Unsubscribe(_)) | ShardCmd::Release(_) => !subscribe,
                    _ => false,
                }) {
                    match next {
                        ShardCmd::Sub(SubCmd::Subscribe(t) | SubCmd::Unsubscribe(t)) => {
                            topics.push(t)
                        }
                        ShardCmd::Release(ts) => topics.extend(ts),
                        _ => {}
                    }
                }
            }
            for chunk in topics.chunks(RESUBSCRIBE_BATCH) {
                let channels: Vec<String> = chunk.iter().map(|t| self.bus.channel(t)).collect();
                if subscribe {
                    self.desired.extend(chunk.iter().cloned());
                    let moved = sub.subscribe(&channels, limit).await?;
                    self.lose(moved);
                } else {
                    for topic in chunk {
                        self.desired.remove(topic);
                    }
                    sub.unsubscribe(&channels, limit).await?;
                }
            }
            if adopted {
                // Published while the room was between shards: from history.
                let keys: HashSet<String> = topics
                    .iter()
                    .filter(|t| self.desired.contains(*t))
                    .map(|t| t.key().to_owned())
                    .collect();
                self.catch_up(conn, scripts, Some(&keys)).await;
            }
        }
        Ok(())
    }

    /// Read from history what was published in the tracked history rooms of
    /// this shard (or only in `only`) after what this node last delivered,
    /// and deliver it (one pipeline per chunk of rooms). A room whose
    /// history started over while the node was away (Redis lost it:
    /// another epoch) gets all of the new epoch; one without history yet is
    /// forgotten (its next message starts it again).
    async fn catch_up(
        &mut self,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        only: Option<&HashSet<String>>,
    ) {
        let tracked: Vec<(String, u64, u64)> = self
            .seen
            .lock()
            .rooms()
            .into_iter()
            .filter(|(k, ..)| match only {
                Some(keys) => keys.contains(k),
                None => self.desired.contains(k.as_str()),
            })
            .collect();
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
                self.seen.lock().forget(key);
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
        let mut seen = self.seen.lock();
        for entry in page.entries {
            let Some((seq, e)) = Seen::stamp(&entry) else {
                continue;
            };
            match seen.classify(key, seq, e) {
                Fate::Duplicate => continue,
                Fate::Gap { after } => self.metrics.history_unrepaired.inc_by(seq - after - 1),
                Fate::Pass => {}
            }
            out.push(entry);
        }
        drop(seen);
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
            let fate = self.seen.lock().classify(key, seq, epoch);
            match fate {
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
        sub: &mut Subscriber,
        publisher: &MultiplexedConnection,
        limit: Duration,
    ) -> Result<(), String> {
        sub.ping(limit).await?;
        let mut publisher = publisher.clone();
        match timeout(limit, history::load(&mut publisher)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("publisher check failed: {e}")),
            Err(_) => Err("publisher check timed out".into()),
        }
    }
}
