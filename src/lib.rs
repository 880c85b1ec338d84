//! roomcast: a horizontally scalable WebSocket broadcast gateway for
//! live-streaming rooms.
//!
//! Each node holds its own WebSocket clients, publishes what they send to the
//! bus (Redis pub/sub, or in-process for a single node), subscribes only to
//! the rooms its clients are in, and fans each message out to its local
//! clients, encoded once.
//!
//! The map of the crate, from the edge inwards:
//! - [`listener`]: accept loops and what a connection may cost before it is
//!   a WebSocket (timeouts, the pending cap, the open-file budget).
//! - [`server`]: HTTP routes (`/ws`, `/metrics`, `/healthz`, `/readyz`,
//!   `/api/publish`) on the public and internal listeners, the WebSocket
//!   upgrade, graceful shutdown.
//! - [`conn`]: one connection: read loop, JSON and raw protocols, heartbeats.
//! - [`peer`]: a client as the node sees it: the direct, non-blocking write
//!   path and the bounded per-client queue.
//! - [`ws`]: WebSocket framing: client frames in, pre-built server frames out.
//! - [`protocol`]: wire frames and the bus envelope (no I/O).
//! - [`hub`]: local rooms, subscription changes, fan-out; [`members`]: one
//!   room's member list.
//! - [`bus`]: trait [`bus::Bus`] with the `memory` and `redis` backends.
//! - [`gateway`]: the state one node shares between all of the above, and
//!   the publisher task that sends client messages to the bus in batches.
//! - [`config`], [`metrics`]: settings and Prometheus metrics.

pub mod bus;
pub mod config;
pub mod conn;
pub mod gateway;
pub mod hub;
pub mod limit;
pub mod listener;
pub mod members;
pub mod metrics;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod ws;

pub use config::Config;
pub use server::run;
