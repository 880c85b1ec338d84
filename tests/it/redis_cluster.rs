//! `bus.kind = "redis-cluster"` on a real Redis Cluster: three primaries
//! and three replicas, six `redis-server --cluster-enabled yes` processes on
//! loopback, created with `redis-cli --cluster create`. Rooms spread over the
//! shards (sharded pub/sub: each room's channel lives only on its shard, and
//! only while a node has clients in it), messages reach exactly their
//! clients, and rooms keep flowing through a primary's failover and a slot
//! migration without any client reconnecting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::history::HISTORY_TOML;
use crate::presence::busiest;
use crate::recovery::through;
use crate::util::*;

/// A Redis Cluster of 3 primaries with a replica each, removed on drop.
pub struct RedisCluster {
    nodes: Vec<Redis>,
    /// Each node's arguments (its cluster bus port and state file), to restart it.
    args: Vec<Vec<String>>,
    dir: PathBuf,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "roomcast-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut nodes = Vec::new();
        let mut args = Vec::new();
        for _ in 0..6 {
            let bus = free_port();
            let these: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                &format!("{}/nodes-{bus}.conf", dir.display()),
                // Fail over within about a second of a primary's death.
                "--cluster-node-timeout",
                "1000",
                "--dir",
                dir.to_str().expect("utf-8 dir"),
            ]
            .map(String::from)
            .to_vec();
            nodes.push(Redis::start_on_with(free_port(), &these).await);
            args.push(these);
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = tokio::task::spawn_blocking(move || create.output())
            .await
            .expect("join")
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-cli ({e}): install it with `apt-get install -y redis-tools`"
                )
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes, args, dir };
        cluster.settled().await;
        cluster
    }

    /// Until every live node sees the whole cluster healthy and every
    /// primary has an online replica.
    async fn settled(&self) {
        eventually(
            "the cluster to be ok on every node, replicas in sync",
            || async {
                for n in &self.nodes {
                    let Ok(info) = n.try_cmd::<String>(&["CLUSTER", "INFO"]).await else {
                        continue;
                    };
                    if !info.contains("cluster_state:ok") {
                        return false;
                    }
                }
                for p in self.primaries().await {
                    let info: String = self.node(p).cmd(&["INFO", "replication"]).await;
                    if !info.contains("state=online") {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    /// The seed URLs a gateway node is given (two of the six).
    pub fn seeds(&self) -> String {
        format!("{},{}", self.nodes[0].url(), self.nodes[3].url())
    }

    pub fn node(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("a node of the cluster")
    }

    /// A node that still runs (the first of those not killed).
    async fn any(&self) -> &Redis {
        for n in &self.nodes {
            if n.ping().await {
                return n;
            }
        }
        panic!("no cluster node answers")
    }

    /// (first slot, last slot, primary's port), as CLUSTER SLOTS says.
    pub async fn slots(&self) -> Vec<(u16, u16, u16)> {
        let reply: Vec<redis::Value> = self.any().await.cmd(&["CLUSTER", "SLOTS"]).await;
        reply
            .into_iter()
            .map(|range| {
                let redis::Value::Array(f) = range else {
                    panic!("CLUSTER SLOTS: {range:?}")
                };
                let int = |v: &redis::Value| match v {
                    redis::Value::Int(n) => *n as u16,
                    other => panic!("CLUSTER SLOTS: {other:?}"),
                };
                let redis::Value::Array(primary) = &f[2] else {
                    panic!("CLUSTER SLOTS: {f:?}")
                };
                (int(&f[0]), int(&f[1]), int(&primary[1]))
            })
            .collect()
    }

    pub async fn primaries(&self) -> BTreeSet<u16> {
        self.slots().await.into_iter().map(|(_, _, p)| p).collect()
    }

    pub async fn slot(&self, key: &str) -> u16 {
        let slot: i64 = self.any().await.cmd(&["CLUSTER", "KEYSLOT", key]).await;
        slot as u16
    }

    /// The port of the primary serving room `room`'s channel.
    pub async fn owner(&self, room: &str) -> u16 {
        self.owner_of_slot(self.slot(&format!("roomcast:room:{room}")).await)
            .await
    }

    /// Room channels subscribed on the node at `port` (PUBSUB SHARDCHANNELS).
    pub async fn shard_channels(&self, port: u16) -> BTreeSet<String> {
        self.node(port)
            .cmd::<Vec<String>>(&["PUBSUB", "SHARDCHANNELS", "roomcast:room:*"])
            .await
            .into_iter()
            .collect()
    }

    /// Subscribers of room `room`'s channel on the node at `port`.
    pub async fn shard_numsub(&self, port: u16, room: &str) -> i64 {
        let channel = format!("roomcast:room:{room}");
        let reply: Vec<redis::Value> = self
            .node(port)
            .cmd(&["PUBSUB", "SHARDNUMSUB", &channel])
            .await;
        match reply.get(1) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("SHARDNUMSUB: {other:?}"),
        }
    }

    /// `n` room names `{prefix}{i}` on each primary, by its port.
    pub async fn rooms_per_shard(&self, prefix: &str, n: usize) -> BTreeMap<u16, Vec<String>> {
        let primaries = self.primaries().await;
        let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for i in 0.. {
            let room = format!("{prefix}{i}");
            let owner = self.owner(&room).await;
            let rooms = out.entry(owner).or_default();
            if rooms.len() < n {
                rooms.push(room);
            }
            if out.len() == primaries.len() && out.values().all(|r| r.len() == n) {
                return out;
            }
        }
        unreachable!()
    }

    /// SIGKILL the primary at `port`; answers the port of the replica that
    /// took over its slots once the killed node is back (restarted, as an
    /// operator would) as the new primary's replica, in sync.
    pub async fn kill_and_fail_over(&mut self, port: u16) -> u16 {
        let slots: Vec<u16> = self
            .slots()
            .await
            .into_iter()
            .filter(|(_, _, p)| *p == port)
            .map(|(a, _, _)| a)
            .collect();
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node")
            .kill();
        let first = slots[0];
        let promoted = std::sync::atomic::AtomicU16::new(0);
        eventually(
            "a replica to take over the killed primary's slots",
            || async {
                let now = self.slots().await;
                match now.iter().find(|(a, _, _)| *a == first) {
                    Some((_, _, p)) if *p != port => {
                        promoted.store(*p, std::sync::atomic::Ordering::Release);
                        true
                    }
                    _ => false,
                }
            },
        )
        .await;
        let i = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("node");
        self.nodes[i] = Redis::start_on_with(port, &self.args[i]).await;
        self.settled().await;
        promoted.into_inner()
    }

    /// Move `slot` from its primary to the primary at `to`, with its keys,
    /// the way `redis-cli --cluster reshard` does: IMPORTING/MIGRATING,
    /// MIGRATE the keys, then SETSLOT NODE on every primary.
    pub async fn migrate(&self, slot: u16, to: u16) {
        let from = self.owner_of_slot(slot).await;
        let id =
            |port: u16| async move { self.node(port).cmd::<String>(&["CLUSTER", "MYID"]).await };
        let (from_id, to_id) = (id(from).await, id(to).await);
        let s = slot.to_string();
        let _: () = self
            .node(to)
            .cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .await;
        let _: () = self
            .node(from)
            .cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .await;
        loop {
            let keys: Vec<String> = self
                .node(from)
                .cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .await;
            if keys.is_empty() {
                break;
            }
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let _: () = self.node(from).cmd(&args).await;
        }
        for p in [to, from] {
            let _: () = self
                .node(p)
                .cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                .await;
        }
        for p in self.primaries().await {
            if p != to && p != from {
                let _: () = self
                    .node(p)
                    .cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                    .await;
            }
        }
        eventually("the cluster to see the slot on its new primary", || async {
            self.owner_of_slot(slot).await == to
        })
        .await;
    }

    /// The port of the primary serving `slot`.
    async fn owner_of_slot(&self, slot: u16) -> u16 {
        self.slots()
            .await
            .into_iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, p)| p)
            .expect("owner")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `ROOMCAST__…` settings of a node on `cluster`: the seeds, this node
/// id, quick failure detection, and acks only for history messages a
/// replica holds too.
pub fn cluster_env(cluster: &RedisCluster, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ROOMCAST__BUS__KIND", "redis-cluster".into()),
        ("ROOMCAST__BUS__REDIS__URL", cluster.seeds()),
        ("ROOMCAST__BUS__REDIS__WAIT_REPLICAS", "1".into()),
        ("ROOMCAST__BUS__REDIS__PING_INTERVAL", "200ms".into()),
        ("ROOMCAST__BUS__REDIS__TIMEOUT", "500ms".into()),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MIN", "50ms".into()),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MAX", "300ms".into()),
        ("ROOMCAST__PRESENCE__REPORT_INTERVAL", "300ms".into()),
        ("ROOMCAST__NODE__ID", node.into()),
    ]
}

/// A node on `cluster` with the history namespaces of `history.rs`.
async fn cluster_node(cluster: &RedisCluster, id: &str) -> Node {
    let env = cluster_env(cluster, id);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Node::ready(file_config(HISTORY_TOML, &env)).await
}

/// The next `msg` frame's data and room, skipping presence and the like.
async fn next_msg(c: &mut Client) -> (String, serde_json::Value) {
    loop {
        let f = c.recv_any_json().await;
        if f["op"] == "msg" {
            return (
                f["room"].as_str().expect("room").to_owned(),
                f["data"].clone(),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_the_shards_and_each_message_reaches_exactly_its_clients_once() {
    let _alone = REDIS_FAULTS.lock().await;
    let cluster = RedisCluster::start().await;
    let nodes = [
        cluster_node(&cluster, "a").await,
        cluster_node(&cluster, "b").await,
        cluster_node(&cluster, "c").await,
    ];
    // Two rooms on each of the three shards; room j has a sender on node
    // j % 3 and a viewer (who never sends) on node (j + 1) % 3.
    let by_shard = cluster.rooms_per_shard("c", 2).await;
    assert_eq!(by_shard.len(), 3, "three shards: {by_shard:?}");
    let rooms: Vec<(u16, String)> = by_shard
        .iter()
        .flat_map(|(p, rs)| rs.iter().map(|r| (*p, r.clone())))
        .collect();
    let mut senders = Vec::new();
    let mut viewers = Vec::new();
    for (j, (_, room)) in rooms.iter().enumerate() {
        senders.push(Client::json(&nodes[j % 3], &[room]).await.0);
        viewers.push(Client::json(&nodes[(j + 1) % 3], &[room]).await.0);
    }
    // Each room's channel is on its own shard only, subscribed by the two
    // nodes with clients in it, and by no other node.
    for port in cluster.primaries().await {
        let expected: BTreeSet<String> = by_shard[&port]
            .iter()
            .map(|r| format!("roomcast:room:{r}"))
            .collect();
        assert_eq!(
            cluster.shard_channels(port).await,
            expected,
            "shard channels on primary {port}"
        );
        for room in &by_shard[&port] {
            assert_eq!(cluster.shard_numsub(port, room).await, 2, "{room}");
        }
    }
    // Three messages per room, then an end marker per room. A sender's own
    // messages may come before its ack: keep those.
    let mut own: Vec<Vec<(String, serde_json::Value)>> = vec![Vec::new(); rooms.len()];
    let mut send = async |j: usize, data: serde_json::Value, id: u64| {
        let (ack, early) = senders[j]
            .request(send_frame(&rooms[j].1, "danmaku", data), id)
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        own[j].extend(
            early
                .into_iter()
                .filter(|f| f["op"] == "msg")
                .map(|f| (f["room"].as_str().unwrap().to_owned(), f["data"].clone())),
        );
    };
    for j in 0..rooms.len() {
        for n in 1..=3 {
            send(j, json!({"n": n}), n).await;
        }
    }
    for j in 0..rooms.len() {
        send(j, json!({"end": true}), 9).await;
    }
    let expected = |room: &str| -> Vec<(String, serde_json::Value)> {
        [
            json!({"n": 1}),
            json!({"n": 2}),
            json!({"n": 3}),
            json!({"end": true}),
        ]
        .into_iter()
        .map(|d| (room.to_owned(), d))
        .collect()
    };
    for (j, (_, room)) in rooms.iter().enumerate() {
        let mut got = Vec::new();
        while got.last().map(|(_, d): &(String, serde_json::Value)| d)
            != Some(&json!({"end": true}))
        {
            got.push(next_msg(&mut viewers[j]).await);
        }
        assert_eq!(
            got,
            expected(room),
            "viewer of {room}: each message once, in order, nothing of another room"
        );
        let mut got = std::mem::take(&mut own[j]);
        while got.last().map(|(_, d)| d) != Some(&json!({"end": true})) {
            got.push(next_msg(&mut senders[j]).await);
        }
        assert_eq!(got, expected(room), "sender in {room}");
    }
    // Online counts add up across the nodes on the cluster too.
    for (_, room) in &rooms {
        eventually(&format!("{room} to count 2 online"), || async {
            let (status, body) = nodes[0].get(&format!("/api/rooms/{room}")).await;
            status == 200
                && serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["online"] == 2
        })
        .await;
    }
    // Presence is kept per room, in the room's slot: each shard holds the
    // online hashes of its own rooms only, each with the two nodes that
    // have clients there; the busiest list still adds up every shard.
    // (Each node writes its counts at its next report after the joins.)
    for (port, room) in &rooms {
        let key = format!("{{roomcast:room:{room}}}:online");
        eventually(&format!("both nodes' counts in {key}"), || async {
            cluster.node(*port).cmd::<i64>(&["HLEN", &key]).await == 2
        })
        .await;
    }
    for port in cluster.primaries().await {
        let mut keys: Vec<String> = cluster.node(port).cmd(&["KEYS", "*:online"]).await;
        keys.sort();
        let mut expected: Vec<String> = by_shard[&port]
            .iter()
            .map(|r| format!("{{roomcast:room:{r}}}:online"))
            .collect();
        expected.sort();
        assert_eq!(keys, expected, "online hashes on primary {port}");
    }
    let mut listed = busiest(&nodes[2], "prefix=c").await;
    listed.sort();
    let mut all: Vec<(String, u64)> = rooms.iter().map(|(_, r)| (r.clone(), 2)).collect();
    all.sort();
    assert_eq!(listed, all, "the busiest list across the shards");
    for node in &nodes {
        eventually("every node to see the three", || async {
            node.metric("roomcast_presence_nodes").await == 3.0
        })
        .await;
    }

    // A room is subscribed only while a node has clients in it.
    let (port, room) = rooms[0].clone();
    viewers.remove(0).close().await;
    eventually("the viewer's node to unsubscribe the room", || async {
        cluster.shard_numsub(port, &room).await == 1
    })
    .await;

    // A plain room whose slot moves to another shard keeps flowing: the
    // nodes follow the sunsubscribe push and subscribe on the new owner.
    let (port, room) = rooms[1].clone();
    let to = *cluster
        .primaries()
        .await
        .iter()
        .find(|p| **p != port)
        .expect("another primary");
    cluster
        .migrate(cluster.slot(&format!("roomcast:room:{room}")).await, to)
        .await;
    eventually(
        "both nodes to subscribe the room on its new shard",
        || async { cluster.shard_numsub(to, &room).await == 2 },
    )
    .await;
    assert_eq!(
        cluster.shard_numsub(port, &room).await,
        0,
        "gone from the old shard"
    );
    let after = json!({"after": "move"});
    let (ack, early) = senders[1]
        .request(send_frame(&room, "danmaku", after.clone()), 20)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(
        next_msg(&mut viewers[0]).await,
        (room.clone(), after.clone())
    );
    // The sender's own copy may have come before its ack.
    let own = match early.iter().find(|f| f["op"] == "msg") {
        Some(f) => (
            f["room"].as_str().expect("room").to_owned(),
            f["data"].clone(),
        ),
        None => next_msg(&mut senders[1]).await,
    };
    assert_eq!(own, (room.clone(), after));
    for node in &nodes {
        assert_eq!(node.metric("roomcast_bus_shards").await, 3.0);
        assert_eq!(node.metric("roomcast_bus_shards_up").await, 3.0);
        assert_eq!(
            node.metric("roomcast_connections_opened_total").await,
            4.0,
            "no client reconnected"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_fails_over_and_a_history_room_loses_no_acked_message() {
    const ROOM: &str = "h:failover";
    let _alone = REDIS_FAULTS.lock().await;
    let mut cluster = RedisCluster::start().await;
    let a = cluster_node(&cluster, "a").await;
    let b = cluster_node(&cluster, "b").await;
    let owner = cluster.owner(ROOM).await;
    through(&a, &b, ROOM, async || {
        let promoted = cluster.kill_and_fail_over(owner).await;
        assert_ne!(promoted, owner);
        eventually(
            "both nodes to subscribe the room on the new primary",
            || async { cluster.shard_numsub(promoted, ROOM).await == 2 },
        )
        .await;
    })
    .await;
    for node in [&a, &b] {
        assert!(node.metric("roomcast_bus_topology_changes_total").await >= 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_a_live_history_room_keeps_it_flowing_without_a_gap() {
    const ROOM: &str = "h:moving";
    let _alone = REDIS_FAULTS.lock().await;
    let cluster = RedisCluster::start().await;
    let a = cluster_node(&cluster, "a").await;
    let b = cluster_node(&cluster, "b").await;
    let from = cluster.owner(ROOM).await;
    let to = *cluster
        .primaries()
        .await
        .iter()
        .find(|p| **p != from)
        .expect("another primary");
    let slot = cluster.slot(&format!("roomcast:room:{ROOM}")).await;
    through(&a, &b, ROOM, async || {
        cluster.migrate(slot, to).await;
        eventually(
            "both nodes to subscribe the room on its new shard",
            || async { cluster.shard_numsub(to, ROOM).await == 2 },
        )
        .await;
        assert_eq!(
            cluster.shard_numsub(from, ROOM).await,
            0,
            "gone from the old shard"
        );
    })
    .await;
    for node in [&a, &b] {
        assert!(node.metric("roomcast_bus_rooms_moved_total").await >= 1.0);
    }
}
