//! The start-up reaper (spec §6 seed rule) removes only never-started leftovers: the old
//! service's containers and containers that ran are left alone.

use std::process::{Command, Stdio};

use crate::support::*;

/// Removes containers by name when dropped: these carry no scope label for the scope guard.
struct Named(Vec<String>);

impl Drop for Named {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&self.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn exists(name: &str) -> bool {
    !docker(&["ps", "-aq", "--filter", &format!("name=^/{name}$")]).is_empty()
}

fn docker_ok(args: &[&str]) {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_removes_only_never_started_leftovers() {
    ensure_image();
    // Named inside this test's scope (unique to the run), so no other instance lists them.
    let prefix = format!("unkey-vm-{}-", scope("reaper"));
    let legacy = format!("{prefix}legacy");
    let leftover = format!("{prefix}leftover");
    let ran = format!("{prefix}ran");
    let _cleanup = Named(vec![legacy.clone(), leftover.clone(), ran.clone()]);
    let legacy_id = format!("ud-legacy-{}", std::process::id());
    // The old service's labels only, and never started: still not ours to remove.
    docker_ok(&[
        "create",
        "--name",
        &legacy,
        "--label",
        &format!("unkey.vm.id={legacy_id}"),
        "--label",
        "unkey.vm.created_by=metald",
        IMAGE,
    ]);
    // An interrupted create: named like a VM, no labels, never started.
    docker_ok(&["create", "--name", &leftover, IMAGE]);
    // Named like a VM, no labels, but it ran (and exited).
    docker_ok(&["run", "--name", &ran, IMAGE, "true"]);

    let m = Metald::start("reaper").await;
    assert!(
        !exists(&leftover),
        "the never-started leftover is still there"
    );
    assert!(exists(&legacy), "the old service's container was removed");
    assert!(exists(&ran), "a container that ran was removed");
    let log = m.log_text();
    let noted = |name: &str| log.lines().filter(|l| l.contains(name)).count();
    println!(
        "log lines: leftover {}, legacy {}, ran {}",
        noted(&leftover),
        noted(&legacy),
        noted(&ran)
    );
    assert!(
        log.contains("service metald replaces") && noted(&legacy) == 1,
        "the old service's container is noted once:\n{log}"
    );
    assert_eq!(noted(&leftover), 1, "{log}");
    // Neither is mistaken for a VM of this scope.
    let c = m.client("alice");
    assert_eq!(c.list().await.unwrap().vms.len(), 0);
    assert_eq!(c.info(&legacy_id).await.unwrap_err().code, "not_found");
}
