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
    assert!(printed.contains("id = \"from-env\""), "{printed}");
    assert!(
        printed.contains("max_rooms_per_connection = 5"),
        "{printed}"
    );

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

#[test]
fn a_roomcast_variable_that_is_not_a_setting_is_an_error_naming_it() {
    for (var, hint) in [
        ("ROOMCAST_BUS__KIND", Some("ROOMCAST__BUS__KIND")), // one underscore
        ("ROOMCAST__BUS__KINDD", None),
        ("ROOMCAST__REDIS__URL", None), // section missing
        ("ROOMCAST__BUS", None),
        ("ROOMCAST_NODE_ID", Some("ROOMCAST__NODE__ID")), // single underscores
        (
            "ROOMCAST_LIMITS__MAX_CONNECTIONS",
            Some("ROOMCAST__LIMITS__MAX_CONNECTIONS"),
        ),
    ] {
        let (code, stderr) = roomcast(&[(var, "redis")], &["--check-config"]);
        assert_eq!(code, 64, "{var}: {stderr}");
        assert!(
            stderr.contains(&format!("{var}: not a roomcast setting")),
            "{stderr}"
        );
        if let Some(hint) = hint {
            assert!(
                stderr.contains(&format!("did you mean {hint}?")),
                "{stderr}"
            );
        }
    }
    // Other variables are none of our business, even ROOMCAST_ ones that
    // cannot be meant as a setting (a script's ROOMCAST_BIN, say).
    for other in ["ROOMCASTLE", "ROOMCAST_BIN", "ROOMCAST_PROTOCOLS"] {
        assert_eq!(
            roomcast(&[(other, "x")], &["--check-config"]).0,
            0,
            "{other}"
        );
    }
}

#[test]
fn a_log_filter_that_would_silence_logging_is_an_error() {
    for level in ["inf", "verbose", "", "roomcast=loud", "info,=debug"] {
        let (code, stderr) = roomcast(&[("ROOMCAST__LOG__LEVEL", level)], &["--check-config"]);
        assert_eq!(code, 64, "{level:?}: {stderr}");
        assert!(stderr.contains("log.level"), "{stderr}");
    }
    let (code, stderr) = roomcast(&[("RUST_LOG", "verbose")], &["--check-config"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("RUST_LOG"), "{stderr}");
    for good in [
        "debug",
        "WARN",
        "info,roomcast=trace",
        "roomcast::conn=debug,warn",
    ] {
        let (code, stderr) = roomcast(
            &[("ROOMCAST__LOG__LEVEL", good), ("RUST_LOG", good)],
            &["--check-config"],
        );
        assert_eq!(code, 0, "{good}: {stderr}");
    }
}

#[test]
fn check_config_prints_toml_that_reads_back_the_same_with_secrets_redacted() {
    let print = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .envs(env.iter().copied())
            .args(args)
            .arg("--check-config")
            .output()
            .expect("run roomcast");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let env = [
        ("ROOMCAST__BUS__KIND", "redis"),
        ("ROOMCAST__LIMITS__MAX_CONNECTIONS", "5000"),
        ("ROOMCAST__HEARTBEAT__INTERVAL", "15s"),
    ];
    let printed = print(&env, &[]);
    assert!(
        printed.contains("[bus.redis]") && printed.contains("max_connections = 5000"),
        "{printed}"
    );
    // Pasted back as a file, it gives the same configuration.
    let dir = std::env::temp_dir().join(format!("roomcast-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("effective.toml");
    std::fs::write(&file, &printed).unwrap();
    assert_eq!(print(&[], &["--config", file.to_str().unwrap()]), printed);
    std::fs::remove_dir_all(&dir).ok();
    // A password in the Redis URL never appears.
    let printed = print(
        &[(
            "ROOMCAST__BUS__REDIS__URL",
            "redis://alice:s3cret@10.0.0.1:6380",
        )],
        &[],
    );
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(
        printed.contains("url = \"redis://alice:***@10.0.0.1:6380\""),
        "{printed}"
    );
}
