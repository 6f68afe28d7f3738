//! Config files, templates, stdin, config-gen | config-validate.

use std::process::{Command, Stdio};

use super::*;

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
