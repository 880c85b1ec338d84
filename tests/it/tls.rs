//! Managed Redis: TLS (`rediss://`) with a private CA, and an ACL user with
//! a password — against a real `redis-server --tls-port` with certificates
//! this test generates with the `openssl` command.

use std::path::PathBuf;

use serde_json::json;

use crate::util::*;

/// A throw-away CA and a server certificate for 127.0.0.1, signed by it.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn generate() -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "roomcast-tls-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let openssl = |args: &[&str]| openssl(&dir, args);
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=roomcast test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext.cnf");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Certs { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis with a TLS port (and its plain port for the test's own commands),
/// and an ACL user `alice` with password `s3cret`.
async fn tls_redis(certs: &Certs) -> (Redis, u16) {
    let tls_port = std::sync::Mutex::new(0);
    let redis = Redis::start_with(|| {
        let port = free_port();
        *tls_port.lock().unwrap() = port;
        [
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &certs.path("server.crt"),
            "--tls-key-file",
            &certs.path("server.key"),
            "--tls-ca-cert-file",
            &certs.path("ca.crt"),
            "--tls-auth-clients",
            "no",
            "--user",
            "alice",
            "on",
            ">s3cret",
            "~*",
            "&*",
            "+@all",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    })
    .await;
    let port = *tls_port.lock().unwrap();
    (redis, port)
}

fn tls_node_config(url: &str, ca: Option<&str>, node: &str) -> roomcast::Config {
    let mut overrides = vec![
        ("ROOMCAST__BUS__KIND", "redis"),
        ("ROOMCAST__BUS__REDIS__URL", url),
        ("ROOMCAST__NODE__ID", node),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MIN", "50ms"),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MAX", "200ms"),
    ];
    if let Some(ca) = ca {
        overrides.push(("ROOMCAST__BUS__REDIS__TLS_CA_FILE", ca));
    }
    config(&overrides)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_through_redis_over_tls_as_an_acl_user() {
    let certs = Certs::generate();
    let (redis, tls_port) = tls_redis(&certs).await;
    let url = format!("rediss://alice:s3cret@127.0.0.1:{tls_port}");
    let ca = certs.path("ca.crt");
    let a = Node::ready(tls_node_config(&url, Some(&ca), "a")).await;
    let b = Node::ready(tls_node_config(&url, Some(&ca), "b")).await;
    let (mut on_a, _) = Client::json(&a, &["stage"]).await;
    let (mut on_b, _) = Client::json(&b, &["stage"]).await;
    let (ack, _) = on_a
        .request(send_frame("stage", "gift", json!("rose")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    let got = on_b.recv_json().await;
    assert_eq!(got["data"], "rose");
    // Redis sees the nodes as alice, over TLS only (no plain connection from them).
    let clients: String = redis.cmd(&["CLIENT", "LIST"]).await;
    let alice = clients
        .lines()
        .filter(|l| l.contains(" user=alice "))
        .count();
    assert!(alice >= 4, "two connections per node as alice:\n{clients}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_untrusted_certificate_keeps_the_bus_down() {
    let certs = Certs::generate();
    let (_redis, tls_port) = tls_redis(&certs).await;
    let ca = certs.path("ca.crt");

    let wrong = format!("rediss://alice:guess@127.0.0.1:{tls_port}");
    let bad_password = Node::start(tls_node_config(&wrong, Some(&ca), "a")).await;
    // The server's certificate is signed by a CA this node does not trust
    // (the system store does not know the test CA).
    let right = format!("rediss://alice:s3cret@127.0.0.1:{tls_port}");
    let untrusted = Node::start(tls_node_config(&right, None, "b")).await;
    // The same settings with the CA connect...
    let good = Node::start(tls_node_config(&right, Some(&ca), "c")).await;
    good.wait_ready(200).await;
    // ...while the other two, started first and retrying every 50-200 ms,
    // never got in.
    for node in [&bad_password, &untrusted] {
        assert_eq!(node.get("/readyz").await.0, 503);
        assert_eq!(node.metric("roomcast_bus_reconnects_total").await, 0.0);
        assert_eq!(node.metric("roomcast_bus_up").await, 0.0);
    }
}

#[test]
fn a_tls_ca_file_needs_a_rediss_url_and_must_exist() {
    let load = |url: &str, ca: &str| {
        let env = [
            (
                "ROOMCAST__BUS__KIND",
                url.split(':').next().map(|_| "redis").unwrap_or("redis"),
            ),
            ("ROOMCAST__BUS__REDIS__URL", url),
            ("ROOMCAST__BUS__REDIS__TLS_CA_FILE", ca),
        ];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        roomcast::Config::load(None, env)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let err = load("redis://127.0.0.1:6390", "/etc/hostname").unwrap_err();
    assert!(err.starts_with("bus.redis.tls_ca_file:"), "{err}");
    let err = load("rediss://127.0.0.1:6390", "/nonexistent/ca.pem").unwrap_err();
    assert!(
        err.starts_with("bus.redis.tls_ca_file:") && err.contains("/nonexistent/ca.pem"),
        "{err}"
    );
    // A password is never echoed in an error.
    let err = load("rediss//alice:s3cret@host", "").unwrap_err();
    assert!(
        err.starts_with("bus.redis.url:") && !err.contains("s3cret"),
        "{err}"
    );
}
