//! The container labels that make a container a VM: everything needed to answer every RPC
//! after a restart (spec §5, §6). Docker labels are the only VM store.

use std::collections::HashMap;

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine as _;

/// Compat: the VM id.
pub const VM_ID: &str = "unkey.vm.id";
/// Compat: marks containers made by metald.
pub const CREATED_BY: &str = "unkey.vm.created_by";
pub const CREATED_BY_VALUE: &str = "metald";
/// Which metald instance (scope) owns the container.
pub const SCOPE: &str = "unkey.vm.scope";
pub const CUSTOMER: &str = "unkey.vm.customer_id";
/// The VmConfig as given at create, proto-encoded, base64.
pub const CONFIG: &str = "unkey.vm.config";
/// Creation time, Unix nanoseconds.
pub const CREATED_AT: &str = "unkey.vm.created_at";

/// The scope used when none is configured; its containers keep the compat name.
pub const DEFAULT_SCOPE: &str = "default";

/// The scope a container's labels name; `default` when there is none. (The old service's
/// containers carry none either, but [`is_legacy`] keeps them out before the scope matters.)
pub fn scope_of(labels: &HashMap<String, String>) -> &str {
    labels.get(SCOPE).map_or(DEFAULT_SCOPE, String::as_str)
}

/// Whether the labels are those of a container made by the service we replace: its two compat
/// labels and none of ours. Such containers are left alone: not VMs of any scope here (no
/// owner, no config to answer with), and never reaped (they ran customers' workloads).
pub fn is_legacy(labels: &HashMap<String, String>) -> bool {
    labels.contains_key(VM_ID)
        && labels.get(CREATED_BY).map(String::as_str) == Some(CREATED_BY_VALUE)
        && ![SCOPE, CUSTOMER, CONFIG, CREATED_AT]
            .iter()
            .any(|key| labels.contains_key(*key))
}

/// A VM's identity as stored on its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLabels {
    pub vm_id: String,
    pub scope: String,
    pub customer_id: String,
    /// The encoded VmConfig (opaque here).
    pub config: Vec<u8>,
    pub created_at_nanos: i64,
}

impl VmLabels {
    pub fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            (VM_ID.to_owned(), self.vm_id.clone()),
            (CREATED_BY.to_owned(), CREATED_BY_VALUE.to_owned()),
            (SCOPE.to_owned(), self.scope.clone()),
            (CUSTOMER.to_owned(), self.customer_id.clone()),
            (CONFIG.to_owned(), B64.encode(&self.config)),
            (CREATED_AT.to_owned(), self.created_at_nanos.to_string()),
        ])
    }

    /// Reads the labels back; `Err` names what is missing or broken.
    pub fn from_map(labels: &HashMap<String, String>) -> Result<Self, String> {
        let get = |key: &str| {
            labels
                .get(key)
                .ok_or_else(|| format!("label {key} missing"))
        };
        if get(CREATED_BY)? != CREATED_BY_VALUE {
            return Err(format!("label {CREATED_BY} is not {CREATED_BY_VALUE}"));
        }
        let vm_id = get(VM_ID)?.clone();
        let scope = scope_of(labels).to_owned();
        let customer_id = get(CUSTOMER)?.clone();
        let config = B64
            .decode(get(CONFIG)?)
            .map_err(|e| format!("label {CONFIG} is not base64: {e}"))?;
        let created_at_nanos = get(CREATED_AT)?
            .parse()
            .map_err(|e| format!("label {CREATED_AT} is not a number: {e}"))?;
        Ok(Self {
            vm_id,
            scope,
            customer_id,
            config,
            created_at_nanos,
        })
    }
}

/// The container name of a VM: `unkey-vm-<vm_id>` (compat) in the default scope,
/// `unkey-vm-<scope>-<vm_id>` otherwise, so two scopes never collide.
pub fn container_name(scope: &str, vm_id: &str) -> String {
    if scope == DEFAULT_SCOPE {
        format!("unkey-vm-{vm_id}")
    } else {
        format!("unkey-vm-{scope}-{vm_id}")
    }
}

/// The name prefix of this scope's containers, for finding leftovers of interrupted creates.
pub fn name_prefix(scope: &str) -> String {
    if scope == DEFAULT_SCOPE {
        "unkey-vm-".to_owned()
    } else {
        format!("unkey-vm-{scope}-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmLabels {
        VmLabels {
            vm_id: "vm-1".into(),
            scope: "test".into(),
            customer_id: "alice".into(),
            config: vec![0, 1, 2, 255],
            created_at_nanos: 1_700_000_000_123_456_789,
        }
    }

    #[test]
    fn round_trips() {
        let labels = sample();
        assert_eq!(VmLabels::from_map(&labels.to_map()), Ok(labels));
    }

    #[test]
    fn names_what_is_missing() {
        let mut map = sample().to_map();
        map.remove(CUSTOMER);
        assert_eq!(
            VmLabels::from_map(&map),
            Err("label unkey.vm.customer_id missing".into())
        );
        let mut map = sample().to_map();
        map.insert(CONFIG.into(), "%%%".into());
        assert!(VmLabels::from_map(&map).unwrap_err().contains("not base64"));
    }

    #[test]
    fn a_missing_scope_label_reads_as_the_default_scope() {
        let mut map = sample().to_map();
        map.remove(SCOPE);
        assert_eq!(VmLabels::from_map(&map).unwrap().scope, DEFAULT_SCOPE);
    }

    #[test]
    fn the_old_services_containers_are_legacy_and_no_vms() {
        let old = HashMap::from([
            (VM_ID.to_owned(), "ud-123".to_owned()),
            (CREATED_BY.to_owned(), CREATED_BY_VALUE.to_owned()),
        ]);
        assert!(is_legacy(&old));
        assert!(VmLabels::from_map(&old).is_err());
        assert!(!is_legacy(&sample().to_map()));
        let mut half = sample().to_map();
        half.remove(CONFIG);
        assert!(
            !is_legacy(&half),
            "one of our labels makes it ours (a broken one)"
        );
        assert!(!is_legacy(&HashMap::new()));
    }

    #[test]
    fn names_include_non_default_scope() {
        assert_eq!(container_name("default", "vm-1"), "unkey-vm-vm-1");
        assert_eq!(container_name("ci-7", "vm-1"), "unkey-vm-ci-7-vm-1");
        assert!(container_name("ci-7", "vm-1").starts_with(&name_prefix("ci-7")));
    }
}
