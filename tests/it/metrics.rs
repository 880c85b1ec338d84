//! `/metrics`, `/healthz`, `/readyz` as a load balancer and Prometheus see them.

use serde_json::json;

use crate::util::*;

/// Check every line of a Prometheus text exposition: comments are HELP/TYPE,
/// samples are `name{labels} value`.
fn assert_prometheus_text(body: &str) {
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest.starts_with("HELP ") || rest.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value: {line}"
        );
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
    }
}

#[tokio::test]
async fn metrics_count_connections_and_parse_as_prometheus_text() {
    let node = Node::ready(config(&[])).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(
            Client::json(&node, &[if i % 2 == 0 { "even" } else { "odd" }])
                .await
                .0,
        );
    }
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    assert_prometheus_text(&body);
    assert_eq!(metric_value(&body, "roomcast_connections"), Some(5.0));
    assert_eq!(
        metric_value(&body, "roomcast_connections_opened_total"),
        Some(5.0)
    );
    assert_eq!(metric_value(&body, "roomcast_rooms"), Some(2.0));
    assert_eq!(metric_value(&body, "roomcast_bus_up"), Some(1.0));
    for name in [
        "roomcast_messages_in_total",
        "roomcast_bus_published_total",
        "roomcast_bus_received_total",
        "roomcast_deliveries_total",
        "roomcast_slow_consumer_disconnects_total",
        "roomcast_bus_publish_seconds_count",
        "roomcast_connection_duration_seconds_count",
    ] {
        assert!(metric_value(&body, name).is_some(), "{name} missing");
    }

    // One message to "even" (3 clients): 1 in, 1 published, 3 deliveries.
    let (ack, _) = clients[0]
        .request(send_frame("even", "gift", json!(1)), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    for c in [0, 2, 4] {
        loop {
            if clients[c].recv_json().await["op"] == "msg" {
                break;
            }
        }
    }
    let body = node.get("/metrics").await.1;
    assert_eq!(metric_value(&body, "roomcast_messages_in_total"), Some(1.0));
    assert_eq!(
        metric_value(&body, "roomcast_bus_published_total"),
        Some(1.0)
    );
    assert_eq!(metric_value(&body, "roomcast_deliveries_total"), Some(3.0));

    // Watch time is observed when clients leave.
    for c in clients.drain(..) {
        c.close().await;
    }
    eventually("connections to drop to 0", || async {
        node.metric("roomcast_connections").await == 0.0
    })
    .await;
    assert_eq!(
        node.metric("roomcast_connection_duration_seconds_count")
            .await,
        5.0
    );
}

#[tokio::test]
async fn health_and_readiness_answer_json() {
    let node = Node::ready(config(&[])).await;
    assert_eq!(
        node.get("/healthz").await,
        (200, r#"{"status":"ok"}"#.to_string())
    );
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "bus_up": true, "draining": false})
    );
}

#[tokio::test]
async fn every_documented_label_value_is_exported_at_zero_before_its_first_event() {
    let node = Node::start(config(&[])).await;
    let (_, body) = node.get("/metrics").await;
    let series: Vec<String> = [
        "bad_frame",
        "unknown_op",
        "bad_room",
        "not_joined",
        "too_many_rooms",
        "rate_limited",
        "unavailable",
        "unconfirmed",
        "bad_request",
        "protocol_error",
        "invalid_utf8",
        "message_too_big",
    ]
    .iter()
    .map(|c| format!("roomcast_client_errors_total{{code=\"{c}\"}}"))
    .chain(
        ["unavailable", "unconfirmed", "rate_limited"]
            .iter()
            .map(|r| format!("roomcast_messages_dropped_total{{reason=\"{r}\"}}")),
    )
    .chain(
        ["header_timeout", "handshake_timeout", "evicted"]
            .iter()
            .map(|r| format!("roomcast_handshakes_aborted_total{{reason=\"{r}\"}}")),
    )
    .collect();
    for name in series {
        assert_eq!(
            metric_value(&body, &name),
            Some(0.0),
            "{name} missing or not 0 in:\n{body}"
        );
    }
    // And each is documented in README.md's metrics table.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for word in [
        "unconfirmed",
        "rate_limited",
        "header_timeout",
        "handshake_timeout",
        "evicted",
    ] {
        assert!(
            readme.contains(&format!("`{word}`")),
            "README does not document {word}"
        );
    }
}
