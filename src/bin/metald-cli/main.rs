//! metald-cli: the command-line client of metald's VmService (spec §10).
//!
//! Modules: `cli` (flags and commands), `commands` (what each does), `client` (Connect over
//! HTTP), `config_file` and `templates` (where a VM's config comes from), `validate`, `report`
//! and `values` (how a config is checked), `output` and `spinner` (what people and scripts
//! see), `error` (one error line, exit codes 1/2/3).

mod cli;
mod client;
mod commands;
mod config_file;
mod error;
mod output;
mod report;
mod spinner;
mod templates;
mod validate;
mod values;

use clap::error::ErrorKind;
use clap::Parser as _;

use crate::error::{one_line, CliError};

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(clap_exit(&e)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&CliError::Internal(format!("starting the runtime: {e}"))),
    };
    if let Err(e) = runtime.block_on(commands::run(cli)) {
        fail(&e);
    }
}

fn fail(e: &CliError) -> ! {
    eprintln!("{e}");
    std::process::exit(e.exit_code())
}

/// Help and version print as clap renders them (exit 0; a bare `metald-cli` shows help, exit
/// 2). A usage error becomes the one-line `error: invalid_argument: …` of every other failure,
/// with the usage line of the command kept in it; exit 2.
fn clap_exit(e: &clap::Error) -> i32 {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            2
        }
        _ => {
            let rendered = e.render().to_string();
            let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("invalid command line");
            let message = first.strip_prefix("error:").unwrap_or(first).trim();
            let usage = rendered
                .lines()
                .find_map(|l| l.trim().strip_prefix("Usage:"))
                .map(|u| format!(" (usage: {}; see --help)", u.trim()))
                .unwrap_or_else(|| " (see --help)".into());
            eprintln!(
                "{}",
                CliError::Usage(format!("{}{usage}", one_line(message)))
            );
            2
        }
    }
}
