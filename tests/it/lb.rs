//! The shipped load-balancer config (deploy/nginx.conf) in front of two
//! nodes, with the real nginx: clients land on different nodes and still
//! share rooms; backends publish through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::util::*;

/// nginx running `deploy/nginx.conf` with its upstreams pointed at `nodes`
/// (each with an internal listener).
struct Nginx {
    child: Child,
    /// The public server (`listen 80` in the shipped file).
    port: u16,
    /// The internal server (`listen 8081`).
    internal_port: u16,
    dir: PathBuf,
}

fn nginx_binary() -> PathBuf {
    for candidate in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("nginx not found: these tests run the real load balancer; install it with `apt-get install -y nginx-light`")
}

/// The shipped file with this test's addresses and private paths; every
/// `server` line keeps its shipped parameters.
fn test_config(nodes: &[&Node], port: u16, internal_port: u16, dir: &Path) -> String {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
            .expect("read deploy/nginx.conf");
    let mut conf = format!(
        "pid {0}/nginx.pid;\nerror_log {0}/error.log;\n",
        dir.display()
    );
    for line in shipped.lines() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("server roomcast-") {
            // "server roomcast-N:PORT params;"
            let (target, params) = rest.split_once(' ').unwrap_or((rest, ";"));
            let (n, shipped_port) = target.split_once(':').expect("roomcast-N:PORT");
            let n: usize = n.parse().expect("server roomcast-N");
            if let Some(node) = nodes.get(n - 1) {
                let addr = match shipped_port {
                    "8080" => node.addr,
                    _ => node
                        .internal
                        .expect("nodes behind nginx need an internal listener"),
                };
                conf.push_str(&format!("        server {addr} {params}\n"));
            }
            continue;
        }
        match trimmed {
            "listen 80;" => conf.push_str(&format!("        listen 127.0.0.1:{port};\n")),
            "listen 8081;" => {
                conf.push_str(&format!("        listen 127.0.0.1:{internal_port};\n"))
            }
            t if t.starts_with("worker_connections") => {
                conf.push_str("    worker_connections 1024;\n")
            }
            t if t.starts_with("worker_processes") => conf.push_str("worker_processes 1;\n"),
            _ => {
                conf.push_str(line);
                conf.push('\n');
                if trimmed == "http {" {
                    for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                        conf.push_str(&format!("    {temp}_temp_path {}/{temp};\n", dir.display()));
                    }
                    conf.push_str("    access_log off;\n");
                }
            }
        }
    }
    conf
}

impl Nginx {
    async fn start(nodes: &[&Node]) -> Nginx {
        // A port taken between our check and nginx's bind makes nginx exit:
        // then start again on other ports.
        for _ in 0..5 {
            let (port, internal_port) = (free_port(), free_port());
            let dir =
                std::env::temp_dir().join(format!("roomcast-nginx-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("nginx dir");
            let conf_path = dir.join("nginx.conf");
            std::fs::write(&conf_path, test_config(nodes, port, internal_port, &dir))
                .expect("write nginx.conf");
            let check = Command::new(nginx_binary())
                .args(["-t", "-p"])
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path)
                .output()
                .expect("run nginx -t");
            assert!(
                check.status.success(),
                "deploy/nginx.conf does not pass nginx -t: {}",
                String::from_utf8_lossy(&check.stderr)
            );
            let child = Command::new(nginx_binary())
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&conf_path)
                .args(["-g", "daemon off; user root;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            let mut nginx = Nginx {
                child,
                port,
                internal_port,
                dir,
            };
            let up = within("nginx to listen (or exit)", async {
                loop {
                    let connect = |p: u16| tokio::net::TcpStream::connect(("127.0.0.1", p));
                    if connect(port).await.is_ok() && connect(internal_port).await.is_ok() {
                        return true;
                    }
                    if nginx.child.try_wait().expect("try_wait").is_some() {
                        return false;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
            .await;
            if up {
                return nginx;
            }
            drop(nginx);
        }
        panic!("nginx did not start listening in 5 attempts")
    }

    fn public(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().expect("addr")
    }

    fn internal(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.internal_port)
            .parse()
            .expect("addr")
    }

    fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.public())
    }
}

/// Connect through nginx and read the welcome: the node the client landed on.
/// Any refusal (a 503 passed through, say) fails the test.
async fn connect_via(lb: &Nginx, query: &str) -> (Client, String) {
    let url = lb.ws_url(query);
    let (ws, _) = within("a WebSocket handshake through nginx", async {
        tokio_tungstenite::connect_async(&url).await
    })
    .await
    .unwrap_or_else(|e| panic!("a client connecting through nginx was refused: {e}"));
    let mut client = Client::new(ws);
    let welcome = client.recv_json().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (
        client,
        welcome["node"].as_str().expect("welcome.node").to_string(),
    )
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM lets the master stop its workers; KILL would orphan them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_shipped_nginx_config_share_rooms_across_nodes() {
    let redis = Redis::start().await;
    let a = Node::start_with(redis_config(&redis, "node-a", &[]), true).await;
    let b = Node::start_with(redis_config(&redis, "node-b", &[]), true).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let lb = Nginx::start(&[&a, &b]).await;

    // least_conn: the second client goes to the other node.
    let (mut first, node1) = connect_via(&lb, "room=stage").await;
    let (mut second, node2) = connect_via(&lb, "room=stage").await;
    assert_ne!(node1, node2);

    let (ack, _) = first
        .request(send_frame("stage", "danmaku", json!("through nginx")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    let msg = second.recv_json().await;
    assert_eq!(msg["data"], json!("through nginx"));

    // A backend publishes through the internal server.
    let publish = r#"{"room":"stage","event":"notice","data":1}"#;
    let (status, body) = http(lb.internal(), "POST", "/api/publish", publish).await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    for c in [&mut first, &mut second] {
        loop {
            let f = c.recv_json().await;
            if f["event"] == "notice" {
                break;
            }
        }
    }
    // The public server routes neither the API nor metrics (a web page a
    // viewer opens must not be able to publish), nor anything else.
    for (method, path) in [("POST", "/api/publish"), ("GET", "/metrics"), ("GET", "/")] {
        let (status, body) = http(lb.public(), method, path, publish).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body.contains("not_found"), "{body}");
    }
    // Nor does the internal one serve WebSocket clients.
    assert_eq!(
        http(lb.internal(), "GET", "/ws?room=stage", "").await.0,
        404
    );
}

/// A rolling restart through the shipped config: the draining node's clients
/// all reconnect through nginx at once without a single refusal, and the
/// restarted node then gets its share of new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_clients_reconnect_without_a_503_and_the_restarted_node_gets_new_clients() {
    const CLIENTS: usize = 20;
    let redis = Redis::start().await;
    let extra = [("ROOMCAST__SHUTDOWN__DRAIN", "500ms")];
    let mut a = Node::start_with(redis_config(&redis, "node-a", &extra), true).await;
    let b = Node::start_with(redis_config(&redis, "node-b", &extra), true).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let (a_addr, a_internal) = (a.addr, a.internal);
    let lb = Nginx::start(&[&a, &b]).await;

    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..CLIENTS {
        let (c, node) = connect_via(&lb, "room=r").await;
        match node.as_str() {
            "node-a" => on_a.push(c),
            _ => on_b.push(c),
        }
    }
    assert_eq!(on_a.len(), CLIENTS / 2, "least_conn spreads evenly");

    // Drain node a: each of its clients is closed with 1012 and reconnects
    // at once, as a real client does, while node a still answers 503.
    a.begin_shutdown();
    let mut moved = Vec::new();
    for mut c in on_a {
        assert_eq!(c.closed().await, 1012);
        let (c, node) = connect_via(&lb, "room=r").await;
        assert_eq!(node, "node-b", "a reconnect landed on the draining node");
        moved.push(c);
    }
    a.finished().await;
    // They still get the room's messages.
    let (status, _) = http(
        b.internal.expect("internal"),
        "POST",
        "/api/publish",
        r#"{"room":"r","event":"after-drain"}"#,
    )
    .await;
    assert_eq!(status, 200);
    for c in moved.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(c.recv_json().await["event"], "after-drain");
    }

    // Restart node a on the same addresses: new clients fill it first.
    let a = Node::start_at(redis_config(&redis, "node-a", &extra), a_addr, a_internal).await;
    a.wait_ready(200).await;
    let mut landed_on_a = 0;
    let mut fresh = Vec::new();
    for _ in 0..CLIENTS {
        let (c, node) = connect_via(&lb, "room=r").await;
        landed_on_a += usize::from(node == "node-a");
        fresh.push(c);
    }
    // b holds 20, a none: least_conn sends every new client to a.
    assert_eq!(
        landed_on_a, CLIENTS,
        "the restarted node got {landed_on_a} of {CLIENTS} new clients"
    );
}
