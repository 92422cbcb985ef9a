//! `csi-driver` binary: parse flags, set up logging, run until SIGTERM/SIGINT; or, with an
//! operator subcommand, make that one call to the running controller.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use csi_driver::cli::{Cli, Command, LogFormat};
use csi_driver::config::Config;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, level: &str) {
    // RUST_LOG, when set, overrides --log-level (a debugging escape hatch).
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    // Colour only on a terminal: logs collected from a pipe or file stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::PrepareReplacement(args)) = &cli.command {
        let socket = csi_driver::config::parse_socket_path(&cli.endpoint)?;
        let done = csi_driver::admin_client::prepare_replacement(socket, args).await?;
        print!("{}", csi_driver::admin_client::describe(args, &done));
        return Ok(());
    }
    init_logging(cli.log_format, &cli.log_level);
    let config = Config::from_cli(&cli).context("invalid command line")?;

    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            shutdown.cancel();
        }
    });

    csi_driver::serve::run(config, shutdown, |ready| {
        // One machine-readable line on stdout: scripts and tests wait for it.
        // Whoever reads it may close the pipe afterwards, so errors are ignored.
        let metrics = ready
            .metrics
            .map_or_else(|| "off".to_owned(), |a| a.to_string());
        let line = format!(
            "csi-driver ready socket={} metrics={metrics}\n",
            ready.socket.display()
        );
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
    })
    .await
    .context("csi-driver failed")
}
