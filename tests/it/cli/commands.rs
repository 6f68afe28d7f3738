//! Every command end to end, in text mode and with --json.

use std::time::Duration;

use super::*;

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
