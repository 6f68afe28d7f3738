//! Exit codes, global flags anywhere, environment fallbacks, paging, --help.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_for_server_usage_and_unreachable() {
    let m = Metald::start("cli-exit").await;
    let base = m.base();

    // 1: the server refused (a Connect error), one line on stderr.
    let run = as_user(&m, "dave", &["info", "vm-missing"]).fails(1, "not_found");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    let id = as_user(&m, "dave", &with_small(&["create"]))
        .ok()
        .field("VM ID");
    as_user(&m, "erin", &["boot", &id]).fails(1, "permission_denied");
    as_user(&m, "dave", &["pause", &id]).fails(1, "failed_precondition");
    as_user(
        &m,
        "dave",
        &[
            "create",
            &id,
            "--template",
            "minimal",
            "--docker-image",
            IMAGE,
        ],
    )
    .fails(1, "already_exists");

    // 2: usage errors, before anything is sent.
    for args in [
        vec!["info", &id, "--bogus"],
        vec!["info"],
        vec!["frobnicate"],
        vec!["delete", &id, "maybe"],
        vec!["create", "--port", "99999"],
        vec!["create", "--env", "1X=y"],
        vec!["create", "--template", "huge"],
        vec!["list", "--state", "sleeping"],
        vec!["list", "--timeout", "0s"],
        vec!["list", "--tls-mode", "spiffe"],
        vec!["list", "--tls-mode", "file"],
    ] {
        let mut all = vec!["--server", base.as_str()];
        all.extend(args.iter().copied());
        let run = cli(&all).fails(2, "invalid_argument");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    }
    let help = cli(&["create-and-boot", "--help"]).ok();
    assert!(help.stdout.contains("Example"), "{help:#?}");

    // 3: nothing listens, or something listens and never answers.
    let run = cli(&["--server", "http://127.0.0.1:1", "list"]).fails(3, "unavailable");
    assert!(run.stderr.contains("127.0.0.1:1"), "{run:#?}");
    // The kernel completes the handshake into the backlog; nobody ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("http://{}", silent.local_addr().expect("addr"));
    cli(&["list", "--server", &addr, "--timeout", "1s"]).fails(3, "deadline_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_flags_anywhere_env_fallbacks_and_paging() {
    let m = Metald::start("cli-flags").await;
    let base = m.base();
    let env = [
        ("UNKEY_METALD_SERVER_ADDRESS", base.as_str()),
        ("UNKEY_METALD_USER_ID", "frank"),
    ];

    // The server and user from the environment only.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            cli_with(&with_small(&["create"]), &env, None)
                .ok()
                .field("VM ID"),
        );
    }
    let running = &ids[0];
    cli_with(&["boot", running], &env, None).ok();

    // Flags before, after and around the command give the same answer; a flag beats its env.
    let want = serde_json::json!(3);
    for args in [
        vec!["--server", &base, "--user", "frank", "--json", "list"],
        vec!["list", "--json", "--user", "frank", "--server", &base],
        vec!["--json", "--user", "frank", "list", "--server", &base],
    ] {
        assert_eq!(cli(&args).ok().json()["totalCount"], want, "{args:?}");
    }
    let other = cli_with(&["list", "--json", "--user", "gina"], &env, None)
        .ok()
        .json();
    // Canonical JSON omits zero values: no totalCount, no vms.
    assert_eq!(other["totalCount"].as_i64().unwrap_or(0), 0, "{other}");
    assert!(other["vms"].as_array().is_none_or(Vec::is_empty), "{other}");

    // The tenant from the environment is sent: restricted-tenant is refused but for admin-user.
    let restricted = [
        ("UNKEY_METALD_SERVER_ADDRESS", base.as_str()),
        ("UNKEY_METALD_TENANT_ID", "restricted-tenant"),
    ];
    cli_with(&["list"], &restricted, None).fails(1, "permission_denied");
    cli_with(&["list", "--user", "admin-user"], &restricted, None).ok();

    // Filters and paging.
    let r = cli_with(&["list", "--state", "running", "--json"], &env, None)
        .ok()
        .json();
    assert_eq!(r["totalCount"], 1);
    assert_eq!(r["vms"][0]["vmId"], running.as_str());
    let r = cli_with(
        &["list", "--state", "created,shutdown", "--json"],
        &env,
        None,
    )
    .ok()
    .json();
    assert_eq!(r["totalCount"], 2);
    let page = cli_with(&["list", "--page-size", "1", "--json"], &env, None)
        .ok()
        .json();
    assert_eq!(page["vms"].as_array().map(Vec::len), Some(1));
    let token = page["nextPageToken"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let next = cli_with(
        &["list", "--page-size", "1", "--page-token", &token, "--json"],
        &env,
        None,
    )
    .ok()
    .json();
    assert_ne!(next["vms"][0]["vmId"], page["vms"][0]["vmId"]);
    let all = cli_with(&["list", "--page-size", "1", "--all", "--json"], &env, None)
        .ok()
        .json();
    let listed: Vec<&str> = all["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter_map(|v| v["vmId"].as_str())
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert!(all.get("nextPageToken").is_none(), "{all}");
    let text = cli_with(&["list", "--page-size", "1"], &env, None).ok();
    assert!(text.stderr.contains("--page-token"), "{text:#?}");
}

#[test]
fn every_command_has_help_with_an_example() {
    for cmd in [
        "create",
        "create-and-boot",
        "boot",
        "shutdown",
        "pause",
        "resume",
        "reboot",
        "delete",
        "info",
        "list",
        "config-gen",
        "config-validate",
    ] {
        let run = cli(&[cmd, "--help"]).ok();
        assert!(run.stdout.contains("Example"), "{cmd}: {run:#?}");
        assert!(
            run.stdout.contains(&format!("metald-cli {cmd}")),
            "{cmd}: {run:#?}"
        );
    }
}
