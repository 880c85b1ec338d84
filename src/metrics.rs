//! Prometheus metrics, registered on a registry the caller passes in (no
//! globals, so several gateways can live in one test process).
//!
//! Hot-path counters are bumped once per message with the number of sockets
//! written, not once per socket.

use crate::error::ErrorCode;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// `client_errors_total` codes of connections failed for a protocol error
/// (besides the [`ErrorCode`]s of error frames).
pub const PROTOCOL_CLOSES: [&str; 3] = ["protocol_error", "invalid_utf8", "message_too_big"];

/// `messages_dropped_total` reasons.
pub const DROP_REASONS: [&str; 5] = [
    "unavailable",
    "unconfirmed",
    "rate_limited",
    "forbidden",
    "bad_frame",
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_opened: IntCounter,
    pub rooms: IntGauge,
    /// Distinct users (authenticated) with a connection on this node.
    pub users: IntGauge,
    pub auth_failures: IntCounterVec,
    pub token_expiries: IntCounter,
    pub rate_limited: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub aggregated_events: IntCounterVec,
    pub aggregated_lost: IntCounter,
    pub abuse_disconnects: IntCounter,
    pub messages_in: IntCounter,
    pub messages_dropped: IntCounterVec,
    pub bus_published: IntCounter,
    pub bus_received: IntCounter,
    pub bus_invalid: IntCounter,
    pub bus_up: Gauge,
    pub bus_reconnects: IntCounter,
    pub bus_canary_failures: IntCounter,
    pub bus_shards: IntGauge,
    pub bus_shards_up: IntGauge,
    pub bus_topology_changes: IntCounter,
    pub bus_rooms_moved: IntCounter,
    pub history_repaired: IntCounter,
    pub history_unrepaired: IntCounter,
    pub history_joins: IntCounterVec,
    pub deliveries: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub heartbeat_timeouts: IntCounter,
    pub client_errors: IntCounterVec,
    pub bus_publish_seconds: Histogram,
    pub connection_duration_seconds: Histogram,
    pub pending_connections: IntGauge,
    pub handshakes_aborted: IntCounterVec,
    pub accept_errors: IntCounter,
    pub presence_reports: IntCounter,
    pub presence_report_failures: IntCounter,
    pub presence_nodes: IntGauge,
    pub ready: IntGauge,
    pub fanout_workers: IntGauge,
    pub coalesce_flushes: IntCounter,
    pub coalesced_messages: IntCounter,
    pub messages_skipped: IntCounter,
}

impl Metrics {
    pub fn new(registry: Registry) -> Result<Self, prometheus::Error> {
        let int_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counter_vec =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let bus_up = Gauge::new(
            "roomcast_bus_up",
            "1 while the bus (Redis) is connected and subscribed, else 0",
        )?;
        registry.register(Box::new(bus_up.clone()))?;
        Ok(Metrics {
            connections: int_gauge(
                "roomcast_connections",
                "WebSocket clients connected to this node",
            )?,
            connections_opened: counter(
                "roomcast_connections_opened_total",
                "WebSocket connections accepted",
            )?,
            rooms: int_gauge(
                "roomcast_rooms",
                "Rooms with at least one client on this node",
            )?,
            users: int_gauge(
                "roomcast_users",
                "Distinct authenticated users with a connection on this node",
            )?,
            auth_failures: {
                let c = counter_vec(
                    "roomcast_auth_failures_total",
                    "Tokens refused (at the upgrade or in a refresh), by reason",
                    "reason",
                )?;
                for reason in crate::auth::AuthError::REASONS {
                    c.with_label_values(&[reason]);
                }
                c
            },
            api_requests: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "roomcast_api_requests_total",
                        "Requests to /api/*, by endpoint (publish, rooms, room, other) and HTTP status",
                    ),
                    &["endpoint", "status"],
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            rate_limited: counter_vec(
                "roomcast_rate_limited_total",
                "Requests refused by a rate limit, by event (an event with its own rate, else message, command, user or connection)",
                "event",
            )?,
            aggregated_events: counter_vec(
                "roomcast_aggregated_events_total",
                "Aggregated events (e.g. likes) counted into a window, by event",
                "event",
            )?,
            aggregated_lost: counter(
                "roomcast_aggregated_lost_total",
                "Aggregated events whose window the bus did not take",
            )?,
            abuse_disconnects: counter(
                "roomcast_abuse_disconnects_total",
                "Connections closed (4004) after limits.abuse_threshold refusals in a row",
            )?,
            token_expiries: counter(
                "roomcast_token_expiries_total",
                "Connections closed (4003) because their token expired without a refresh",
            )?,
            messages_in: counter(
                "roomcast_messages_in_total",
                "Messages accepted from clients and published",
            )?,
            messages_dropped: {
                let c = counter_vec(
                    "roomcast_messages_dropped_total",
                    "Raw-mode messages from clients that could not be published",
                    "reason",
                )?;
                for reason in DROP_REASONS {
                    c.with_label_values(&[reason]);
                }
                c
            },
            bus_published: counter(
                "roomcast_bus_published_total",
                "Messages published to the bus",
            )?,
            bus_received: counter(
                "roomcast_bus_received_total",
                "Messages received from the bus for local rooms",
            )?,
            bus_invalid: counter(
                "roomcast_bus_invalid_total",
                "Bus payloads dropped because they were not valid envelopes",
            )?,
            bus_up,
            bus_reconnects: counter(
                "roomcast_bus_reconnects_total",
                "Successful (re)connections of the bus",
            )?,
            bus_canary_failures: counter(
                "roomcast_bus_canary_failures_total",
                "Canaries that did not come back through the bus in time (each marks the bus down)",
            )?,
            bus_shards: int_gauge(
                "roomcast_bus_shards",
                "Redis shards (primaries) the bus uses: 1 on a single Redis",
            )?,
            bus_shards_up: int_gauge(
                "roomcast_bus_shards_up",
                "Redis shards whose connections are up and subscribed",
            )?,
            bus_topology_changes: counter(
                "roomcast_bus_topology_changes_total",
                "Changes of the Redis Cluster's slot map this node followed",
            )?,
            bus_rooms_moved: counter(
                "roomcast_bus_rooms_moved_total",
                "Room subscriptions Redis moved to another shard (slot migration, failover)",
            )?,
            history_repaired: counter(
                "roomcast_history_repaired_total",
                "Messages of history rooms this node missed on the bus and delivered from history",
            )?,
            history_unrepaired: counter(
                "roomcast_history_unrepaired_total",
                "Messages of history rooms this node missed on the bus and could not repair (no longer in history)",
            )?,
            history_joins: {
                let c = counter_vec(
                    "roomcast_history_joins_total",
                    "Joins of history rooms, by outcome: recovered, not_recovered (a since that could not be served), history, live",
                    "outcome",
                )?;
                for outcome in ["recovered", "not_recovered", "history", "live"] {
                    c.with_label_values(&[outcome]);
                }
                c
            },
            deliveries: counter(
                "roomcast_deliveries_total",
                "Messages written to clients (one per recipient)",
            )?,
            slow_consumer_disconnects: counter(
                "roomcast_slow_consumer_disconnects_total",
                "Clients closed (4001) because their outbound queue overflowed",
            )?,
            heartbeat_timeouts: counter(
                "roomcast_heartbeat_timeouts_total",
                "Clients closed (4002) because they were silent past heartbeat.timeout",
            )?,
            client_errors: {
                let c = counter_vec(
                    "roomcast_client_errors_total",
                    "Errors reported to clients, by code (error frames and protocol closes)",
                    "code",
                )?;
                let codes = ErrorCode::CLIENT_ERRORS.iter().map(|c| c.as_str());
                for code in codes.chain(PROTOCOL_CLOSES) {
                    c.with_label_values(&[code]);
                }
                c
            },
            bus_publish_seconds: histogram(
                "roomcast_bus_publish_seconds",
                "Time for the bus to take one publish: a batch of client messages (one Redis pipeline) or one HTTP publish",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ],
            )?,
            connection_duration_seconds: histogram(
                "roomcast_connection_duration_seconds",
                "How long WebSocket connections lasted (watch time)",
                vec![
                    1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                ],
            )?,
            pending_connections: int_gauge(
                "roomcast_pending_connections",
                "HTTP connections not (yet) upgraded to WebSocket",
            )?,
            handshakes_aborted: {
                let c = counter_vec(
                    "roomcast_handshakes_aborted_total",
                    "HTTP connections closed before their handshake finished: header_timeout, handshake_timeout, evicted (pending cap)",
                    "reason",
                )?;
                for reason in ["header_timeout", "handshake_timeout", "evicted"] {
                    c.with_label_values(&[reason]);
                }
                c
            },
            accept_errors: counter(
                "roomcast_accept_errors_total",
                "Failed accepts (usually the open-file limit); the listener backs off and retries",
            )?,
            presence_reports: counter(
                "roomcast_presence_reports_total",
                "Reports of this node's per-room counts stored by the bus",
            )?,
            presence_report_failures: counter(
                "roomcast_presence_report_failures_total",
                "Reports of this node's per-room counts the bus did not confirm (not counted while the bus is down)",
            )?,
            presence_nodes: int_gauge(
                "roomcast_presence_nodes",
                "Nodes in this node's last view of the cluster's online counts, this one included",
            )?,
            ready: int_gauge(
                "roomcast_ready",
                "1 while /readyz answers ready (bus up, not draining), else 0",
            )?,
            fanout_workers: int_gauge(
                "roomcast_fanout_workers",
                "Threads writing messages to clients (fanout.workers)",
            )?,
            coalesce_flushes: counter(
                "roomcast_coalesce_flushes_total",
                "Coalescing windows that ended (rooms of namespaces with `coalesce`): one write per viewer each",
            )?,
            coalesced_messages: counter(
                "roomcast_coalesced_messages_total",
                "Messages those windows held",
            )?,
            messages_skipped: counter(
                "roomcast_messages_skipped_total",
                "Droppable messages (a namespace's `droppable` events) dropped for lagging viewers, who were told how many",
            )?,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding in-memory metric families into a Vec does not fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
