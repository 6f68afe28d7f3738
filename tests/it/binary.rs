//! The metald binary itself: --version, --help, --print-config, and startup refusing bad
//! configuration with exit code 2 and the variable's name.

use std::process::Command;

fn metald(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metald"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run metald");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (code, out, _) = metald(&["--version"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("metald {}", env!("CARGO_PKG_VERSION")));
    let (code, out, _) = metald(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--config") && out.contains("--print-config"),
        "{out}"
    );
}

#[test]
fn print_config_is_a_loadable_file_with_env_applied() {
    let (code, out, _) = metald(
        &["--print-config"],
        &[
            ("UNKEY_METALD_PORT", "9999"),
            ("UNKEY_METALD_DOCKER_SCOPE", "printed"),
        ],
    );
    assert_eq!(code, 0);
    assert!(out.contains("port = \"9999\""), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metald.toml");
    std::fs::write(&file, &out).unwrap();
    let (code, again, err) = metald(&["--config", file.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        again, out,
        "the printed file loads back to the same configuration"
    );
}

#[test]
fn bad_values_stop_startup_with_exit_2_naming_the_variable() {
    for (var, value) in [
        ("UNKEY_METALD_PORT", "eighty"),
        ("UNKEY_METALD_BILLING_INTERVAL", "often"),
        ("UNKEY_METALD_BACKEND", "firecracker"),
        ("UNKEY_METALD_DOCKER_PORT_HOST_IP", "localhost:1"),
    ] {
        let (code, _, err) = metald(&["--print-config"], &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        assert!(err.contains(var), "{var}: {err}");
    }
    let (code, _, err) = metald(&["--config", "/nonexistent/metald.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/metald.toml"), "{err}");
}
