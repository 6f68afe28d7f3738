//! Unit tests of configuration loading.
use super::*;
use std::io::Write as _;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn err(pairs: &[(&str, &str)]) -> String {
    Config::from_sources(None, &env(pairs))
        .unwrap_err()
        .to_string()
}

#[test]
fn defaults_match_the_spec() {
    let c = Config::from_sources(None, &env(&[])).unwrap();
    assert_eq!(c.address.to_string(), "0.0.0.0");
    assert_eq!(c.port, 8080);
    assert_eq!(c.docker.port_range, (30000, 40000));
    assert_eq!(c.docker.pull_timeout, Duration::from_secs(300));
    assert_eq!(c.billing.interval, Duration::from_secs(15));
    assert_eq!(c.billing.flush_interval, Duration::from_secs(60));
    assert_eq!(c.scope, "default");
    assert_eq!(c.tls.mode, TlsMode::Disabled);
    assert!(c.billing.enabled && !c.billing.mock_mode);
}

#[test]
fn environment_overrides_and_errors_name_the_variable() {
    let c = Config::from_sources(
        None,
        &env(&[
            ("UNKEY_METALD_PORT", "9000"),
            ("UNKEY_METALD_BILLING_INTERVAL", "2s"),
        ]),
    )
    .unwrap();
    assert_eq!(c.port, 9000);
    assert_eq!(c.billing.interval, Duration::from_secs(2));
    assert!(err(&[("UNKEY_METALD_PORT", "abc")]).starts_with("UNKEY_METALD_PORT:"));
    assert!(err(&[("UNKEY_METALD_BILLING_ENABLED", "maybe")])
        .starts_with("UNKEY_METALD_BILLING_ENABLED:"));
    assert!(err(&[("UNKEY_METALD_BILLING_INTERVAL", "soon")])
        .starts_with("UNKEY_METALD_BILLING_INTERVAL:"));
    assert!(err(&[
        ("UNKEY_METALD_DOCKER_PORT_RANGE_MIN", "500"),
        ("UNKEY_METALD_DOCKER_PORT_RANGE_MAX", "400")
    ])
    .starts_with("UNKEY_METALD_DOCKER_PORT_RANGE_MAX:"));
    assert!(err(&[("UNKEY_METALD_BACKEND", "firecracker")]).contains("not supported by this build"));
    assert!(err(&[("UNKEY_METALD_TLS_MODE", "mtls")]).starts_with("UNKEY_METALD_TLS_MODE:"));
    assert!(err(&[("UNKEY_METALD_LOG_LEVEL", "info,[")]).starts_with("UNKEY_METALD_LOG_LEVEL:"));
    for bad in ["warnig", "warnig,hyper=off", "info,hyper"] {
        assert!(
            err(&[("UNKEY_METALD_LOG_LEVEL", bad)]).contains("is not a level"),
            "{bad}"
        );
    }
    for ok in [
        "WARN",
        "info,metald::billing=debug",
        "debug,hyper=off",
        "info,metald",
    ] {
        let c = Config::from_sources(None, &env(&[("UNKEY_METALD_LOG_LEVEL", ok)]));
        assert!(c.is_ok(), "{ok}: {:?}", c.err());
    }
    for bad in ["bad host:43 18", "ftp://collector:4318", ""] {
        assert!(err(&[
            ("UNKEY_METALD_OTEL_ENABLED", "true"),
            ("UNKEY_METALD_OTEL_ENDPOINT", bad)
        ])
        .starts_with("UNKEY_METALD_OTEL_ENDPOINT:"));
        // Not used, not checked.
        assert!(Config::from_sources(None, &env(&[("UNKEY_METALD_OTEL_ENDPOINT", bad)])).is_ok());
    }
    for ok in [
        "localhost:4318",
        "http://otel:4318",
        "https://otel.example/v1/traces",
    ] {
        let c = Config::from_sources(
            None,
            &env(&[
                ("UNKEY_METALD_OTEL_ENABLED", "true"),
                ("UNKEY_METALD_OTEL_ENDPOINT", ok),
            ]),
        );
        assert!(c.is_ok(), "{ok}: {:?}", c.err());
    }
    assert!(err(&[("UNKEY_METALD_DOCKER_SCOPE", "Bad Scope")])
        .starts_with("UNKEY_METALD_DOCKER_SCOPE:"));
}

#[test]
fn docker_host_falls_back_to_docker_host() {
    let c = Config::from_sources(None, &env(&[("DOCKER_HOST", "tcp://127.0.0.1:2375")])).unwrap();
    assert_eq!(c.docker.host, "tcp://127.0.0.1:2375");
    let c = Config::from_sources(
        None,
        &env(&[
            ("DOCKER_HOST", "tcp://x:1"),
            ("UNKEY_METALD_DOCKER_HOST", "unix:///d.sock"),
        ]),
    )
    .unwrap();
    assert_eq!(c.docker.host, "unix:///d.sock");
}

#[test]
fn file_layer_sits_between_defaults_and_environment() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        f,
        "port = 7000\ndocker_scope = \"from-file\"\nbilling_enabled = false"
    )
    .unwrap();
    let c = Config::from_sources(Some(f.path()), &env(&[("UNKEY_METALD_PORT", "7001")])).unwrap();
    assert_eq!(c.port, 7001);
    assert_eq!(c.scope, "from-file");
    assert!(!c.billing.enabled);
    let round = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(round.path(), c.to_toml()).unwrap();
    let again = Config::from_sources(Some(round.path()), &env(&[])).unwrap();
    assert_eq!(again.port, 7001);
}

#[test]
fn file_errors_name_the_file_and_key() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "prot = 7000").unwrap();
    let e = Config::from_sources(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown key \"prot\""), "{e}");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "port = \"x\"").unwrap();
    let e = Config::from_sources(Some(f.path()), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("port in "), "{e}");
    let e = Config::from_sources(Some(Path::new("/nonexistent.toml")), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("config file /nonexistent.toml"), "{e}");
}

#[test]
fn hardening_and_caps_parse_and_name_their_variable() {
    let c = Config::from_sources(
        None,
        &env(&[
            ("UNKEY_METALD_VM_PIDS_LIMIT", "0"),
            ("UNKEY_METALD_VM_CAP_DROP", "cap_net_raw, MKNOD"),
            ("UNKEY_METALD_MAX_GRACE", "2m"),
            ("UNKEY_METALD_MAX_VMS_PER_CUSTOMER", "0"),
        ]),
    )
    .unwrap();
    assert_eq!(c.docker.hardening.pids_limit, 0);
    assert_eq!(c.docker.hardening.cap_drop, ["NET_RAW", "MKNOD"]);
    assert_eq!(c.limits.max_grace, Duration::from_secs(120));
    assert_eq!(c.limits.max_vms_per_customer, 0);
    for (var, bad) in [
        ("UNKEY_METALD_VM_PIDS_LIMIT", "-1"),
        ("UNKEY_METALD_VM_MAX_PORTS", "many"),
        ("UNKEY_METALD_VM_MAX_CONFIG_BYTES", "10"),
        ("UNKEY_METALD_MAX_INFLIGHT_RPCS", "0"),
        ("UNKEY_METALD_VM_LOG_MAX_SIZE", "big"),
        ("UNKEY_METALD_VM_CAP_DROP", "net-raw"),
        ("UNKEY_METALD_MAX_GRACE", "forever"),
    ] {
        assert!(
            err(&[(var, bad)]).starts_with(&format!("{var}:")),
            "{var}={bad}"
        );
    }
}
