//! The metald binary: arguments, configuration, logging, then the server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// metald: VM provisioning over ConnectRPC, every VM a Docker container.
///
/// Configuration: built-in defaults, then the TOML file (--config or UNKEY_METALD_CONFIG_FILE),
/// then UNKEY_METALD_* environment variables. `--print-config` shows the result.
#[derive(Parser, Debug)]
#[command(name = "metald", version, about, long_about = None)]
struct Args {
    /// TOML configuration file (keys as in --print-config).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match metald::config::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metald: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    // Before the server starts: its connection bounds are derived from the raised limit.
    let fd_limit = metald::listener::fd_limit::raise();
    let telemetry = metald::telemetry::init(&config.log_level, &config.otel);
    match fd_limit {
        Ok((before, after)) => tracing::info!(
            soft_before = before.soft,
            soft = after.soft,
            hard = after.hard,
            "open-file limit"
        ),
        // Not fatal: the connection bounds are derived from whatever the limit is.
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metald: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((config.address, config.port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {}:{}: {e}", config.address, config.port)
            })?;
        metald::server::run(listener, config, metald::server::shutdown_signal()).await
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "metald failed");
        eprintln!("metald: {e:#}");
    }
    // Off the runtime: the span exporter's blocking client shuts down on this thread.
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
