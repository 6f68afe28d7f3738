//! What both benchmarks need: the local test image, a VM config, and removal of every
//! container of a benchmark's scope when it ends (also on panic).

#![allow(dead_code)]

use std::process::{Command, Stdio};

use metald::proto::vmprovisioner as pb;

pub const IMAGE: &str = "metald-test-busybox:latest";

/// Builds the local test image if it is missing.
pub fn ensure_image() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ok = Command::new("bash")
        .arg(format!("{root}/scripts/build-test-image.sh"))
        .status()
        .map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "building the test image failed");
}

/// A small VM of the test image; `ports` publishes 8080 (the image's httpd).
pub fn vm_config(memory_bytes: i64, ports: bool) -> pb::VmConfig {
    let mut metadata =
        std::collections::BTreeMap::from([("docker_image".to_owned(), IMAGE.to_owned())]);
    if ports {
        metadata.insert("exposed_ports".into(), "8080/tcp".into());
        metadata.insert("env_vars".into(), "PORT=8080".into());
    }
    pb::VmConfig {
        cpu: Some(pb::CpuConfig {
            vcpu_count: 1,
            ..Default::default()
        }),
        memory: Some(pb::MemoryConfig {
            size_bytes: memory_bytes,
            ..Default::default()
        }),
        boot: Some(pb::BootConfig {
            kernel_path: "/boot/vmlinux".into(),
            ..Default::default()
        }),
        storage: vec![pb::StorageDevice {
            id: "root".into(),
            path: "/dev/vda".into(),
            ..Default::default()
        }],
        metadata,
        ..Default::default()
    }
}

/// On drop: stops the metald it holds (if any) and removes every container of the scope.
pub struct Cleanup {
    pub scope: String,
    pub child: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let filter = format!("label=unkey.vm.scope={}", self.scope);
        let Ok(out) = Command::new("docker")
            .args(["ps", "-aq", "--filter", &filter])
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .stdout(Stdio::null())
                .status();
        }
    }
}
