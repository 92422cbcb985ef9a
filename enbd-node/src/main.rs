//! `enbd-node`: the node daemon and its client commands.

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use enbd_node::cli::{AttachArgs, Cli, Command, DaemonArgs, LogFormat, PromoteArgs, ReplaceArgs};
use enbd_node::control::{self, ErrorKind, Request, Response, VolumeView};
use enbd_node::daemon::{self, DaemonConfig, ExtraService};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Daemon(args) => run_daemon(args),
        Command::Attach(args) => attach(args),
        Command::Detach(args) => client(
            &args.control.control_socket,
            Request::Detach {
                target: args.target,
            },
        ),
        Command::List(args) => list(&args.control.control_socket, args.json),
        Command::Resize(args) => client(
            &args.control.control_socket,
            Request::Resize {
                target: args.target,
            },
        ),
        Command::ResetChannel(args) => client(
            &args.control.control_socket,
            Request::ResetChannel {
                target: args.target,
                channel: args.channel,
            },
        ),
        Command::Promote(args) => promote(args),
        Command::Replace(args) => replace(args),
        Command::Bench(args) => enbd_node::bench::run_bench(args),
        Command::BenchResync(args) => enbd_node::bench::resync::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enbd-node: {e:#}");
            ExitCode::from(error_kind(&e).exit_code())
        }
    }
}

/// A failure the daemon classified (or the client could): its kind picks the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Classified {
    kind: ErrorKind,
    message: String,
}

/// The exit code class of a command's error (README: "Exit codes").
fn error_kind(e: &anyhow::Error) -> ErrorKind {
    if let Some(c) = e.downcast_ref::<Classified>() {
        return c.kind;
    }
    match e.downcast_ref::<control::ControlError>() {
        // No daemon to ask: try again once it runs.
        Some(control::ControlError::Connect { .. }) => return ErrorKind::Unavailable,
        Some(_) => return ErrorKind::Failed,
        None => {}
    }
    if e.downcast_ref::<enbd_node::cli::CliError>().is_some() {
        return ErrorKind::Invalid;
    }
    ErrorKind::Failed
}

/// Writes command output to stdout. A reader that went away (`enbd-node list | grep -q x`)
/// is not an error: the command stops quietly, as other Unix tools do.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

macro_rules! say {
    ($($arg:tt)*) => {
        emit(&format!("{}\n", format_args!($($arg)*)))
    };
}

fn init_logging(format: LogFormat, level: &str) {
    // RUST_LOG, when set, overrides --log-level (a debugging escape hatch).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colour only on a terminal: logs redirected to files stay plain text.
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Services beside the control socket. The CSI node service joins here when
/// `--csi-endpoint` is given.
fn extra_services(cfg: &DaemonConfig) -> anyhow::Result<Vec<ExtraService>> {
    let mut services: Vec<ExtraService> = Vec::new();
    if let Some(endpoint) = cfg.csi_endpoint.clone() {
        // A malformed endpoint is a start-up error, not a service failure later.
        enbd_node::csi::endpoint_path(&endpoint)?;
        let node = enbd_node::csi::NodeConfig {
            node_id: cfg.node_id.clone(),
            driver_name: cfg.driver_name.clone(),
            max_volumes: cfg.max_volumes,
        };
        services.push(Box::new(move |mgr, stop| {
            Box::pin(async move {
                enbd_node::csi::serve_csi(&endpoint, node, std::sync::Arc::new(mgr), stop).await?;
                Ok(())
            })
        }));
    }
    Ok(services)
}

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logging(args.log_format, &args.log_level);
    let cfg = DaemonConfig {
        node_id: args.node_id.unwrap_or_else(hostname),
        csi_endpoint: args.csi_endpoint,
        driver_name: args.driver_name,
        state_dir: args.state_dir,
        control_socket: args.control.control_socket,
        max_volumes: args.max_volumes,
        metrics_listen: args.metrics_listen,
        journal_bytes: args.journal_bytes,
        tls_default: args.tls,
        access_plaintext: args.access_token_plaintext,
        tls_files: args.tls_files.files()?,
        mgmt_tls: enbd_node::mgmt_tls::MgmtTlsFiles::from_flags(
            args.tls_files.tls_ca.clone(),
            args.tls_files.tls_cert.clone(),
            args.tls_files.tls_key.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    };
    let extra = extra_services(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("enbd-node")
        .build()
        .context("starting the Tokio runtime")?;
    let result = rt.block_on(daemon::run_daemon(cfg, extra));
    // The devices' IO paths run on this runtime until the process is gone. Shutting it down
    // (even in the background) would drop every queue's job channel first, and the ublk queue
    // threads would answer each request still in flight with EIO: a graceful stop (SIGTERM, a
    // DaemonSet rollout by `helm upgrade`) failed the application's writes. Left running, the
    // runtime ends with the process: the requests in flight stay uncommitted and the kernel
    // holds them for the next daemon's takeover (user recovery), exactly as after a SIGKILL.
    std::mem::forget(rt);
    result
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")
}

fn call(socket: &std::path::Path, req: Request) -> anyhow::Result<Response> {
    let rt = runtime()?;
    let resp = rt.block_on(control::call(socket, &req))?;
    if let Response::Error { message, kind } = resp {
        return Err(Classified { kind, message }.into());
    }
    Ok(resp)
}

fn client(socket: &std::path::Path, req: Request) -> anyhow::Result<()> {
    match call(socket, req)? {
        Response::Detached { volume_id } => say!("detached {volume_id}"),
        Response::Done => say!("ok"),
        Response::Resized {
            volume_id,
            size_bytes,
        } => say!(
            "{volume_id}: {} ({size_bytes} bytes)",
            enbd_proto::cli::human_bytes(size_bytes)
        ),
        other => say!("{}", serde_json::to_string(&other)?),
    }
}

fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let source = args.source()?;
    let req = Request::Attach {
        volume_id: args
            .volume_id
            .clone()
            .unwrap_or_else(|| source.export.clone()),
        servers: source.servers,
        export: source.export,
        channels: args.channels,
        queues: args.queues,
        queue_depth: args.queue_depth,
        brownout: args.brownout.clone(),
        read_only: args.read_only,
        replicas: args.replicas.clone(),
        replica_timeout: (!args.replicas.is_empty()).then(|| args.replica_timeout.clone()),
        tls: args.tls.map(|t| t.to_string()),
        resync_bandwidth: args.resync_bandwidth.clone(),
    };
    match call(&args.control.control_socket, req)? {
        Response::Attached {
            volume_id,
            device,
            size_bytes,
        } => {
            say!(
                "attached {volume_id} as {device} ({}, {size_bytes} bytes)",
                enbd_proto::cli::human_bytes(size_bytes)
            )
        }
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Promotes through the daemon that has the volume attached, or (with `--member`) directly
/// on the replicas' servers when no daemon has it.
fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    if !args.accept_data_loss {
        anyhow::bail!("{}", control::promote_warning(&args.volume, &args.replica));
    }
    if args.members.is_empty() {
        let req = Request::Promote {
            target: args.volume.clone(),
            replica: args.replica.clone(),
            accept_data_loss: true,
        };
        return match call(&args.control.control_socket, req)? {
            Response::Promoted {
                volume_id,
                replica,
                generation,
            } => {
                say!("{volume_id}: replica {replica} promoted (generation {generation})")
            }
            other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
        };
    }
    let replicas = args
        .members
        .iter()
        .map(|m| {
            enbd_node::backing::parse_replica(m).map(|r| enbd_node::engine::mirror::ReplicaConfig {
                id: r.id,
                nbd: r.nbd,
                mgmt: r.mgmt,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let cfg = enbd_node::engine::mirror::MirrorConfig::new(args.volume.clone(), replicas);
    let rec = runtime()?.block_on(enbd_node::engine::mirror::promote(&cfg, &args.replica))?;
    say!(
        "{}: replica {} promoted (generation {})",
        args.volume,
        args.replica,
        rec.generation
    )
}

/// Replaces a replica through the daemon that has the volume attached (its mirror makes the
/// full copy).
fn replace(args: ReplaceArgs) -> anyhow::Result<()> {
    control::bandwidth_arg(args.resync_bandwidth.as_deref()).map_err(anyhow::Error::msg)?;
    let new = enbd_node::backing::parse_replica(&args.with).map_err(anyhow::Error::msg)?;
    if !args.members.is_empty() {
        if args.resync_bandwidth.is_some() {
            anyhow::bail!(
                "--resync-bandwidth applies to an attached volume; without a daemon, give it to the next attach"
            );
        }
        let replicas = args
            .members
            .iter()
            .map(|m| enbd_node::backing::parse_replica(m).map(Into::into))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        let cfg = enbd_node::engine::mirror::MirrorConfig::new(args.volume.clone(), replicas);
        let done = runtime()?.block_on(enbd_node::engine::mirror::replace::replace_detached(
            &cfg,
            &args.replica,
            new.into(),
        ))?;
        return say!(
            "{}: replica {} replaced by {} (generation {}); the next attach copies it in full",
            args.volume,
            args.replica,
            args.with,
            done.record.generation
        );
    }
    let req = Request::Replace {
        target: args.volume.clone(),
        replica: args.replica.clone(),
        with: args.with.clone(),
        resync_bandwidth: args.resync_bandwidth.clone(),
    };
    match call(&args.control.control_socket, req)? {
        Response::Replaced {
            volume_id,
            replica,
            with,
            generation,
            created,
        } => {
            let how = if created { "created" } else { "found" };
            say!(
                "{volume_id}: replica {replica} replaced by {with} (generation {generation}; \
                 volume {how} there); it is resyncing a full copy: see `enbd-node list`"
            )
        }
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

fn list(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let Response::List { volumes } = call(socket, Request::List)? else {
        anyhow::bail!("unexpected answer from the daemon");
    };
    if json {
        // Machine-readable: sizes stay in bytes.
        return say!("{}", serde_json::to_string_pretty(&volumes)?);
    }
    emit(&list_table(&volumes))
}

/// The `list` table; sizes in binary units (`--json` gives bytes).
fn list_table(volumes: &[VolumeView]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<24} {:>10} {:<11} {:<9} {:<16} CHANNELS",
        "DEVICE", "VOLUME", "SIZE", "PHASE", "ENGINE", "BROWNOUT"
    );
    for v in volumes {
        let _ = writeln!(
            out,
            "{:<14} {:<24} {:>10} {:<11} {:<9} {:<16} {}",
            v.device,
            v.volume_id,
            enbd_proto::cli::human_bytes(v.size_bytes),
            v.phase,
            v.engine,
            v.brownout,
            channels(v)
        );
        if let Some(why) = &v.waiting {
            let _ = writeln!(out, "  waiting: {why}");
        }
        for r in &v.replicas {
            let _ = writeln!(out, "  replica {}", replica_line(r));
        }
    }
    out
}

/// `a 10.0.0.1:10809 gen 3 resyncing 12.0MiB/100.0MiB at 3.1MiB/s`
fn replica_line(r: &control::ReplicaView) -> String {
    use enbd_proto::cli::human_bytes;
    let mut line = format!("{} {} gen {} {}", r.id, r.address, r.generation, r.state);
    if let (Some(to_copy), Some(copied), Some(rate)) = (r.to_copy, r.copied, r.bytes_per_sec) {
        line.push_str(&format!(
            " {}/{} at {}/s",
            human_bytes(copied),
            human_bytes(to_copy),
            human_bytes(rate)
        ));
    }
    if r.state != "in-sync"
        && let Some(e) = &r.last_error
    {
        line.push_str(&format!(" ({e})"));
    }
    line
}

fn channels(v: &VolumeView) -> String {
    v.channels
        .iter()
        .map(|c| format!("{}:{}", c.index, c.state))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, state: &str) -> control::ReplicaView {
        control::ReplicaView {
            id: id.into(),
            address: "10.0.0.1:10809".into(),
            mgmt: "10.0.0.1:10810".into(),
            generation: 3,
            state: state.into(),
            to_copy: (state == "resyncing").then_some(100 << 20),
            copied: (state == "resyncing").then_some(12 << 20),
            bytes_per_sec: (state == "resyncing").then_some(3 << 20),
            reads: 0,
            writes: 0,
            last_error: None,
        }
    }

    /// Scripts (the VM scenarios, operators' `awk`) read the table by column: every cell is
    /// one word, and a volume's `waiting:` and `replica` lines follow its own row.
    #[test]
    fn list_table_keeps_one_word_per_column() {
        let volume = VolumeView {
            volume_id: "mvol".into(),
            device: "/dev/ublkb0".into(),
            size_bytes: 10 << 30,
            servers: vec![],
            export: "mvol".into(),
            read_only: false,
            brownout: "wait".into(),
            phase: "attached".into(),
            engine: "Waiting".into(),
            channels: vec![],
            replicas: vec![replica("a", "in-sync"), replica("b", "resyncing")],
            generation: Some(3),
            waiting: Some("no in-sync replica reachable: a down".into()),
            activity_regions: None,
            activity_unsynced: None,
        };
        let table = list_table(&[volume]);
        let lines: Vec<&str> = table.lines().collect();
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row[..5],
            ["/dev/ublkb0", "mvol", "10.0GiB", "attached", "Waiting"]
        );
        assert_eq!(lines[2], "  waiting: no in-sync replica reachable: a down");
        let b: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            b[..7],
            [
                "replica",
                "b",
                "10.0.0.1:10809",
                "gen",
                "3",
                "resyncing",
                "12.0MiB/100.0MiB"
            ]
        );
        assert_eq!(lines.len(), 5, "{table}");
    }
}
