//! The nine VmService handlers: wire request → one service call → wire response.

use std::sync::Arc;
use std::time::SystemTime;

use crate::proto::vmprovisioner as pb;
use crate::service::{Caller, CreateVm, Error, VmService};
use crate::vm::state::Op;
use crate::vm::{self, Usage, VmSnapshot, VmState};

pub async fn create_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::CreateVmRequest,
) -> Result<pb::CreateVmResponse, Error> {
    let vm = svc
        .create(
            &caller,
            CreateVm {
                vm_id: req.vm_id,
                customer_id: req.customer_id,
                config: req.config,
            },
        )
        .await?;
    Ok(pb::CreateVmResponse {
        vm_id: vm.vm_id.to_string(),
        state: wire_state(vm.state) as i32,
    })
}

pub async fn boot_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::BootVmRequest,
) -> Result<pb::BootVmResponse, Error> {
    let state = svc.apply(&caller, &req.vm_id, Op::Boot).await?;
    Ok(pb::BootVmResponse {
        success: true,
        state: after(state),
    })
}

pub async fn shutdown_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::ShutdownVmRequest,
) -> Result<pb::ShutdownVmResponse, Error> {
    let grace = crate::service::validate::shutdown_grace(req.force, req.timeout_seconds)?;
    let state = svc
        .apply(&caller, &req.vm_id, Op::Shutdown { grace })
        .await?;
    Ok(pb::ShutdownVmResponse {
        success: true,
        state: after(state),
    })
}

pub async fn pause_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::PauseVmRequest,
) -> Result<pb::PauseVmResponse, Error> {
    let state = svc.apply(&caller, &req.vm_id, Op::Pause).await?;
    Ok(pb::PauseVmResponse {
        success: true,
        state: after(state),
    })
}

pub async fn resume_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::ResumeVmRequest,
) -> Result<pb::ResumeVmResponse, Error> {
    let state = svc.apply(&caller, &req.vm_id, Op::Resume).await?;
    Ok(pb::ResumeVmResponse {
        success: true,
        state: after(state),
    })
}

pub async fn reboot_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::RebootVmRequest,
) -> Result<pb::RebootVmResponse, Error> {
    let grace = if req.force {
        None
    } else {
        Some(crate::service::validate::DEFAULT_GRACE)
    };
    let state = svc.apply(&caller, &req.vm_id, Op::Reboot { grace }).await?;
    Ok(pb::RebootVmResponse {
        success: true,
        state: after(state),
    })
}

pub async fn delete_vm(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::DeleteVmRequest,
) -> Result<pb::DeleteVmResponse, Error> {
    svc.apply(&caller, &req.vm_id, Op::Delete { force: req.force })
        .await?;
    Ok(pb::DeleteVmResponse { success: true })
}

pub async fn get_vm_info(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::GetVmInfoRequest,
) -> Result<pb::GetVmInfoResponse, Error> {
    let vm = svc.info(&caller, &req.vm_id)?;
    let usage = svc.usage(&vm.vm_id);
    Ok(vm_info_response(&vm, usage, SystemTime::now()))
}

pub async fn list_vms(
    svc: Arc<VmService>,
    caller: Caller,
    req: pb::ListVmsRequest,
) -> Result<pb::ListVmsResponse, Error> {
    let mut states = Vec::with_capacity(req.state_filter.len());
    for raw in &req.state_filter {
        match pb::VmState::try_from(*raw) {
            Ok(pb::VmState::Unspecified) => {}
            Ok(s) => states.extend(domain_state(s)),
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "state_filter: {raw} is not a VmState"
                )))
            }
        }
    }
    let page = svc.list(&caller, &states, req.page_size, &req.page_token)?;
    Ok(pb::ListVmsResponse {
        vms: page.vms.iter().map(|vm| vm_info(vm)).collect(),
        next_page_token: page.next_page_token,
        total_count: page.total_count.min(i32::MAX as usize) as i32,
    })
}

fn after(state: Option<VmState>) -> i32 {
    state.map(wire_state).unwrap_or(pb::VmState::Unspecified) as i32
}

pub fn wire_state(s: VmState) -> pb::VmState {
    match s {
        VmState::Created => pb::VmState::Created,
        VmState::Running => pb::VmState::Running,
        VmState::Paused => pb::VmState::Paused,
        VmState::Shutdown => pb::VmState::Shutdown,
    }
}

fn domain_state(s: pb::VmState) -> Option<VmState> {
    match s {
        pb::VmState::Unspecified => None,
        pb::VmState::Created => Some(VmState::Created),
        pb::VmState::Running => Some(VmState::Running),
        pb::VmState::Paused => Some(VmState::Paused),
        pb::VmState::Shutdown => Some(VmState::Shutdown),
    }
}

fn vm_info(vm: &VmSnapshot) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: vm.vm_id.to_string(),
        state: wire_state(vm.state) as i32,
        vcpu_count: vm
            .config
            .cpu
            .as_ref()
            .map(|c| c.vcpu_count)
            .unwrap_or_default(),
        memory_size_bytes: vm
            .config
            .memory
            .as_ref()
            .map(|m| m.size_bytes)
            .unwrap_or_default(),
        created_timestamp: vm::unix_seconds(vm.created_at),
        modified_timestamp: vm::unix_seconds(vm.modified_at),
        metadata: vm.config.metadata.clone(),
        customer_id: vm.customer_id.clone(),
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

fn vm_info_response(
    vm: &VmSnapshot,
    usage: Option<Usage>,
    now: SystemTime,
) -> pb::GetVmInfoResponse {
    let mut backend_info = std::collections::BTreeMap::from([
        ("backend".to_owned(), "docker".to_owned()),
        ("container_id".to_owned(), vm.container_id.clone()),
        ("container_name".to_owned(), vm.container_name.clone()),
        ("image".to_owned(), vm.image.clone()),
        ("docker_state".to_owned(), vm.docker_status.clone()),
        ("network".to_owned(), vm.network.network.clone()),
        ("created_at".to_owned(), rfc3339(vm.created_at)),
    ]);
    if let Some(t) = vm.started_at {
        backend_info.insert("started_at".into(), rfc3339(t));
    }
    if vm.state == VmState::Shutdown {
        if let Some(t) = vm.finished_at {
            backend_info.insert("finished_at".into(), rfc3339(t));
        }
        if let Some(code) = vm.exit_code {
            backend_info.insert("exit_code".into(), code.to_string());
        }
    }
    let net = &vm.network;
    let network_info = pb::VmNetworkInfo {
        ip_address: net.ip_address.clone(),
        mac_address: net.mac_address.clone(),
        tap_device: net.network.clone(),
        network_namespace: String::new(),
        gateway: net.gateway.clone(),
        dns_servers: Vec::new(),
        port_mappings: net
            .ports
            .iter()
            .map(|p| pb::PortMapping {
                container_port: i32::from(p.container_port),
                host_port: i32::from(p.host_port),
                protocol: p.protocol.clone(),
            })
            .collect(),
    };
    // Usage comes from the collector's latest sample (never a stats call here). Until the VM
    // has been sampled there are no metrics: zeros would read as a measurement.
    let metrics = usage
        .filter(|_| matches!(vm.state, VmState::Running | VmState::Paused))
        .map(|u| pb::VmMetrics {
            cpu_usage_percent: u.cpu_percent,
            memory_usage_bytes: u.memory_bytes,
            network_stats: Some(pb::NetworkStats {
                bytes_received: u.net_rx_bytes,
                bytes_transmitted: u.net_tx_bytes,
                packets_received: u.net_rx_packets,
                packets_transmitted: u.net_tx_packets,
            }),
            storage_stats: Some(pb::StorageStats {
                bytes_read: u.disk_read_bytes,
                bytes_written: u.disk_write_bytes,
                read_operations: u.disk_read_ops,
                write_operations: u.disk_write_ops,
            }),
            uptime_seconds: vm.uptime_seconds(now),
        });
    pb::GetVmInfoResponse {
        vm_id: vm.vm_id.to_string(),
        config: Some((*vm.config).clone()),
        state: wire_state(vm.state) as i32,
        metrics,
        backend_info,
        network_info: Some(network_info),
    }
}
