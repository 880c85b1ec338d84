//! The docker-compose topology without Docker: the same files of `deploy/`
//! run by the real programs on loopback — a redis-server, three roomcast
//! processes, nginx with `deploy/nginx.conf`, and Prometheus with
//! `deploy/prometheus/` (ports and targets substituted, and the intervals
//! and alert delays shortened so that the test takes seconds). Also the
//! static checks of the deploy files: promtool, `docker compose config`,
//! the Kubernetes manifests against roomcast's own configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::nginx::{connect_via, Nginx};
use crate::util::*;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A program from Debian's packages, or a failure that says how to get it.
fn program(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: this test runs the real program; install it with `apt-get install -y {package}`")
}

/// Prometheus running `deploy/prometheus/prometheus.yml` and its rules.
struct Prometheus {
    child: KillOnDrop,
    addr: SocketAddr,
    dir: PathBuf,
}

/// The shipped Prometheus config with these scrape targets, scraping and
/// evaluating every second.
fn prometheus_config(targets: &[SocketAddr]) -> String {
    let shipped = read(&deploy("prometheus/prometheus.yml"));
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    let mut substituted = 0;
    let conf: Vec<String> = shipped
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            if trimmed.starts_with("- targets:") {
                substituted += 1;
                format!("{indent}- targets: [{}]", targets.join(", "))
            } else if trimmed.starts_with("scrape_interval:")
                || trimmed.starts_with("evaluation_interval:")
            {
                substituted += 1;
                let key = trimmed.split(':').next().unwrap_or_default();
                format!("{indent}{key}: 1s")
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert_eq!(
        substituted, 3,
        "deploy/prometheus/prometheus.yml: expected one targets line and both intervals"
    );
    conf.join("\n")
}

/// The shipped rules with every alert's `for` at one second.
fn prometheus_rules() -> String {
    let shipped = read(&deploy("prometheus/rules.yml"));
    let rules: Vec<String> = shipped
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            match trimmed.starts_with("for:") {
                true => format!("{}for: 1s", &line[..line.len() - trimmed.len()]),
                false => line.to_owned(),
            }
        })
        .collect();
    rules.join("\n")
}

impl Prometheus {
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        let binary = program("prometheus", "prometheus");
        for _ in 0..5 {
            let port = free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
            let dir = std::env::temp_dir()
                .join(format!("roomcast-prometheus-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("prometheus dir");
            std::fs::write(dir.join("prometheus.yml"), prometheus_config(targets))
                .expect("write prometheus.yml");
            std::fs::write(dir.join("rules.yml"), prometheus_rules()).expect("write rules.yml");
            let child = Command::new(&binary)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start prometheus");
            let mut prometheus = Prometheus {
                child: KillOnDrop(child),
                addr,
                dir,
            };
            let ready = within("prometheus to be ready (or exit)", async {
                loop {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let req = "GET /-/ready HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n";
                        let mut resp = Vec::new();
                        if s.write_all(req.as_bytes()).await.is_ok()
                            && s.read_to_end(&mut resp).await.is_ok()
                            && resp.starts_with(b"HTTP/1.1 200")
                        {
                            return true;
                        }
                    }
                    if prometheus.child.0.try_wait().expect("try_wait").is_some() {
                        return false;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            })
            .await;
            if ready {
                return prometheus;
            }
            let _ = std::fs::remove_dir_all(&prometheus.dir);
        }
        panic!("prometheus did not start in 5 attempts")
    }

    /// `GET /api/v1/{path}`, which must succeed: its `data`.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http(self.addr, "GET", &format!("/api/v1/{path}"), "").await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            status == 200 && v["status"] == "success",
            "prometheus /api/v1/{path}: {status} {body}"
        );
        v["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let q: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let data = self.api(&format!("query?query={q}")).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// A query whose answer is one number (`None` if it has no series).
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// The alerts in `state` (pending, firing) named `name`: their instances.
    async fn alerts(&self, name: &str, state: &str) -> BTreeSet<String> {
        let data = self.api("alerts").await;
        data["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == state)
            .map(|a| a["labels"]["instance"].as_str().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A roomcast process on `redis`, with its internal listener.
struct Gateway {
    process: KillOnDrop,
    public: SocketAddr,
    internal: SocketAddr,
}

async fn gateway(redis: &Redis, id: &str) -> Gateway {
    let internal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut env = redis_env(redis, id);
    env.push(("ROOMCAST__SERVER__INTERNAL_LISTEN", internal.to_string()));
    env.push(("ROOMCAST__SHUTDOWN__DRAIN", "500ms".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (process, public) = start_binary_with(&[], &[], &env, Stdio::null).await;
    within("the node to be ready", async {
        while http(public, "GET", "/readyz", "").await.0 != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    Gateway {
        process,
        public,
        internal,
    }
}

/// Every PromQL expression of the shipped Grafana dashboard, with its
/// variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(&deploy("grafana/dashboards/roomcast.json")))
        .expect("deploy/grafana/dashboards/roomcast.json is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has an expr");
            queries.push((title.clone(), expr.replace("$instance", ".*")));
        }
    }
    assert!(
        queries.len() >= 12,
        "the dashboard has its panels: {queries:?}"
    );
    queries
}

/// The metric (and recorded series) names a PromQL expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("roomcast") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_counts_online_users_follows_a_drain_and_alerts_on_a_lost_bus() {
    let _alone = REDIS_FAULTS.lock().await;
    let mut redis = Redis::start().await;
    let mut nodes = Vec::new();
    for id in ["roomcast-1", "roomcast-2", "roomcast-3"] {
        nodes.push(gateway(&redis, id).await);
    }
    let upstreams: Vec<(SocketAddr, SocketAddr)> =
        nodes.iter().map(|n| (n.public, n.internal)).collect();
    let lb = Nginx::start(&upstreams).await;
    let internal: Vec<SocketAddr> = nodes.iter().map(|n| n.internal).collect();
    let prometheus = Prometheus::start(&internal).await;

    // Nine viewers through nginx, spread over the three nodes.
    let mut clients = Vec::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..9 {
        let (client, node) = connect_via(&lb, "room=stack").await;
        *per_node.entry(node.clone()).or_default() += 1;
        clients.push((client, node));
    }
    assert_eq!(per_node.len(), 3, "clients on every node: {per_node:?}");
    // One message reaches all nine, whichever node they are on.
    let (ack, own) = clients[0]
        .0
        .request_own(send_frame("stack", "danmaku", json!({"text": "hi"})), 1)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(own["data"]["text"], "hi");
    for (client, node) in clients.iter_mut().skip(1) {
        let msg = client.recv_json().await;
        assert_eq!(
            (msg["op"].as_str(), msg["data"]["text"].as_str()),
            (Some("msg"), Some("hi")),
            "a client on {node}"
        );
    }

    // Prometheus scrapes all three: the recording rule says nine.
    eventually("roomcast:online_users:sum to be 9", || async {
        prometheus.scalar("roomcast:online_users:sum").await == Some(9.0)
    })
    .await;
    assert!(
        prometheus
            .alerts("RoomcastBusDown", "firing")
            .await
            .is_empty()
            && prometheus
                .alerts("RoomcastBusDown", "pending")
                .await
                .is_empty(),
        "no bus alert while Redis is up"
    );
    // Every panel of the dashboard is a query Prometheus takes, on series it has.
    let known: BTreeSet<String> = prometheus
        .api("label/__name__/values")
        .await
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    eventually("the recorded series to exist", || async {
        prometheus
            .scalar("roomcast:deliveries:rate1m")
            .await
            .is_some()
    })
    .await;
    for (title, expr) in dashboard_queries() {
        prometheus.query(&expr).await;
        for name in metric_names(&expr) {
            let recorded = name.contains(':');
            assert!(
                recorded || known.contains(&name),
                "panel {title:?} uses {name}, which no node exports"
            );
            if recorded {
                assert!(
                    prometheus.scalar(&name).await.is_some(),
                    "panel {title:?} uses {name}, which no rule records"
                );
            }
        }
    }

    // Node 1 is stopped gracefully: its clients are closed with 1012 and
    // reconnect through nginx to the other two; the count comes back to 9.
    let stopped = "roomcast-1";
    nodes[0].process.signal("TERM");
    for (client, node) in clients.iter_mut() {
        if node == stopped {
            assert_eq!(client.closed().await, 1012);
            let (again, landed) = connect_via(&lb, "room=stack").await;
            assert_ne!(landed, stopped, "a reconnect landed on the stopped node");
            *client = again;
            *node = landed;
        }
    }
    let status = nodes[0].process.exited("the drained node to exit").await;
    assert!(status.success(), "a drained node exits 0: {status:?}");
    eventually("the stopped node's target to be down", || async {
        let target = nodes[0].internal.to_string();
        prometheus
            .scalar(&format!("up{{instance=\"{target}\"}}"))
            .await
            == Some(0.0)
    })
    .await;
    eventually("roomcast:online_users:sum to be 9 again", || async {
        prometheus.scalar("roomcast:online_users:sum").await == Some(9.0)
    })
    .await;
    let gone = BTreeSet::from([nodes[0].internal.to_string()]);
    eventually("RoomcastNodeDown to fire for the stopped node", || async {
        prometheus.alerts("RoomcastNodeDown", "firing").await == gone
    })
    .await;

    // Redis stops: the bus alert fires for both running nodes.
    redis.kill();
    let running: BTreeSet<String> = nodes[1..].iter().map(|n| n.internal.to_string()).collect();
    eventually("RoomcastBusDown to fire for both running nodes", || async {
        prometheus.alerts("RoomcastBusDown", "firing").await == running
    })
    .await;
    eventually("RoomcastNodeNotReady to fire for them too", || async {
        prometheus.alerts("RoomcastNodeNotReady", "firing").await == running
    })
    .await;
}

/// Every document of a YAML file, as JSON values.
fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// A compose volume's (source, target), in either syntax `config` prints.
fn mount(volume: &Value) -> (String, String) {
    match volume.as_str() {
        Some(short) => {
            let mut parts = short.split(':');
            let source = parts.next().unwrap_or_default().to_owned();
            (source, parts.next().unwrap_or_default().to_owned())
        }
        None => (
            volume["source"].as_str().expect("volume source").to_owned(),
            volume["target"].as_str().expect("volume target").to_owned(),
        ),
    }
}

/// `roomcast`'s own configuration loader takes `env` (names and values).
fn assert_roomcast_takes(
    what: &str,
    file: Option<&Path>,
    env: Vec<(String, String)>,
) -> roomcast::Config {
    assert!(
        env.iter().any(|(k, _)| k.starts_with("ROOMCAST__")),
        "{what}: no ROOMCAST__ settings"
    );
    roomcast::Config::load(file, env)
        .unwrap_or_else(|e| panic!("{what}: roomcast refuses its environment: {e}"))
}

#[test]
fn the_deploy_files_pass_promtool_compose_and_roomcasts_own_config_check() {
    // Prometheus: the config (with its rules) and the rules on their own.
    let promtool = program("promtool", "prometheus");
    for args in [
        ["check", "config", "prometheus/prometheus.yml"],
        ["check", "rules", "prometheus/rules.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args[..2])
            .arg(deploy(args[2]))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // docker-compose.yml: valid for compose, every mounted file exists, and
    // every node's environment is a configuration roomcast accepts.
    let compose = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml");
    let compose_cmd: Vec<String> = if Path::new("/usr/bin/docker-compose").exists() {
        vec!["/usr/bin/docker-compose".into()]
    } else if Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        vec!["docker".into(), "compose".into()]
    } else {
        panic!("docker compose not found: install it with `apt-get install -y docker-compose` (or the docker compose plugin)")
    };
    let out = Command::new(&compose_cmd[0])
        .args(&compose_cmd[1..])
        .arg("-f")
        .arg(&compose)
        .arg("config")
        .output()
        .expect("run docker compose config");
    assert!(
        out.status.success(),
        "docker compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resolved = &yaml_documents(&String::from_utf8_lossy(&out.stdout))[0];
    let services = resolved["services"].as_object().expect("services");
    let mut nodes = 0;
    for (name, service) in services {
        let mounts: Vec<(String, String)> = service["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(mount)
            .collect();
        for (source, _) in &mounts {
            assert!(
                Path::new(source).exists(),
                "{name} mounts {source}, which is not in the repository"
            );
        }
        if name.starts_with("roomcast-") {
            nodes += 1;
            let env: Vec<(String, String)> = service["environment"]
                .as_object()
                .expect("environment")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            // `--config` names a file mounted from deploy/: load that one.
            let command: Vec<&str> = service["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let file = match command.as_slice() {
                ["--config", inside] => {
                    let (source, _) = mounts
                        .iter()
                        .find(|(_, target)| target == inside)
                        .unwrap_or_else(|| panic!("{name}: --config {inside} is not mounted"));
                    Some(PathBuf::from(source))
                }
                [] => None,
                other => panic!("{name}: unexpected command {other:?}"),
            };
            let config =
                assert_roomcast_takes(&format!("compose service {name}"), file.as_deref(), env);
            assert!(
                file.is_none() || config.namespaces.of("live:demo").history.is_some(),
                "{name}: the demo's live: rooms keep history"
            );
            assert_eq!(config.node_id, *name, "node.id of {name}");
            let test = service["healthcheck"]["test"]
                .as_array()
                .expect("healthcheck");
            assert!(
                test.iter().any(|t| t == "healthcheck"),
                "{name}'s health check uses `roomcast healthcheck`: {test:?}"
            );
        }
    }
    assert_eq!(nodes, 3, "three gateway nodes in docker-compose.yml");
    for needed in ["redis", "lb", "prometheus", "grafana"] {
        assert!(services.contains_key(needed), "compose has {needed}");
    }
}

#[test]
fn the_kubernetes_manifests_probe_the_right_ports_and_outlast_the_drain() {
    let docs = yaml_documents(&read(&deploy("k8s/roomcast.yaml")));
    let kind = |k: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == k).collect() };
    for k in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(!kind(k).is_empty(), "deploy/k8s/roomcast.yaml has a {k}");
    }
    let secrets: BTreeMap<(String, String), String> = kind("Secret")
        .iter()
        .flat_map(|s| {
            let name = s["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            s["stringData"]
                .as_object()
                .into_iter()
                .flatten()
                .map(move |(k, v)| {
                    let value = v.as_str().unwrap_or_default().to_owned();
                    ((name.clone(), k.clone()), value)
                })
        })
        .collect();
    let deployment = kind("Deployment")[0];
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let ports: BTreeMap<String, u64> = container["ports"]
        .as_array()
        .expect("container ports")
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("named ports").to_owned();
            (name, p["containerPort"].as_u64().expect("containerPort"))
        })
        .collect();
    // The environment, with secrets and the pod name filled in, is a
    // configuration roomcast accepts: names are real config keys.
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let from = &e["valueFrom"];
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
                "roomcast-7d9f8-abcde".to_owned()
            } else {
                let key = &from["secretKeyRef"];
                let at = (
                    key["name"].as_str().unwrap_or_default().to_owned(),
                    key["key"].as_str().unwrap_or_default().to_owned(),
                );
                secrets
                    .get(&at)
                    .unwrap_or_else(|| {
                        panic!("{name} names a secret key the manifest lacks: {at:?}")
                    })
                    .clone()
            };
            (name, value)
        })
        .collect();
    let config = assert_roomcast_takes("the Deployment", None, env);
    assert_eq!(
        Some(u64::from(config.listen.port())),
        ports.get("ws").copied(),
        "server.listen is the ws port"
    );
    let internal = config.server.internal_listen.expect("an internal listener");
    assert_eq!(
        Some(u64::from(internal.port())),
        ports.get("internal").copied(),
        "server.internal_listen is the internal port"
    );
    // Probes: ready on /readyz, alive on /healthz, both on the ws port
    // (which serves them whatever server.internal_listen says).
    let port_of = |p: &Value| -> u64 {
        match &p["httpGet"]["port"] {
            Value::String(name) => ports[name],
            n => n.as_u64().expect("probe port"),
        }
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let p = &container[probe];
        assert_eq!(p["httpGet"]["path"], path, "{probe}");
        assert_eq!(port_of(p), u64::from(config.listen.port()), "{probe} port");
    }
    // The pod's grace outlasts the drain and its close grace.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace as f64 > config.drain.as_secs_f64() + 5.0,
        "terminationGracePeriodSeconds {grace} must outlast shutdown.drain {:?} + 5 s",
        config.drain
    );
    assert!(
        container["resources"]["requests"]["cpu"].is_string()
            && container["resources"]["requests"]["memory"].is_string(),
        "resource requests"
    );
    // Prometheus finds /metrics on the internal port.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        internal.port().to_string(),
        "scrape annotation port"
    );
    // Every Service points at a port the container has.
    for service in kind("Service") {
        for p in service["spec"]["ports"].as_array().expect("service ports") {
            let target = &p["targetPort"];
            assert!(
                target.as_str().is_some_and(|n| ports.contains_key(n))
                    || target
                        .as_u64()
                        .is_some_and(|n| ports.values().any(|p| *p == n)),
                "service {} targets {target}, which the container lacks",
                service["metadata"]["name"]
            );
        }
    }
    let monitors = yaml_documents(&read(&deploy("k8s/servicemonitor.yaml")));
    assert_eq!(monitors[0]["kind"], "ServiceMonitor");
    assert_eq!(monitors[0]["spec"]["endpoints"][0]["path"], "/metrics");
}

/// `roomcast healthcheck [--path P]` with `ROOMCAST__SERVER__LISTEN` = `addr`: its exit code.
fn healthcheck(addr: SocketAddr, path: &str) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["healthcheck", "--path", path])
        .env("ROOMCAST__SERVER__LISTEN", addr.to_string())
        .stderr(Stdio::null())
        .status()
        .expect("run roomcast healthcheck")
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_subcommand_says_whether_the_node_answers() {
    let (mut node, addr) = start_binary(&[("ROOMCAST__SHUTDOWN__DRAIN", "2s")], Stdio::null).await;
    let check = |path: &'static str| tokio::task::spawn_blocking(move || healthcheck(addr, path));
    assert_eq!(check("/healthz").await.unwrap(), Some(0), "alive");
    assert_eq!(check("/readyz").await.unwrap(), Some(0), "ready");
    // Draining (the second client, closed half way through the drain, keeps
    // it from exiting at once): alive, not ready.
    let url = format!("ws://{addr}/ws?room=r");
    let (mut first, mut client) = (Client::connect(&url).await, Client::connect(&url).await);
    node.signal("TERM");
    eventually("the draining node to say alive but not ready", || async {
        check("/readyz").await.unwrap() == Some(1) && check("/healthz").await.unwrap() == Some(0)
    })
    .await;
    assert_eq!(first.closed().await, 1012);
    assert_eq!(client.closed().await, 1012);
    node.exited("the node to exit").await;
    assert_eq!(
        check("/healthz").await.unwrap(),
        Some(1),
        "nobody listening"
    );
}
