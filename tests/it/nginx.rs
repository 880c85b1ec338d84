//! The shipped load-balancer config (deploy/nginx.conf) run by the real
//! nginx on loopback ports, in front of test nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::util::*;

/// A node behind nginx: its public and internal listener addresses.
pub type Upstream = (SocketAddr, SocketAddr);

/// The upstream addresses of an in-process node with an internal listener.
pub fn upstream(node: &Node) -> Upstream {
    (
        node.addr,
        node.internal
            .expect("nodes behind nginx need an internal listener"),
    )
}

/// nginx running `deploy/nginx.conf` with its upstreams pointed at the
/// given nodes: (public, internal) listener addresses.
pub struct Nginx {
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
fn test_config(nodes: &[Upstream], port: u16, internal_port: u16, dir: &Path) -> String {
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
                    "8080" => node.0,
                    _ => node.1,
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
    pub async fn start(nodes: &[Upstream]) -> Nginx {
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

    pub fn public(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().expect("addr")
    }

    pub fn internal(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.internal_port)
            .parse()
            .expect("addr")
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.public())
    }
}

/// Connect through nginx and read the welcome: the node the client landed on.
/// Any refusal (a 503 passed through, say) fails the test.
pub async fn connect_via(lb: &Nginx, query: &str) -> (Client, String) {
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
