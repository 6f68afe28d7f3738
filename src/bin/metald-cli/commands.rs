//! One function per command: builds the request, makes the calls, prints the result.

use std::time::Duration;

use metald::proto::vmprovisioner as pb;

use crate::cli::{
    Cli, Command, ConfigGenArgs, CreateArgs, Global, ListArgs, OverrideArgs, TlsMode, ValidateArgs,
};
use crate::client::{Client, Settings, Tls};
use crate::config_file::{self, ConfigFile};
use crate::error::CliError;
use crate::output::{self, id_and_state, print_json, print_text, to_json};
use crate::spinner::Spinner;
use crate::templates::{self, Overrides};
use crate::validate;

/// The server's grace period when a request gives none (spec §4.2).
const SERVER_DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// Time beyond a grace period for the server to kill, inspect and answer.
const GRACE_SLACK: Duration = Duration::from_secs(10);

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let g = cli.global;
    match cli.command {
        // These two never talk to the server.
        Command::ConfigGen(a) => config_gen(a),
        Command::ConfigValidate(a) => config_validate(a, g.json),
        command => {
            let client = Client::new(&settings(&g)?)?;
            remote(&client, &g, command).await
        }
    }
}

fn settings(g: &Global) -> Result<Settings, CliError> {
    for (flag, v) in [("--user", &g.user), ("--tenant", &g.tenant)] {
        if v.trim().is_empty() {
            return Err(CliError::Usage(format!("{flag} must not be empty")));
        }
    }
    let non_empty =
        |p: &Option<std::path::PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
    let tls = match g.tls_mode {
        TlsMode::Disabled => Tls::Disabled,
        TlsMode::File => Tls::File {
            cert: non_empty(&g.tls_cert),
            key: non_empty(&g.tls_key),
            ca: non_empty(&g.tls_ca),
        },
        TlsMode::Spiffe => {
            return Err(CliError::Usage(
                "--tls-mode spiffe is not supported by this metald-cli; use disabled or file (--tls-cert, --tls-key, --tls-ca)".into(),
            ))
        }
    };
    Ok(Settings {
        server: g.server.clone(),
        user: g.user.clone(),
        tenant: g.tenant.clone(),
        tls,
        timeout: g.timeout,
    })
}

async fn remote(client: &Client, g: &Global, command: Command) -> Result<(), CliError> {
    let json = g.json;
    match command {
        Command::Create(a) => create(client, g, &a, false).await,
        Command::CreateAndBoot(a) => create(client, g, &a, true).await,
        Command::Boot(a) => {
            let r: pb::BootVmResponse = client
                .call(
                    "BootVm",
                    &pb::BootVmRequest {
                        vm_id: a.vm_id.clone(),
                    },
                )
                .await?;
            lifecycle(json, &a.vm_id, &r, r.state)
        }
        Command::Pause(a) => {
            let r: pb::PauseVmResponse = client
                .call(
                    "PauseVm",
                    &pb::PauseVmRequest {
                        vm_id: a.vm_id.clone(),
                    },
                )
                .await?;
            lifecycle(json, &a.vm_id, &r, r.state)
        }
        Command::Resume(a) => {
            let r: pb::ResumeVmResponse = client
                .call(
                    "ResumeVm",
                    &pb::ResumeVmRequest {
                        vm_id: a.vm_id.clone(),
                    },
                )
                .await?;
            lifecycle(json, &a.vm_id, &r, r.state)
        }
        Command::Shutdown(a) => {
            let force = a.target.forced();
            let req = pb::ShutdownVmRequest {
                vm_id: a.target.vm_id.clone(),
                force,
                timeout_seconds: a.timeout_seconds.unwrap_or(0),
            };
            let grace = match a.timeout_seconds {
                _ if force => Duration::ZERO,
                Some(n) if n > 0 => Duration::from_secs(n.unsigned_abs().into()),
                _ => SERVER_DEFAULT_GRACE,
            };
            let r: pb::ShutdownVmResponse = client
                .call_with_deadline("ShutdownVm", &req, deadline(g, grace))
                .await?;
            lifecycle(json, &req.vm_id, &r, r.state)
        }
        Command::Reboot(a) => {
            let req = pb::RebootVmRequest {
                vm_id: a.vm_id.clone(),
                force: a.forced(),
            };
            let grace = if req.force {
                Duration::ZERO
            } else {
                SERVER_DEFAULT_GRACE
            };
            let r: pb::RebootVmResponse = client
                .call_with_deadline("RebootVm", &req, deadline(g, grace))
                .await?;
            lifecycle(json, &req.vm_id, &r, r.state)
        }
        Command::Delete(a) => {
            let req = pb::DeleteVmRequest {
                vm_id: a.vm_id.clone(),
                force: a.forced(),
            };
            let r: pb::DeleteVmResponse = client.call("DeleteVm", &req).await?;
            if json {
                let mut v = to_json(&r)?;
                v["vmId"] = req.vm_id.clone().into();
                v["deleted"] = true.into();
                return print_json(&v);
            }
            print_text(&format!("VM ID: {}\nDeleted: yes\n", req.vm_id))
        }
        Command::Info(a) => {
            let r: pb::GetVmInfoResponse = client
                .call("GetVmInfo", &pb::GetVmInfoRequest { vm_id: a.vm_id })
                .await?;
            if json {
                return print_json(&to_json(&r)?);
            }
            print_text(&output::info_text(&r))
        }
        Command::List(a) => list(client, json, &a).await,
        // Local commands never get here: `run` handles them without a client.
        Command::ConfigGen(_) | Command::ConfigValidate(_) => Ok(()),
    }
}

/// A call that waits out a grace period gets at least the grace plus some slack, so a long
/// `--timeout-seconds` is not cut short by the default 30 s deadline.
fn deadline(g: &Global, grace: Duration) -> Duration {
    if grace.is_zero() {
        g.timeout
    } else {
        g.timeout.max(grace + GRACE_SLACK)
    }
}

/// Compat lines for people, or `{vmId, success, state}` for scripts.
fn lifecycle<T: serde::Serialize>(
    json: bool,
    vm_id: &str,
    resp: &T,
    state: i32,
) -> Result<(), CliError> {
    if json {
        let mut v = to_json(resp)?;
        v["vmId"] = vm_id.into();
        return print_json(&v);
    }
    print_text(&id_and_state(vm_id, state))
}

fn overrides(a: &OverrideArgs) -> Overrides {
    Overrides {
        cpu: a.cpu,
        memory_mb: a.memory,
        docker_image: a.docker_image.clone(),
        env: a.env.clone(),
        ports: a.port.clone(),
    }
}

/// The config of create / create-and-boot: a file or a template, the flags over it, checked.
fn build_config(a: &CreateArgs) -> Result<ConfigFile, CliError> {
    let mut cfg = match &a.config {
        Some(path) => {
            let value = config_file::read_json(path)?;
            let name = config_file::display_name(path);
            config_file::check(&value, name)?;
            for w in validate::validate(&value).warnings {
                eprintln!("warning: {name}: {w}");
            }
            serde_json::from_value(value).map_err(|e| CliError::Invalid(format!("{name}: {e}")))?
        }
        None => {
            let name = a.template.as_deref().unwrap_or("standard");
            templates::template(name)
                .ok_or_else(|| CliError::Usage(format!("unknown template {name:?}")))?
        }
    };
    overrides(&a.overrides).apply(&mut cfg);
    let doc = serde_json::to_value(&cfg)
        .map_err(|e| CliError::Internal(format!("encoding config: {e}")))?;
    config_file::check(&doc, "config (with the flags applied)")?;
    Ok(cfg)
}

async fn create(client: &Client, g: &Global, a: &CreateArgs, boot: bool) -> Result<(), CliError> {
    let cfg = build_config(a)?;
    let req = pb::CreateVmRequest {
        vm_id: a.vm_id.clone().unwrap_or_default(),
        config: Some(cfg.to_vm_config()),
        customer_id: g.user.clone(),
    };
    let spinner = Spinner::start(boot, "creating VM");
    let created: pb::CreateVmResponse = client.call("CreateVm", &req).await?;
    let id = created.vm_id.clone();
    if !boot {
        drop(spinner);
        if g.json {
            return print_json(&to_json(&created)?);
        }
        let image = cfg.image().unwrap_or("-");
        return print_text(&format!(
            "{}Image: {image}\n",
            id_and_state(&id, created.state)
        ));
    }

    // Booted right after the create answered: the container exists once CreateVm returns.
    spinner.set(&format!("booting {id}"));
    let booted: pb::BootVmResponse = client
        .call("BootVm", &pb::BootVmRequest { vm_id: id.clone() })
        .await
        .map_err(|e| e.with_suffix(&format!(" (VM {id} was created but not booted)")))?;
    // Ports are only known once the VM runs; a failure here does not undo a good boot.
    spinner.set(&format!("reading {id}"));
    let info = client
        .call::<_, pb::GetVmInfoResponse>("GetVmInfo", &pb::GetVmInfoRequest { vm_id: id.clone() })
        .await;
    spinner.finish();
    let info = match info {
        Ok(i) => Some(i),
        Err(e) => {
            eprintln!("warning: VM {id} booted, but reading its info failed: {e}");
            None
        }
    };
    if g.json {
        let mut v = serde_json::json!({
            "vmId": id,
            "state": output::state_name(booted.state),
            "create": to_json(&created)?,
            "boot": to_json(&booted)?,
        });
        if let Some(i) = &info {
            v["info"] = to_json(i)?;
        }
        return print_json(&v);
    }
    let mut text = id_and_state(&id, booted.state);
    text.push_str(&format!("Image: {}\n", cfg.image().unwrap_or("-")));
    let ports = info
        .and_then(|i| i.network_info)
        .map(|n| n.port_mappings)
        .unwrap_or_default();
    for p in ports {
        let proto = if p.protocol.is_empty() {
            "tcp".into()
        } else {
            p.protocol
        };
        text.push_str(&format!(
            "Port:  {}/{proto} -> host port {}\n",
            p.container_port, p.host_port
        ));
    }
    print_text(&text)
}

async fn list(client: &Client, json: bool, a: &ListArgs) -> Result<(), CliError> {
    let mut req = pb::ListVmsRequest {
        state_filter: a.state.iter().map(|s| *s as i32).collect(),
        page_size: a.page_size.unwrap_or(0),
        page_token: a.page_token.clone().unwrap_or_default(),
    };
    let mut vms = Vec::new();
    let (next, total) = loop {
        let r: pb::ListVmsResponse = client.call("ListVms", &req).await?;
        vms.extend(r.vms);
        if !a.all || r.next_page_token.is_empty() {
            break (r.next_page_token, r.total_count);
        }
        // A server handing out the same token again would loop forever.
        if r.next_page_token == req.page_token {
            return Err(CliError::Server {
                code: "internal".into(),
                message: "ListVms returned the same next_page_token twice".into(),
            });
        }
        req.page_token = r.next_page_token;
    };
    if json {
        return print_json(&to_json(&pb::ListVmsResponse {
            vms,
            next_page_token: next,
            total_count: total,
        })?);
    }
    print_text(&output::list_table(&vms))?;
    // The count and the paging hint are for people: stderr keeps the table easy to parse.
    if next.is_empty() {
        eprintln!("{} of {total} VMs", vms.len());
    } else {
        eprintln!(
            "{} of {total} VMs; more with --all or --page-token {next}",
            vms.len()
        );
    }
    Ok(())
}

fn config_gen(a: ConfigGenArgs) -> Result<(), CliError> {
    let mut cfg = templates::template(&a.template)
        .ok_or_else(|| CliError::Usage(format!("unknown template {:?}", a.template)))?;
    overrides(&a.overrides).apply(&mut cfg);
    let doc = serde_json::to_value(&cfg)
        .map_err(|e| CliError::Internal(format!("encoding config: {e}")))?;
    config_file::check(&doc, "config (with the flags applied)")?;
    print_json(&doc)
}

fn config_validate(a: ValidateArgs, json: bool) -> Result<(), CliError> {
    let value = config_file::read_json(&a.file)?;
    let name = config_file::display_name(&a.file);
    let report = validate::validate(&value);
    let valid = report.problems.is_empty();
    let summary = if valid {
        serde_json::from_value::<ConfigFile>(value)
            .ok()
            .map(|c| summary(&c))
    } else {
        None
    };
    if json {
        print_json(&serde_json::json!({
            "file": name,
            "valid": valid,
            "summary": summary,
            "problems": report.problems,
            "warnings": report.warnings,
        }))?;
    } else {
        let mut text = match &summary {
            Some(s) => format!("{name}: valid ({s})\n"),
            None if valid => format!("{name}: valid\n"),
            None => format!("{name}: {} problem(s)\n", report.problems.len()),
        };
        for p in &report.problems {
            text.push_str(&format!("  {p}\n"));
        }
        for w in &report.warnings {
            text.push_str(&format!("warning: {w}\n"));
        }
        print_text(&text)?;
    }
    if valid {
        Ok(())
    } else {
        let list: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        Err(CliError::Invalid(format!(
            "{name} is not a valid config: {}",
            list.join("; ")
        )))
    }
}

fn summary(c: &ConfigFile) -> String {
    let vcpus = c.cpu.as_ref().map_or(0, |c| c.vcpu_count);
    let mb = c.memory.as_ref().map_or(0, |m| m.size_mb);
    format!(
        "image {}, {vcpus} vCPU, {}",
        c.image().unwrap_or("-"),
        output::bytes(mb.saturating_mul(config_file::MB))
    )
}
