//! Generated wire types (prost messages with pbjson canonical JSON). Used by `api/`, the
//! CLI, and as the stored config document (`VmConfig`) of the service.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `metal.vmprovisioner.v1`.
pub mod vmprovisioner {
    include!(concat!(env!("OUT_DIR"), "/metal.vmprovisioner.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/metal.vmprovisioner.v1.serde.rs"));
}

/// `deploy.billaged.v1`.
pub mod billing {
    include!(concat!(env!("OUT_DIR"), "/deploy.billaged.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/deploy.billaged.v1.serde.rs"));
}
