//! The subscriber connection of one shard: SUBSCRIBE on a single Redis,
//! SSUBSCRIBE (sharded pub/sub) on a Redis Cluster primary.
//!
//! redis-rs's `aio::PubSub` speaks RESP2 and has no SSUBSCRIBE, so the
//! sharded kind is a RESP3 multiplexed connection whose pushes (`smessage`,
//! `sunsubscribe`) arrive on a channel of ours. Each SSUBSCRIBE and
//! SUNSUBSCRIBE names one channel (many of them go in one pipeline): its
//! single confirmation is its reply, so a MOVED answers exactly the
//! channel it concerns.
//!
//! A `sunsubscribe` we did not ask for means the slot moved to another
//! shard ([`Event::Moved`]). redis-rs takes such a push for the reply of
//! whatever request is in flight on the connection, so after one the
//! session replaces the connection rather than trust its replies.

use std::collections::HashSet;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, Msg, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// What a subscriber connection yields.
pub enum Event {
    Msg(Msg),
    /// Redis dropped this shard channel: its slot moved to another shard.
    Moved(String),
}

pub enum Subscriber {
    Plain {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    Sharded {
        conn: MultiplexedConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        /// Channels we asked to leave whose confirmation has not come yet.
        leaving: HashSet<Vec<u8>>,
    },
}

fn elapsed<T>(
    r: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    what: &str,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what} failed: {e}")),
        Err(_) => Err(format!("{what} timed out")),
    }
}

impl Subscriber {
    pub async fn connect(
        client: &redis::Client,
        sharded: bool,
        limit: Duration,
    ) -> Result<Self, String> {
        if !sharded {
            let pubsub = elapsed(
                timeout(limit, client.get_async_pubsub()).await,
                "connecting",
            )?;
            let (sink, stream) = pubsub.split();
            return Ok(Subscriber::Plain { sink, stream });
        }
        let info = client.get_connection_info().clone();
        let redis_info = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client =
            redis::Client::open(info.set_redis_settings(redis_info)).map_err(|e| e.to_string())?;
        let (tx, pushes) = mpsc::unbounded_channel();
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(limit))
            .set_response_timeout(Some(limit))
            .set_push_sender(tx);
        let conn = elapsed(
            timeout(
                limit,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await,
            "connecting",
        )?;
        Ok(Subscriber::Sharded {
            conn,
            pushes,
            leaving: HashSet::new(),
        })
    }

    /// Subscribe to `channels`; answers those Redis redirected elsewhere
    /// (MOVED: their slot is not on this shard).
    pub async fn subscribe(
        &mut self,
        channels: &[String],
        limit: Duration,
    ) -> Result<Vec<String>, String> {
        match self {
            Subscriber::Plain { sink, .. } => {
                elapsed(timeout(limit, sink.subscribe(channels)).await, "subscribe")?;
                Ok(Vec::new())
            }
            Subscriber::Sharded { conn, .. } => {
                let replies = one_each(conn, "SSUBSCRIBE", channels, limit).await?;
                let mut moved = Vec::new();
                for (channel, reply) in channels.iter().zip(replies) {
                    match reply {
                        Err(e) if e.redirect_node().is_some() => moved.push(channel.clone()),
                        Err(e) => return Err(format!("ssubscribe failed: {e}")),
                        Ok(reply) => confirms(&reply, PushKind::SSubscribe, channel)?,
                    }
                }
                Ok(moved)
            }
        }
    }

    pub async fn unsubscribe(
        &mut self,
        channels: &[String],
        limit: Duration,
    ) -> Result<(), String> {
        match self {
            Subscriber::Plain { sink, .. } => elapsed(
                timeout(limit, sink.unsubscribe(channels)).await,
                "unsubscribe",
            ),
            Subscriber::Sharded { conn, leaving, .. } => {
                leaving.extend(channels.iter().map(|c| c.as_bytes().to_vec()));
                let replies = one_each(conn, "SUNSUBSCRIBE", channels, limit).await?;
                for (channel, reply) in channels.iter().zip(replies) {
                    match reply {
                        // Its slot moved: not subscribed here any more.
                        Err(e) if e.redirect_node().is_some() => {
                            leaving.remove(channel.as_bytes());
                        }
                        Err(e) => return Err(format!("sunsubscribe failed: {e}")),
                        Ok(reply) => confirms(&reply, PushKind::SUnsubscribe, channel)?,
                    }
                }
                Ok(())
            }
        }
    }

    pub async fn ping(&mut self, limit: Duration) -> Result<(), String> {
        match self {
            Subscriber::Plain { sink, .. } => elapsed(
                timeout(limit, sink.ping::<Value>()).await,
                "subscriber ping",
            )
            .map(drop),
            Subscriber::Sharded { conn, .. } => {
                let reply = elapsed(
                    timeout(limit, redis::cmd("PING").query_async::<Value>(conn)).await,
                    "subscriber ping",
                )?;
                match reply {
                    Value::SimpleString(s) if s == "PONG" => Ok(()),
                    other => Err(format!(
                        "subscriber replies out of step (PING got {other:?})"
                    )),
                }
            }
        }
    }

    /// The next message (or move); `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Event> {
        match self {
            Subscriber::Plain { stream, .. } => stream.next().await.map(Event::Msg),
            Subscriber::Sharded {
                pushes, leaving, ..
            } => loop {
                if let Some(event) = Self::push(pushes.recv().await?, leaving)? {
                    return Some(event);
                }
            },
        }
    }

    /// What has arrived already: `None` if nothing, `Some(None)` if the
    /// connection closed.
    pub fn try_next(&mut self) -> Option<Option<Event>> {
        match self {
            Subscriber::Plain { stream, .. } => {
                stream.next().now_or_never().map(|m| m.map(Event::Msg))
            }
            Subscriber::Sharded {
                pushes, leaving, ..
            } => loop {
                let info = match pushes.try_recv() {
                    Ok(info) => info,
                    Err(mpsc::error::TryRecvError::Empty) => return None,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Some(None),
                };
                match Self::push(info, leaving) {
                    None => return Some(None),
                    Some(Some(event)) => return Some(Some(event)),
                    Some(None) => continue,
                }
            },
        }
    }

    /// What one push means: an event, nothing (a confirmation), or the end
    /// of the connection (`None`).
    fn push(info: PushInfo, leaving: &mut HashSet<Vec<u8>>) -> Option<Option<Event>> {
        match info.kind {
            PushKind::Disconnection => None,
            PushKind::SMessage | PushKind::Message => {
                Some(Msg::from_push_info(info).map(Event::Msg))
            }
            PushKind::SUnsubscribe => {
                let Some(Value::BulkString(channel)) = info.data.first() else {
                    return Some(None);
                };
                match leaving.remove(channel) {
                    true => Some(None),
                    false => Some(Some(Event::Moved(
                        String::from_utf8_lossy(channel).into_owned(),
                    ))),
                }
            }
            _ => Some(None),
        }
    }
}

/// A reply must be the confirmation of this very command: anything else
/// means a pushed `sunsubscribe` was taken for a reply, and the replies on
/// this connection are out of step.
fn confirms(reply: &Value, kind: PushKind, channel: &str) -> Result<(), String> {
    match reply {
        Value::Push { kind: k, data } if *k == kind => match data.first() {
            Some(Value::BulkString(c)) if c == channel.as_bytes() => Ok(()),
            _ => Err(format!("subscriber replies out of step ({kind} {channel})")),
        },
        _ => Err(format!("subscriber replies out of step ({kind} {channel})")),
    }
}

/// `command channel` for each channel, in one pipeline: a reply each.
async fn one_each(
    conn: &mut MultiplexedConnection,
    command: &str,
    channels: &[String],
    limit: Duration,
) -> Result<Vec<redis::RedisResult<Value>>, String> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for channel in channels {
        pipe.cmd(command).arg(channel);
    }
    elapsed(
        timeout(
            limit,
            pipe.query_async::<Vec<redis::RedisResult<Value>>>(conn),
        )
        .await,
        &command.to_lowercase(),
    )
}
