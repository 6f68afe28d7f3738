//! metald-cli end to end (issue 4, spec §10): the real binary against a live metald and the
//! real Docker Engine — every command in text and `--json`, config files and templates,
//! `config-gen | config-validate -`, exit codes 1/2/3, global flags anywhere, env fallbacks.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_metald-cli");

/// The CLI's environment fallbacks: cleared for every run so the caller's shell cannot leak
/// into a test; a test sets the ones it means.
const CLI_ENV: [&str; 7] = [
    "UNKEY_METALD_SERVER_ADDRESS",
    "UNKEY_METALD_USER_ID",
    "UNKEY_METALD_TENANT_ID",
    "UNKEY_METALD_TLS_MODE",
    "UNKEY_METALD_TLS_CERT_FILE",
    "UNKEY_METALD_TLS_KEY_FILE",
    "UNKEY_METALD_TLS_CA_FILE",
];

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts success and returns self.
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "metald-cli failed: {self:#?}");
        self
    }

    /// Asserts the exit code and the one-line `error: <code>: …` on stderr.
    fn fails(self, exit: i32, code: &str) -> Self {
        assert_eq!(self.code, exit, "wrong exit code: {self:#?}");
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!("error: {code}: ")),
            "stderr does not end in `error: {code}: …`: {self:#?}"
        );
        assert!(self.stdout.is_empty() || exit == 1, "{self:#?}");
        self
    }

    /// stdout as exactly one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:#?}"))
    }

    /// The value of a `Label: value` line of the text output.
    fn field(&self, label: &str) -> String {
        let prefix = format!("{label}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line: {self:#?}"))
            .to_owned()
    }
}

fn cli(args: &[&str]) -> Run {
    cli_with(args, &[], None)
}

fn cli_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in CLI_ENV {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn metald-cli");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for metald-cli");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `metald-cli --server <m> --user <user> <args…>`.
fn as_user(m: &Metald, user: &str, args: &[&str]) -> Run {
    let base = m.base();
    let mut all = vec!["--server", base.as_str(), "--user", user];
    all.extend_from_slice(args);
    cli(&all)
}

/// A small VM's flags: the test image, 32 MB.
const SMALL: [&str; 6] = [
    "--template",
    "minimal",
    "--docker-image",
    IMAGE,
    "--memory",
    "32",
];

fn with_small<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend_from_slice(&SMALL);
    v
}

fn config_example(name: &str) -> String {
    format!("{}/examples/configs/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_text_mode() {
    let m = Metald::start("cli-text").await;
    let base = m.base();

    // Flags before and after the command; --env values may hold commas.
    let run = cli(&with_small(&[
        "--server",
        &base,
        "create-and-boot",
        "--port",
        "8080/tcp",
        "--env",
        "GREETING=hello, world",
        "--user",
        "alice",
    ]))
    .ok();
    let id = run.field("VM ID");
    assert_eq!(run.field("State"), "VM_STATE_RUNNING");
    assert!(
        !run.stderr.contains('\r'),
        "a spinner without a terminal: {run:#?}"
    );
    let port: u16 = run
        .field("Port")
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no host port: {run:#?}"));
    // The VM really serves on the published port.
    eventually(
        Duration::from_secs(10),
        "httpd on the published port",
        || async {
            http_get(&format!("http://127.0.0.1:{port}/"))
                .await
                .is_some_and(|b| b.contains("metald test vm"))
        },
    )
    .await;

    let info = as_user(&m, "alice", &["info", &id]).ok();
    assert_eq!(info.field("VM ID"), id);
    assert_eq!(info.field("State"), "VM_STATE_RUNNING");
    for part in [
        "Config", "Network", "Metrics", "Backend", "32 MiB", IMAGE, "GREETING",
    ] {
        assert!(info.stdout.contains(part), "info lacks {part:?}: {info:#?}");
    }
    assert!(
        info.stdout
            .contains(&format!("8080/tcp -> host port {port}")),
        "{info:#?}"
    );
    assert!(
        !info.stdout.contains("hello, world"),
        "env values are not shown: {info:#?}"
    );
    let container = docker(&["ps", "-aq", "--filter", &format!("label=unkey.vm.id={id}")]);
    let env = docker(&["inspect", "-f", "{{json .Config.Env}}", &container]);
    assert!(env.contains("GREETING=hello, world"), "{env}");

    let list = as_user(&m, "alice", &["list"]).ok();
    let header = list.stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("VM ID") && header.contains("STATE"),
        "{list:#?}"
    );
    assert!(
        list.stdout
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("VM_STATE_RUNNING")),
        "{list:#?}"
    );

    let step = |args: &[&str], state: &str| {
        let r = as_user(&m, "alice", args).ok();
        assert_eq!(r.field("VM ID"), id);
        assert_eq!(r.field("State"), state, "{args:?}");
    };
    step(&["pause", &id], "VM_STATE_PAUSED");
    step(&["resume", &id], "VM_STATE_RUNNING");
    step(&["reboot", &id, "force"], "VM_STATE_RUNNING");
    step(
        &["shutdown", &id, "--timeout-seconds", "1"],
        "VM_STATE_SHUTDOWN",
    );
    step(&["boot", &id], "VM_STATE_RUNNING");
    step(&["shutdown", &id, "--force"], "VM_STATE_SHUTDOWN");
    step(&["boot", &id], "VM_STATE_RUNNING");

    // A running VM needs force (spec §4.2): a server error, exit 1.
    as_user(&m, "alice", &["delete", &id]).fails(1, "failed_precondition");
    let del = as_user(&m, "alice", &["delete", &id, "force"]).ok();
    assert_eq!(del.field("VM ID"), id);
    as_user(&m, "alice", &["info", &id]).fails(1, "not_found");
    assert!(scope_containers(&m.scope).is_empty());

    // `create` alone leaves the VM created, under the id asked for.
    let run = cli(&with_small(&[
        "create", "my-vm", "--server", &base, "--user", "alice",
    ]))
    .ok();
    assert_eq!(run.field("VM ID"), "my-vm");
    assert_eq!(run.field("State"), "VM_STATE_CREATED");
    assert_eq!(run.field("Image"), IMAGE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_with_json() {
    let m = Metald::start("cli-json").await;
    let j = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--json");
        as_user(&m, "bob", &all).ok().json()
    };

    let created = j(&with_small(&["create"]));
    let id = created["vmId"].as_str().expect("vmId").to_owned();
    assert_eq!(created["state"], "VM_STATE_CREATED");
    for (cmd, state) in [
        ("boot", "VM_STATE_RUNNING"),
        ("pause", "VM_STATE_PAUSED"),
        ("resume", "VM_STATE_RUNNING"),
        ("reboot", "VM_STATE_RUNNING"),
    ] {
        let mut args = vec![cmd, id.as_str()];
        if cmd == "reboot" {
            args.push("--force");
        }
        let v = j(&args);
        assert_eq!(
            (v["vmId"].as_str(), v["state"].as_str()),
            (Some(id.as_str()), Some(state)),
            "{cmd}: {v}"
        );
        assert_eq!(v["success"], true, "{cmd}: {v}");
    }
    let v = j(&["shutdown", &id, "force"]);
    assert_eq!(v["state"], "VM_STATE_SHUTDOWN");

    let info = j(&["info", &id]);
    assert_eq!(info["vmId"], id.as_str());
    assert_eq!(info["state"], "VM_STATE_SHUTDOWN");
    assert_eq!(info["config"]["memory"]["sizeBytes"], "33554432", "{info}");
    assert_eq!(
        info["config"]["storage"][0]["options"]["docker_image"],
        IMAGE
    );
    assert_eq!(info["backendInfo"]["backend"], "docker");

    let list = j(&["list"]);
    assert_eq!(list["totalCount"], 1);
    assert_eq!(list["vms"][0]["vmId"], id.as_str());
    assert_eq!(list["vms"][0]["state"], "VM_STATE_SHUTDOWN");
    assert_eq!(
        list["vms"][0]["customerId"], "bob",
        "CreateVm sets customer_id to the user"
    );

    let deleted = j(&["delete", &id]);
    assert_eq!(
        (deleted["vmId"].as_str(), deleted["success"].as_bool()),
        (Some(id.as_str()), Some(true))
    );

    let both = j(&with_small(&["create-and-boot", "--port", "8080"]));
    assert_eq!(both["state"], "VM_STATE_RUNNING");
    assert_eq!(both["create"]["state"], "VM_STATE_CREATED");
    assert_eq!(both["boot"]["state"], "VM_STATE_RUNNING");
    assert_eq!(
        both["info"]["networkInfo"]["portMappings"][0]["containerPort"], 8080,
        "{both}"
    );

    // The two local commands: config-gen is JSON anyway, config-validate has a report.
    let gen = cli(&["config-gen", "--json"]).ok().json();
    assert_eq!(gen["template"], "standard");
    let report = cli_with(&["config-validate", "--json"], &[], Some(&gen.to_string()))
        .ok()
        .json();
    assert_eq!(report["valid"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files_templates_and_stdin() {
    let m = Metald::start("cli-config").await;
    let dir = tempfile::tempdir().expect("tempdir");

    // The image only in the root device's options, as callers' example files have it; the root
    // device is not the first one.
    let file = dir.path().join("vm.json");
    let doc = serde_json::json!({
        "name": "from-file",
        "cpu": {"vcpu_count": 1},
        "memory": {"size_mb": 32},
        "boot": {"kernel_path": "/boot/vmlinux"},
        "storage": [
            {"id": "data", "path": "/dev/vdb"},
            {"id": "root", "path": "/dev/vda", "is_root_device": true,
             "options": {"docker_image": IMAGE}}
        ],
        "network": [{"id": "eth0", "mode": "ipv4_only", "ipv4": {"dhcp": true}}],
        "metadata": {"exposed_ports": "8080/tcp", "env.PORT": "8080"}
    });
    std::fs::write(&file, doc.to_string()).expect("write config");
    let path = file.to_str().expect("utf-8 path");
    let run = as_user(
        &m,
        "carol",
        &["create-and-boot", "file-vm", "--config", path],
    )
    .ok();
    assert_eq!(run.field("VM ID"), "file-vm");
    assert_eq!(run.field("State"), "VM_STATE_RUNNING");
    let container = docker(&["ps", "-q", "--filter", "label=unkey.vm.id=file-vm"]);
    assert_eq!(
        docker(&["inspect", "-f", "{{.Config.Image}}", &container]),
        IMAGE
    );
    let info = as_user(&m, "carol", &["info", "file-vm", "--json"])
        .ok()
        .json();
    assert_eq!(info["config"]["metadata"]["name"], "from-file");
    assert_eq!(
        info["config"]["network"][0]["mode"],
        "NETWORK_MODE_IPV4_ONLY"
    );

    // Every example file is valid, and one of them runs as it is (with less memory).
    for name in [
        "minimal.json",
        "standard.json",
        "web-service.json",
        "deploy-workflow.json",
    ] {
        cli(&["config-validate", &config_example(name)]).ok();
    }
    let example = config_example("web-service.json");
    let run = as_user(
        &m,
        "carol",
        &["create-and-boot", "--config", &example, "--memory", "32"],
    )
    .ok();
    assert_eq!(run.field("State"), "VM_STATE_RUNNING");

    // A generated config through stdin: `config-gen … | create --config -`.
    let gen = cli(&with_small(&["config-gen"])).ok();
    let base = m.base();
    let run = cli_with(
        &[
            "create", "--config", "-", "--server", &base, "--user", "carol",
        ],
        &[],
        Some(&gen.stdout),
    )
    .ok();
    assert_eq!(run.field("State"), "VM_STATE_CREATED");

    // A bad file is refused before anything is sent: exit 1 (not 3) although no server listens.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"cpu": {"vcpu_count": 0}, "memory": {"size_mb": 1}}"#,
    )
    .expect("write");
    let run = cli(&[
        "create",
        "--config",
        bad.to_str().expect("utf-8"),
        "--server",
        "http://127.0.0.1:1",
    ])
    .fails(1, "invalid_argument");
    for field in [
        "cpu.vcpu_count",
        "memory.size_mb",
        "boot",
        "storage",
        "docker_image",
    ] {
        assert!(run.stderr.contains(field), "{field} not named: {run:#?}");
    }
    assert_eq!(
        as_user(&m, "carol", &["list", "--json"]).ok().json()["totalCount"],
        3
    );
}

#[test]
fn config_gen_pipes_into_config_validate() {
    for template in [
        "minimal",
        "standard",
        "high-cpu",
        "high-memory",
        "development",
    ] {
        let mut gen = Command::new(BIN)
            .args([
                "config-gen",
                "--template",
                template,
                "--port",
                "8080/tcp",
                "--env",
                "A=1",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn config-gen");
        let stdout = gen.stdout.take().expect("stdout");
        let check = Command::new(BIN)
            .args(["config-validate", "-"])
            .stdin(Stdio::from(stdout))
            .output()
            .expect("run config-validate");
        assert!(gen.wait().expect("config-gen").success());
        assert!(
            check.status.success(),
            "{template}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // config-gen prints valid JSON and nothing else.
        let out = cli(&["config-gen", "--template", template]).ok();
        assert_eq!(out.json()["template"], template);
        assert!(out.stderr.is_empty(), "{out:#?}");
    }
}

#[test]
fn config_validate_names_every_problem() {
    let bad = serde_json::json!({
        "cpu": {"vcpu_count": 0, "vcpus": 4},
        "memory": {"size_mb": "lots", "max_size_mb": -1},
        "boot": {"kernel_path": ""},
        "storage": [{"id": "a", "path": ""}, {"id": "a", "path": "/dev/vdb", "is_root_device": true},
                    {"path": "/dev/vdc", "is_root_device": true}],
        "network": [{"mode": "dual", "ipv4": {"static_ip": "10.0.0.300", "gateway": "fd00::1"}}],
        "metadata": {"exposed_ports": "http,80/sctp", "env.1BAD": "x", "env_vars": "NOEQUALS"}
    });
    let fields = [
        "cpu.vcpu_count",
        "memory.size_mb",
        "memory.max_size_mb",
        "boot.kernel_path",
        "storage[0].path",
        "storage[1].id",
        "network[0].mode",
        "network[0].ipv4.static_ip",
        "network[0].ipv4.gateway",
        "metadata.exposed_ports",
        "metadata.env.1BAD",
        "metadata.env_vars",
        "metadata.docker_image",
    ];
    let run = cli_with(&["config-validate", "-"], &[], Some(&bad.to_string()))
        .fails(1, "invalid_argument");
    for f in fields {
        assert!(
            run.stdout.contains(&format!("  {f}: ")),
            "{f} not named: {run:#?}"
        );
    }
    assert!(
        run.stdout
            .contains("only one device may be the root device"),
        "{run:#?}"
    );
    assert!(
        run.stdout.contains("warning: cpu.vcpus: unknown field"),
        "{run:#?}"
    );
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");

    let run = cli_with(&["config-validate", "--json"], &[], Some(&bad.to_string()));
    assert_eq!(run.code, 1);
    let report = run.json();
    assert_eq!(report["valid"], false);
    let named: Vec<&str> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["field"].as_str())
        .collect();
    for f in fields {
        assert!(named.contains(&f), "{f} missing from {named:?}");
    }

    cli_with(&["config-validate"], &[], Some("{not json")).fails(1, "invalid_argument");
    cli(&["config-validate", "/nonexistent/vm.json"]).fails(1, "invalid_argument");
}

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

/// A stand-in HTTPS peer (Python's ssl): requires a client certificate from our CA, checks the
/// Connect request's path and headers, and answers a ListVmsResponse with total_count 7.
const TLS_PEER: &str = r#"
import http.server, json, ssl, sys
d = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        want = {"content-type": "application/proto", "connect-protocol-version": "1",
                "authorization": "Bearer dev_user_tls-user", "x-tenant-id": "tls-tenant"}
        bad = [f"{k}={self.headers.get(k)!r}" for k, v in want.items() if self.headers.get(k) != v]
        if self.path != "/metal.vmprovisioner.v1.VmService/ListVms":
            bad.append("path " + self.path)
        if not (self.headers.get("connect-timeout-ms") or "").isdigit():
            bad.append("no connect-timeout-ms")
        if bad:
            status, ctype = 400, "application/json"
            body = json.dumps({"code": "invalid_argument", "message": "; ".join(bad)}).encode()
        else:
            status, ctype, body = 200, "application/proto", b"\x18\x07"
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(d + "/server.pem", d + "/server.key")
ctx.load_verify_locations(d + "/ca.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// Kills the peer it holds when dropped (also when the test fails).
struct Peer(std::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256.
fn make_pki(dir: &std::path::Path) {
    let key = |name: &str| {
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                name,
            ],
        )
    };
    key("ca.key");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=metald-cli test CA",
            "-days",
            "2",
            "-out",
            "ca.pem",
        ],
    );
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        key(&format!("{name}.key"));
        std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

#[test]
fn tls_file_mode_with_client_certificates() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipped: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path());
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(TLS_PEER)
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the python TLS peer");
    let stdout = child.stdout.take().expect("stdout");
    let peer = Peer(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("port");
    let server = format!("https://127.0.0.1:{}", line.trim());
    let path = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let base = [
        "--server",
        server.as_str(),
        "--user",
        "tls-user",
        "--tenant",
        "tls-tenant",
    ];
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        cli_with(&args, env, None)
    };

    // Mode, certificate, key and CA from the environment: headers and framing as over h2c.
    let env = [
        ("UNKEY_METALD_TLS_MODE", "file"),
        ("UNKEY_METALD_TLS_CA_FILE", ca.as_str()),
        ("UNKEY_METALD_TLS_CERT_FILE", cert.as_str()),
        ("UNKEY_METALD_TLS_KEY_FILE", key.as_str()),
    ];
    let v = run(&["list", "--json"], &env).ok().json();
    assert_eq!(v["totalCount"], 7, "{v}");
    // The same with flags.
    let flags = [
        "list",
        "--json",
        "--tls-mode",
        "file",
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let v = run(&flags, &[]).ok().json();
    assert_eq!(v["totalCount"], 7, "{v}");

    // No client certificate: the peer refuses the handshake. Our CA not trusted: we refuse it.
    run(&["list", "--tls-mode", "file", "--tls-ca", &ca], &[]).fails(3, "unavailable");
    let refused = run(
        &[
            "list",
            "--tls-mode",
            "file",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
        &[],
    )
    .fails(3, "unavailable");
    assert!(
        refused.stderr.to_lowercase().contains("certificate"),
        "{refused:#?}"
    );
    // Half an identity, or files that are not what they claim: usage errors.
    run(&["list", "--tls-mode", "file", "--tls-cert", &cert], &[]).fails(2, "invalid_argument");
    run(
        &[
            "list",
            "--tls-mode",
            "file",
            "--tls-ca",
            &key,
            "--tls-cert",
            &cert,
            "--tls-key",
            &ca,
        ],
        &[],
    )
    .fails(2, "invalid_argument");
    drop(peer);
}
