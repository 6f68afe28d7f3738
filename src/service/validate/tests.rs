//! The pure request rules, one by one.

use super::*;
use crate::proto::vmprovisioner::{BootConfig, CpuConfig, MemoryConfig};

/// The deploy workflow's payload (spec §4.1).
fn ctrl_config() -> VmConfig {
    VmConfig {
        cpu: Some(CpuConfig {
            vcpu_count: 1,
            ..Default::default()
        }),
        memory: Some(MemoryConfig {
            size_bytes: 536_870_912,
            ..Default::default()
        }),
        boot: Some(BootConfig {
            kernel_path: "/boot/vmlinux".into(),
            initrd_path: "/boot/initrd".into(),
            kernel_args: "console=ttyS0 quiet".into(),
            ..Default::default()
        }),
        storage: vec![StorageDevice {
            id: "root".into(),
            path: "/dev/vda".into(),
            ..Default::default()
        }],
        metadata: [
            ("docker_image", "app:v1"),
            ("exposed_ports", "8080/tcp"),
            ("env_vars", "PORT=8080"),
            ("created_by", "deploy-workflow"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    }
}

fn err_of(config: &VmConfig) -> String {
    match vm_spec(Some(config), 2) {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected invalid_argument, got {other:?}"),
    }
}

#[test]
fn accepts_the_deploy_workflow_payload() {
    let spec = vm_spec(Some(&ctrl_config()), 2).unwrap();
    assert_eq!(spec.image, "app:v1");
    assert_eq!(spec.vcpus, 1);
    assert_eq!(spec.memory_bytes, 536_870_912);
    assert_eq!(
        spec.ports,
        vec![ExposedPort {
            port: 8080,
            protocol: Protocol::Tcp
        }]
    );
    assert_eq!(spec.env, vec!["PORT=8080"]);
}

#[test]
fn image_references_follow_dockers_grammar() {
    let digest = format!("app@sha256:{}", "ab".repeat(32));
    for good in [
        "busybox",
        "metald-test-busybox:latest",
        "ghcr.io/unkeyed/app:v1.2.3",
        "localhost:5000/app",
        "127.0.0.1:1/nope:latest",
        "Registry.Example:443/team/app_one__two--three:TAG_1.x",
        "[::1]:5000/app",
        "[2001:db8:1::1:2]/app",
        digest.as_str(),
    ] {
        assert!(is_image_reference(good), "{good}");
    }
    for bad in [
        "UPPER:x",
        "a?b",
        "a#b",
        "app:",
        ":tag",
        "a//b",
        "-a",
        "a-",
        "a:b:c",
        "app@sha256:12",
        "app@:abc",
        "a..b",
        "a___b",
        "host:port/app",
        "app:-tag",
    ] {
        assert!(!is_image_reference(bad), "{bad}");
    }
}

#[test]
fn unknown_network_mode_is_refused() {
    use crate::proto::vmprovisioner::NetworkInterface;
    let mut config = ctrl_config();
    config.network = vec![
        NetworkInterface {
            mode: NetworkMode::Ipv4Only as i32,
            ..Default::default()
        },
        NetworkInterface {
            mode: 7,
            ..Default::default()
        },
    ];
    assert_eq!(
        err_of(&config),
        "config.network[1].mode: 7 is not a NetworkMode"
    );
    config.network.truncate(1);
    assert!(vm_spec(Some(&config), 2).is_ok());
}

#[test]
fn rules_in_order_each_name_the_field() {
    assert_eq!(vm_spec(None, 2), Err(invalid("config is required")));
    let mut c = ctrl_config();
    c.cpu = None;
    c.memory = None;
    assert!(
        err_of(&c).contains("config.cpu is required"),
        "cpu is checked before memory"
    );
    let mut c = ctrl_config();
    c.memory = None;
    assert!(err_of(&c).contains("config.memory"));
    let mut c = ctrl_config();
    c.boot = None;
    assert!(err_of(&c).contains("config.boot"));
    let mut c = ctrl_config();
    c.cpu.as_mut().unwrap().vcpu_count = 0;
    assert!(err_of(&c).contains("vcpu_count"));
    let mut c = ctrl_config();
    c.cpu.as_mut().unwrap().vcpu_count = 2;
    c.cpu.as_mut().unwrap().max_vcpu_count = 1;
    assert!(err_of(&c).contains("max_vcpu_count"));
    let mut c = ctrl_config();
    c.memory.as_mut().unwrap().size_bytes = 0;
    assert!(err_of(&c).contains("size_bytes"));
    let mut c = ctrl_config();
    c.boot.as_mut().unwrap().kernel_path.clear();
    assert!(err_of(&c).contains("kernel_path"));
    let mut c = ctrl_config();
    c.storage.clear();
    assert!(err_of(&c).contains("config.storage"));
    let mut c = ctrl_config();
    c.storage.push(StorageDevice::default());
    assert!(err_of(&c).contains("config.storage[1].path"));
}

#[test]
fn our_rules() {
    let mut c = ctrl_config();
    c.metadata.remove("docker_image");
    assert!(err_of(&c).contains("an image is required"));
    c.storage[0]
        .options
        .insert("docker_image".into(), "from-root:1".into());
    assert_eq!(vm_spec(Some(&c), 2).unwrap().image, "from-root:1");

    let mut c = ctrl_config();
    c.memory.as_mut().unwrap().size_bytes = MIN_MEMORY_BYTES - 1;
    assert!(err_of(&c).contains("6 MiB"));
    let mut c = ctrl_config();
    c.cpu.as_mut().unwrap().vcpu_count = 3;
    assert!(err_of(&c).contains("exceeds the 2 CPUs"));
    for bad in ["0", "65536", "80/sctp", "http", "8080/", "-1"] {
        let mut c = ctrl_config();
        c.metadata.insert("exposed_ports".into(), bad.into());
        assert!(err_of(&c).contains("exposed_ports"), "{bad}");
    }
    for bad in ["NOVALUE", "1A=b", "=x", "A-B=c"] {
        let mut c = ctrl_config();
        c.metadata.insert("env_vars".into(), bad.into());
        assert!(err_of(&c).contains("env_vars"), "{bad}");
    }
    let mut c = ctrl_config();
    c.metadata.insert("env.BAD-KEY".into(), "x".into());
    assert!(err_of(&c).contains("env.BAD-KEY"));
}

#[test]
fn ports_and_env_forms() {
    let ports = exposed_ports("80, 53/udp,8080/TCP,80").unwrap();
    assert_eq!(ports.len(), 3);
    for bad in [
        "+8080",
        "080",
        "80 /tcp",
        "0",
        "65536",
        "8080/sctp",
        "/tcp",
        "8o",
    ] {
        assert!(exposed_ports(bad).is_err(), "{bad}");
    }
    assert_eq!(
        ports[1],
        ExposedPort {
            port: 53,
            protocol: Protocol::Udp
        }
    );
    let meta: BTreeMap<String, String> = [
        ("env_vars", "A=1,B=x=y"),
        ("env.C", "a,b,c"),
        ("env.A", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(env(&meta).unwrap(), vec!["A=2", "B=x=y", "C=a,b,c"]);
}

#[test]
fn grace_and_paging_rules() {
    assert_eq!(shutdown_grace(false, 0), Ok(Some(DEFAULT_GRACE)));
    assert_eq!(shutdown_grace(false, 5), Ok(Some(Duration::from_secs(5))));
    assert_eq!(shutdown_grace(true, 5), Ok(None));
    assert!(shutdown_grace(false, -1).is_err());
    assert_eq!(page_size(0), Ok(50));
    assert_eq!(page_size(5000), Ok(1000));
    assert!(page_size(-1).is_err());
}

#[test]
fn page_tokens_round_trip_and_reject_garbage() {
    let c = Cursor {
        created_nanos: 123,
        vm_id: "vm-abc".into(),
    };
    assert_eq!(page_token(&encode_page_token(&c)), Ok(Some(c)));
    assert_eq!(page_token(""), Ok(None));
    for bad in [
        "x",
        "!!!",
        &B64URL.encode("v2:1:a"),
        &B64URL.encode("v1:zz:a"),
        &B64URL.encode("v1:1:BAD"),
    ] {
        assert!(page_token(bad).is_err(), "{bad}");
    }
}

#[test]
fn vm_id_rules() {
    assert_eq!(existing_vm_id(""), Err(invalid("vm_id is required")));
    assert!(matches!(existing_vm_id("NOPE"), Err(Error::NotFound(_))));
}

fn caps() -> Limits {
    Limits::default()
}

fn refusal(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        other => panic!("expected invalid_argument, got {other:?}"),
    }
}

#[test]
fn config_size_cap_names_the_figure_and_the_variable() {
    assert_eq!(config_size(65_536, &caps()), Ok(()));
    assert_eq!(
        refusal(config_size(70_123, &caps())),
        "config is 70123 bytes encoded; at most 65536 (UNKEY_METALD_VM_MAX_CONFIG_BYTES)"
    );
}

#[test]
fn port_cap_counts_parsed_ports_once_each() {
    let list = |n: u16| (1..=n).map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let spec_with = |list: &str| {
        let mut c = ctrl_config();
        c.metadata.insert("exposed_ports".into(), list.into());
        vm_spec(Some(&c), 2).unwrap()
    };
    assert_eq!(port_count(&spec_with(&list(16)), &caps()), Ok(()));
    // Duplicates and spellings of one port are one port.
    let sixteen_and_repeats = format!("{},1,1/tcp,1/TCP", list(16));
    assert_eq!(
        port_count(&spec_with(&sixteen_and_repeats), &caps()),
        Ok(())
    );
    // udp is another port.
    assert_eq!(
        refusal(port_count(
            &spec_with(&format!("{},1/udp", list(16))),
            &caps()
        )),
        "config.metadata.exposed_ports has 17 ports; at most 16 (UNKEY_METALD_VM_MAX_PORTS)"
    );
    let none = Limits {
        max_ports: 0,
        ..caps()
    };
    assert!(port_count(&spec_with(""), &none).is_ok());
    assert!(port_count(&spec_with("80"), &none).is_err());
}

#[test]
fn a_long_port_list_is_parsed_in_linear_time() {
    // 65535 distinct tcp ports, then each again as udp: 131070 items (a 4 MiB config's worth).
    let list: Vec<String> = (1..=65535u32)
        .map(|p| p.to_string())
        .chain((1..=65535u32).map(|p| format!("{p}/udp")))
        .collect();
    let started = std::time::Instant::now();
    assert_eq!(exposed_ports(&list.join(",")).unwrap().len(), 131_070);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn grace_cap() {
    let c = caps();
    let s = Duration::from_secs;
    assert_eq!(bounded_grace(s(300), "timeout_seconds", &c), Ok(s(300)));
    assert_eq!(
        refusal(bounded_grace(s(301), "timeout_seconds", &c)),
        "timeout_seconds is 301 s; at most 300 s (UNKEY_METALD_MAX_GRACE)"
    );
    assert!(refusal(bounded_grace(s(301), "grace", &c)).starts_with("grace is 301 s"));
    // Below the default: the default is lowered to the cap (nobody asked for it), anything
    // else above the cap is refused.
    let short = Limits {
        max_grace: Duration::from_millis(10_500),
        ..caps()
    };
    assert_eq!(
        bounded_grace(DEFAULT_GRACE, "grace", &short),
        Ok(Duration::from_millis(10_500))
    );
    assert_eq!(
        refusal(bounded_grace(s(11), "timeout_seconds", &short)),
        "timeout_seconds is 11 s; at most 10s 500ms (UNKEY_METALD_MAX_GRACE)"
    );
}

#[test]
fn vms_per_customer_cap() {
    let two = Limits {
        max_vms_per_customer: 2,
        ..caps()
    };
    assert_eq!(vms_per_customer("alice", 2, &two), Ok(()));
    match vms_per_customer("alice", 3, &two) {
        Err(Error::ResourceExhausted(m)) => {
            assert!(m.contains("has 2 VMs"), "{m}");
            assert!(
                m.contains("at most 2 (UNKEY_METALD_MAX_VMS_PER_CUSTOMER)"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    let none = Limits {
        max_vms_per_customer: 0,
        ..caps()
    };
    assert_eq!(vms_per_customer("alice", 1_000_000, &none), Ok(()));
}
