//! The JavaScript SDK and the demo page, run by the real programs: Node's
//! test runner with the SDK against real roomcast processes on a real
//! Redis (`clients/js/test/sdk.test.mjs`), and Debian's Chromium driven by
//! playwright-core through the shipped nginx config
//! (`clients/js/test/demo.browser.mjs`). The browser test leaves a
//! screenshot of the demo page at `target/demo-screenshot.png`. The nodes
//! run with the compose stack's `deploy/roomcast.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::nginx::Nginx;
use crate::util::*;

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js")
}

/// `node`, or a failure that says how to get it.
fn node_binary() -> &'static str {
    let found = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "node not found: the SDK tests run Node's test runner; install Node.js 20+ (`apt-get install -y nodejs`)"
    );
    "node"
}

/// Run `node args…` in clients/js with `env`; fail the test with its
/// output unless it succeeds. Bounded: a hung browser fails, not hangs.
async fn run_node(what: &str, args: &[&str], env: &[(&str, String)]) {
    let dir = std::env::temp_dir().join(format!(
        "roomcast-node-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = KillOnDrop(
        Command::new(node_binary())
            .args(args)
            .current_dir(js_dir())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("run node"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let output = format!(
        "{}\n{}",
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("{what} failed ({s}):\n{output}"),
        None => panic!("{what}: still running after 120 s:\n{output}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_passes_its_tests_against_real_nodes() {
    // Heavy (node processes): not beside a Redis-fault test, whose timing it would stretch.
    let _alone = REDIS_FAULTS.lock().await;
    let redis = Redis::start().await;
    let env = [
        ("ROOMCAST_BIN", env!("CARGO_BIN_EXE_roomcast").to_owned()),
        ("REDIS_URL", redis.url()),
    ];
    run_node(
        "the SDK tests (clients/js/test/sdk.test.mjs)",
        &[
            "--experimental-websocket",
            "--no-warnings",
            "--test",
            "test/sdk.test.mjs",
        ],
        &env,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_works_in_chromium_across_a_graceful_node_shutdown() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or_else(|| {
            panic!("chromium not found: the demo test runs a real browser; install it with `apt-get install -y chromium`")
        });
    assert!(
        js_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix clients/js`"
    );
    // Heavy (a browser): not beside a Redis-fault test, whose timing it would stretch.
    let _alone = REDIS_FAULTS.lock().await;
    let redis = Redis::start().await;
    // The compose stack's settings (the demo's live: rooms keep history).
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/roomcast.toml");
    let mut nodes = Vec::new();
    let mut pids = BTreeMap::new();
    for id in ["demo-a", "demo-b"] {
        let internal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut env = redis_env(&redis, id);
        env.extend([
            ("ROOMCAST__SERVER__INTERNAL_LISTEN", internal.to_string()),
            ("ROOMCAST__SHUTDOWN__DRAIN", "300ms".into()),
            ("ROOMCAST__AUTH__ALGORITHM", "HS256".into()),
            (
                "ROOMCAST__AUTH__SECRET",
                "demo-test-secret-0123456789abcdef0123".into(),
            ),
            ("ROOMCAST__DEMO__DEV_TOKENS", "true".into()),
            ("ROOMCAST__PRESENCE__REPORT_INTERVAL", "200ms".into()),
            ("ROOMCAST__PRESENCE__THROTTLE", "100ms".into()),
        ]);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (process, public) =
            start_binary_with(&[], &["--config", config], &env, Stdio::null).await;
        pids.insert(id.to_owned(), process.0.id());
        nodes.push((process, (public, internal)));
    }
    let upstreams: Vec<_> = nodes.iter().map(|(_, u)| *u).collect();
    let lb = Nginx::start(&upstreams).await;
    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/demo-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let env = [
        ("LB_URL", format!("http://{}", lb.public())),
        ("NODE_PIDS", serde_json::to_string(&pids).expect("json")),
        ("CHROMIUM", chromium.to_owned()),
        ("SCREENSHOT", screenshot.to_str().expect("path").to_owned()),
    ];
    run_node(
        "the demo page in Chromium (clients/js/test/demo.browser.mjs)",
        &["test/demo.browser.mjs"],
        &env,
    )
    .await;
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot at {}",
        screenshot.display()
    );
}
