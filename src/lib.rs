//! roomcast: a horizontally scalable WebSocket broadcast gateway for
//! live-streaming rooms.
//!
//! Each node holds its own WebSocket clients, publishes what they send to the
//! bus (Redis pub/sub, or in-process for a single node), subscribes only to
//! the rooms its clients are in, and fans each message out to its local
//! clients, encoded once.
//!
//! The map of the crate, from the edge inwards:
//! - `listener`: accept loops and what a connection may cost before it is
//!   a WebSocket (timeouts, the pending cap, the open-file budget).
//! - [`server`]: HTTP routes (`/ws`, `/metrics`, `/healthz`, `/readyz`,
//!   `/api/*` with its handlers in `api`) on the public and internal
//!   listeners, the WebSocket upgrade (origin, connection rate, per-address
//!   cap, token), API keys, graceful shutdown. `auth`: JWT verification and
//!   what a token allows.
//! - `conn`: one connection as a socket: the task that pumps bytes, reads
//!   frames and runs the close handshake.
//! - `session`: one connection as a client: its rooms, limits and
//!   identity, and one file per operation (`join`, `leave`, `send` to rooms
//!   and users, `refresh`, `ping`, `raw`). Acts on the node through a
//!   `Link`, so it is tested without a socket. [`namespace`]: the rules by
//!   room prefix it applies; `aggregate`: likes summed per window.
//! - `heartbeat`: the node-wide task that pings clients and closes silent
//!   ones; `expiry`: the one that closes connections whose token expired.
//! - `peer`: a client as the fan-out sees it: the direct, non-blocking
//!   write path and the bounded per-client queue.
//! - [`ws`]: WebSocket framing: client frames in, pre-built server frames out.
//! - [`protocol`]: wire frames, validation and the bus envelope (no I/O);
//!   [`error`]: every refusal's code, HTTP status and message.
//! - [`topic`]: a room or a user, and the bus channel it is.
//! - `hub`: local topics (rooms and users), subscription changes, fan-out,
//!   and the seam of a history room's held join (replay, then live, without
//!   gap or duplicate); `members`: one topic's member list. A user's
//!   connections are the members of the user's topic.
//! - `presence`: cluster-wide online counts: the node-wide task that reports
//!   the hub's per-room counts and watch time through the bus, reads the
//!   other nodes', and sends `presence` frames to local rooms (throttled).
//! - `bus`: trait `Bus` with the `memory` and `redis` backends; it
//!   delivers to a `Deliver` (the hub). History (seq and epoch, stored with
//!   the publish; reads for replay) is the bus's: `redis/history.rs` holds
//!   the keys and scripts, `redis/repair.rs` what a node received of each
//!   history room, to repair what it missed.
//! - `gateway`: the state one node shares between all of the above, and
//!   the publisher task that sends client messages to the bus in batches.
//! - [`config`], `metrics`, `limit`: settings, Prometheus metrics,
//!   token buckets.
//!
//! Public, for the binary, the benchmark tool, tests and fuzz targets:
//! [`config`] (with [`namespace`]), [`server`], [`protocol`], [`error`],
//! [`topic`], [`ws`];
//! everything else is internal to the crate.

pub(crate) mod aggregate;
pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod bus;
pub mod config;
pub(crate) mod conn;
pub mod error;
pub(crate) mod expiry;
pub(crate) mod fanout;
pub(crate) mod gateway;
pub(crate) mod heartbeat;
pub(crate) mod hub;
pub(crate) mod limit;
pub(crate) mod listener;
pub(crate) mod members;
pub(crate) mod metrics;
pub mod namespace;
pub(crate) mod peer;
pub(crate) mod presence;
pub mod protocol;
pub mod server;
pub(crate) mod session;
pub mod topic;
pub(crate) mod web;
pub mod ws;

pub use config::Config;
pub use server::run;
