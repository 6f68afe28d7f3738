//! What one request may ask for (spec §5.1): VMs run customers' code, and callers may be
//! buggy, so no single call may publish thousands of ports, store megabytes in labels, hold
//! a VM for an hour's grace, or make VMs without end.

use std::time::Duration;

/// The caps, from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Exposed ports per VM (`UNKEY_METALD_VM_MAX_PORTS`).
    pub max_ports: usize,
    /// The stored (encoded) VmConfig, in bytes (`UNKEY_METALD_VM_MAX_CONFIG_BYTES`).
    pub max_config_bytes: usize,
    /// Longest ShutdownVm/RebootVm grace (`UNKEY_METALD_MAX_GRACE`).
    pub max_grace: Duration,
    /// Live VMs per customer; 0 = no limit (`UNKEY_METALD_MAX_VMS_PER_CUSTOMER`).
    pub max_vms_per_customer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_ports: 16,
            max_config_bytes: 64 * 1024,
            max_grace: Duration::from_secs(300),
            max_vms_per_customer: 1000,
        }
    }
}
