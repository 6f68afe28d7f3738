//! The command line (spec §10): global flags with their compat environment fallbacks, accepted
//! before or after the command, and every command with an example in its `--help`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use metald::proto::vmprovisioner::VmState;

use crate::templates::TEMPLATE_NAMES;
use crate::values::{parse_port, valid_env_key};

const EXAMPLES: &str = "\
Examples:
  metald-cli create-and-boot --template minimal --docker-image nginx:alpine --port 80/tcp
  metald-cli --server http://metald:8080 --user alice list --state running
  metald-cli info vm-01jq3v6t0d3b7gq2k9m8x4c5yz --json
  metald-cli config-gen --template standard > vm.json && metald-cli config-validate vm.json

Exit codes: 0 ok, 1 the server (or a config check) refused, 2 usage error, 3 server unreachable.";

#[derive(Debug, Parser)]
#[command(
    name = "metald-cli",
    version,
    about = "Command-line client of metald's VmService (VMs that are Docker containers)",
    after_help = EXAMPLES,
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags of every command; `global = true` lets them follow the command too.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// metald's address
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_SERVER_ADDRESS",
        default_value = "http://localhost:8080"
    )]
    pub server: String,
    /// Caller identity, sent as `Authorization: Bearer dev_user_<USER>`
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_USER_ID",
        default_value = "cli-user"
    )]
    pub user: String,
    /// Sent as `X-Tenant-ID`
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_TENANT_ID",
        default_value = "cli-tenant"
    )]
    pub tenant: String,
    /// TLS towards metald
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_TLS_MODE",
        ignore_case = true,
        value_enum,
        default_value = "disabled"
    )]
    pub tls_mode: TlsMode,
    /// Client certificate (PEM) for --tls-mode file
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_TLS_CERT_FILE",
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for --tls-mode file
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_TLS_KEY_FILE",
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that signed metald's certificate; the only trust anchor when given
    #[arg(
        long,
        global = true,
        hide_env_values = true,
        env = "UNKEY_METALD_TLS_CA_FILE",
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,
    /// Deadline of each call (`30s`, `2m`, or seconds); sent as Connect-Timeout-Ms
    #[arg(long, global = true, default_value = "30s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print one JSON document on stdout (enum names, proto3 canonical field names)
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    Disabled,
    File,
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a VM (CreateVm); it is not started
    #[command(
        after_help = "Examples:\n  metald-cli create --template minimal --docker-image nginx:alpine\n  metald-cli create my-vm --config examples/configs/standard.json --memory 256"
    )]
    Create(CreateArgs),
    /// Create a VM and boot it at once (CreateVm, BootVm, then GetVmInfo for its ports)
    #[command(
        after_help = "Examples:\n  metald-cli create-and-boot --template minimal --docker-image nginx:alpine --port 80/tcp\n  metald-cli create-and-boot --config vm.json --env PORT=8080 --port 8080/tcp --json"
    )]
    CreateAndBoot(CreateArgs),
    /// Start a created or stopped VM (BootVm)
    #[command(after_help = "Example:\n  metald-cli boot vm-01jq3v6t0d3b7gq2k9m8x4c5yz")]
    Boot(IdArgs),
    /// Stop a VM (ShutdownVm): the stop signal, then a kill after the grace period
    #[command(
        after_help = "Examples:\n  metald-cli shutdown vm-01jq3v6t0d3b7gq2k9m8x4c5yz --timeout-seconds 5\n  metald-cli shutdown vm-01jq3v6t0d3b7gq2k9m8x4c5yz force"
    )]
    Shutdown(ShutdownArgs),
    /// Freeze a running VM (PauseVm)
    #[command(after_help = "Example:\n  metald-cli pause vm-01jq3v6t0d3b7gq2k9m8x4c5yz")]
    Pause(IdArgs),
    /// Unfreeze a paused VM (ResumeVm)
    #[command(after_help = "Example:\n  metald-cli resume vm-01jq3v6t0d3b7gq2k9m8x4c5yz")]
    Resume(IdArgs),
    /// Restart a running VM (RebootVm)
    #[command(
        after_help = "Examples:\n  metald-cli reboot vm-01jq3v6t0d3b7gq2k9m8x4c5yz\n  metald-cli reboot vm-01jq3v6t0d3b7gq2k9m8x4c5yz --force"
    )]
    Reboot(ForceArgs),
    /// Remove a VM (DeleteVm); a running one needs force
    #[command(
        after_help = "Examples:\n  metald-cli delete vm-01jq3v6t0d3b7gq2k9m8x4c5yz\n  metald-cli delete vm-01jq3v6t0d3b7gq2k9m8x4c5yz force"
    )]
    Delete(ForceArgs),
    /// Show a VM: state, config, network and port mappings, metrics, backend (GetVmInfo)
    #[command(
        after_help = "Examples:\n  metald-cli info vm-01jq3v6t0d3b7gq2k9m8x4c5yz\n  metald-cli info vm-01jq3v6t0d3b7gq2k9m8x4c5yz --json | jq '.networkInfo.portMappings'"
    )]
    Info(IdArgs),
    /// List your VMs, newest first (ListVms)
    #[command(
        after_help = "Examples:\n  metald-cli list\n  metald-cli list --state running --state paused --all --json"
    )]
    List(ListArgs),
    /// Print a template as a config file (JSON) on stdout
    #[command(
        after_help = "Examples:\n  metald-cli config-gen --template high-memory > vm.json\n  metald-cli config-gen --template minimal --docker-image nginx:alpine --port 80/tcp | metald-cli config-validate -"
    )]
    ConfigGen(ConfigGenArgs),
    /// Check a config file without calling the server; names every problem at once
    #[command(
        after_help = "Examples:\n  metald-cli config-validate examples/configs/standard.json\n  metald-cli config-gen | metald-cli config-validate -"
    )]
    ConfigValidate(ValidateArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM id to use (1-63 chars of a-z 0-9 _ . -); metald makes one when omitted
    pub vm_id: Option<String>,
    /// A config file (JSON, spec §10 format); `-` reads stdin
    #[arg(long, value_name = "FILE", conflicts_with = "template")]
    pub config: Option<String>,
    /// A built-in config (default: standard)
    #[arg(long, value_parser = TEMPLATE_NAMES)]
    pub template: Option<String>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

/// Flags laid over a template or config file.
#[derive(Debug, Args)]
#[command(next_help_heading = "Config options")]
pub struct OverrideArgs {
    /// vCPU count
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub cpu: Option<i32>,
    /// Memory in MB (1 MB = 1024 x 1024 bytes)
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(i64).range(1..=i64::MAX / (1024 * 1024)))]
    pub memory: Option<i64>,
    /// Container image, replacing the config's
    #[arg(long, value_name = "IMG")]
    pub docker_image: Option<String>,
    /// Environment variable for the VM (repeatable)
    #[arg(long, value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Port to publish on the host: N, N/tcp or N/udp (repeatable)
    #[arg(long, value_name = "PORT", value_parser = parse_port_arg)]
    pub port: Vec<String>,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    pub vm_id: String,
}

#[derive(Debug, Args)]
pub struct ForceArgs {
    pub vm_id: String,
    /// `force` as a third word, as older scripts write it
    #[arg(value_name = "force", value_parser = ["force"], hide_possible_values = true)]
    pub force_word: Option<String>,
    /// Do not wait: kill at once
    #[arg(long)]
    pub force: bool,
}

impl ForceArgs {
    pub fn forced(&self) -> bool {
        self.force || self.force_word.is_some()
    }
}

#[derive(Debug, Args)]
pub struct ShutdownArgs {
    #[command(flatten)]
    pub target: ForceArgs,
    /// Grace period before the kill (0 = the server's default, 30 s)
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i32).range(0..))]
    pub timeout_seconds: Option<i32>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only VMs in these states: created, running, paused, shutdown (repeatable or comma list)
    #[arg(long, value_name = "STATE", value_parser = parse_state, value_delimiter = ',')]
    pub state: Vec<VmState>,
    /// VMs per page (the server's default is 50, its maximum 1000)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub page_size: Option<i32>,
    /// Start at this page (a next_page_token of an earlier list)
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<String>,
    /// Follow next_page_token until the last page
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct ConfigGenArgs {
    /// The template to print
    #[arg(long, value_parser = TEMPLATE_NAMES, default_value = "standard")]
    pub template: String,
    #[command(flatten)]
    pub overrides: OverrideArgs,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The config file; `-` or nothing reads stdin
    #[arg(value_name = "FILE", default_value = "-")]
    pub file: String,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if !valid_env_key(k) {
        return Err(format!(
            "{k:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Normalised to `N/proto`, so that `8080` and `8080/tcp` are recognised as one port.
fn parse_port_arg(s: &str) -> Result<String, String> {
    parse_port(s).map(|(n, proto)| format!("{n}/{proto}"))
}

fn parse_state(s: &str) -> Result<VmState, String> {
    let upper = s.trim().to_ascii_uppercase();
    let name = if upper.starts_with("VM_STATE_") {
        upper
    } else {
        format!("VM_STATE_{upper}")
    };
    match VmState::from_str_name(&name) {
        Some(VmState::Unspecified) | None => Err(format!(
            "{s:?} is not one of created, running, paused, shutdown"
        )),
        Some(state) => Ok(state),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert!(parse_timeout("0s").is_err());
        assert_eq!(parse_state("running"), Ok(VmState::Running));
        assert_eq!(parse_state("VM_STATE_PAUSED"), Ok(VmState::Paused));
        assert!(parse_state("unspecified").is_err());
        assert_eq!(parse_port_arg("8080"), Ok("8080/tcp".into()));
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("1=x").is_err());
    }
}
