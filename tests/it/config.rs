//! The binary refuses bad configuration with a message naming the key.

use std::process::Command;

fn roomcast(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run roomcast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_values_and_unknown_keys_exit_nonzero_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("ROOMCAST__BUS__KIND", "kafka", "bus.kind"),
        ("ROOMCAST__HEARTBEAT__TIMEOUT", "1s", "heartbeat.timeout"),
        (
            "ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES",
            "-5",
            "limits.outbound_queue_bytes",
        ),
        ("ROOMCAST__SERVER__LISTEN", "localhost", "server.listen"),
        ("ROOMCAST__BUS__REDIS__URL", "http://x", "bus.redis.url"),
    ];
    for (key, value, named) in cases {
        let env = [
            (*key, *value),
            (
                "ROOMCAST__BUS__KIND",
                if *key == "ROOMCAST__BUS__KIND" {
                    value
                } else {
                    "redis"
                },
            ),
        ];
        let (code, stderr) = roomcast(&env, &["--check-config"]);
        assert_eq!(code, 64, "{key}={value}: {stderr}");
        assert!(
            stderr.contains(named),
            "{key}={value}: {stderr:?} should name {named}"
        );
    }
}

#[test]
fn config_file_is_layered_under_the_environment() {
    let dir = std::env::temp_dir().join(format!("roomcast-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("roomcast.toml");
    std::fs::write(
        &file,
        "[node]\nid = \"from-file\"\n[limits]\nmax_rooms_per_connection = 5\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, _) = roomcast(&[], &["--config", path, "--check-config"]);
    assert_eq!(code, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["--config", path, "--check-config"])
        .env("ROOMCAST__NODE__ID", "from-env")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("\"from-env\""), "{printed}");
    assert!(printed.contains("max_rooms_per_connection: 5"), "{printed}");

    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    let (code, stderr) = roomcast(&[], &["--config", path]);
    assert_eq!(code, 64);
    assert!(stderr.contains("colour"), "{stderr}");
    let (code, stderr) = roomcast(&[], &["--config", "/nonexistent/roomcast.toml"]);
    assert_eq!(code, 64);
    assert!(stderr.contains("roomcast.toml"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}
