//! The shipped load-balancer config (deploy/nginx.conf) in front of two
//! nodes, with the real nginx: clients land on different nodes and still
//! share rooms; backends publish through it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::json;

use crate::util::*;

/// nginx running `deploy/nginx.conf` with its upstreams pointed at `nodes`.
struct Nginx {
    child: Child,
    port: u16,
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

impl Nginx {
    async fn start(nodes: &[&Node]) -> Nginx {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .expect("read deploy/nginx.conf");
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("roomcast-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        // Same file as the compose deployment, with this test's addresses and private paths.
        let mut conf = String::new();
        conf.push_str(&format!(
            "pid {0}/nginx.pid;\nerror_log {0}/error.log;\n",
            dir.display()
        ));
        for line in shipped.lines() {
            let trimmed = line.trim();
            if let Some(rest) = trimmed.strip_prefix("server roomcast-") {
                let n: usize = rest[..1].parse().expect("server roomcast-N");
                if let Some(node) = nodes.get(n - 1) {
                    conf.push_str(&format!(
                        "        server {} max_fails=1 fail_timeout=2s;\n",
                        node.addr
                    ));
                }
                continue;
            }
            if trimmed == "listen 80;" {
                conf.push_str(&format!("        listen 127.0.0.1:{port};\n"));
                continue;
            }
            if trimmed.starts_with("worker_connections") {
                conf.push_str("    worker_connections 1024;\n");
                continue;
            }
            conf.push_str(line);
            conf.push('\n');
            if trimmed == "http {" {
                for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    conf.push_str(&format!("    {temp}_temp_path {}/{temp};\n", dir.display()));
                }
                conf.push_str("    access_log off;\n");
            }
        }
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
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
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("nginx to listen", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Nginx { child, port, dir }
    }
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
    let a = Node::ready(redis_config(&redis, "node-a", &[])).await;
    let b = Node::ready(redis_config(&redis, "node-b", &[])).await;
    let lb = Nginx::start(&[&a, &b]).await;
    let url = format!("ws://127.0.0.1:{}/ws?room=stage", lb.port);

    // least_conn: the second client goes to the other node.
    let mut first = Client::connect(&url).await;
    let welcome1 = first.recv_json().await;
    let mut second = Client::connect(&url).await;
    let welcome2 = second.recv_json().await;
    assert_ne!(
        welcome1["node"], welcome2["node"],
        "{welcome1} / {welcome2}"
    );

    let (ack, _) = first
        .request(send_frame("stage", "danmaku", json!("through nginx")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    let msg = second.recv_json().await;
    assert_eq!(
        (msg["data"].clone(), msg["from"].clone()),
        (json!("through nginx"), welcome1["conn"].clone())
    );

    // A backend publishes through the balancer.
    let lb_addr = format!("127.0.0.1:{}", lb.port).parse().unwrap();
    let (status, body) = http(
        lb_addr,
        "POST",
        "/api/publish",
        r#"{"room":"stage","event":"notice","data":1}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    for c in [&mut first, &mut second] {
        loop {
            let f = c.recv_json().await;
            if f["event"] == "notice" {
                break;
            }
        }
    }
    let (status, body) = http(lb_addr, "GET", "/", "").await;
    assert_eq!(status, 404);
    assert!(body.contains("not_found"), "{body}");
}
