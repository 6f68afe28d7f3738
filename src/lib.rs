//! metald-rs: creates, boots, pauses and deletes VMs over ConnectRPC; every VM is a Docker
//! container.
//!
//! Layers, top to bottom: [`api`] (the wire: HTTP, Connect/gRPC/gRPC-Web, proto messages) →
//! [`service`] (tenancy, validation, the lifecycle state machine) → [`backend`] (Docker,
//! through bollard); [`billing`] sits beside the service and meters what runs. [`vm`] holds the domain types all of them share. [`server`] wires them
//! together; [`config`] and [`telemetry`] serve the binary.

pub mod api;
pub mod backend;
pub mod billing;
pub mod config;
pub mod listener;
pub mod peer_guard;
pub mod proto;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
pub mod vm;
