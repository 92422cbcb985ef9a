//! Command line of `enbd-node`: the daemon, and the standalone client commands (the old ENBD
//! client daemon's job) that talk to it over the control socket. Every flag is also an
//! environment variable `ENBD_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use enbd_proto::params::TlsPolicy;
use thiserror::Error;

/// The client commands' exit codes (README: "Exit codes"; `control::ErrorKind::exit_code`).
pub const EXIT_CODES: &str = "Exit codes: 0 done; 1 failed; 2 invalid arguments or request; \
3 not found (volume, device or replica not attached here, or no such export); 4 in use \
(mounted or held open, or attached with other settings); 5 unavailable, retry later (daemon \
not running, server not answering, volume being taken over).";

/// Default NBD port when a URL or address gives none.
pub const NBD_PORT: u16 = 10809;

#[derive(Debug, Parser)]
#[command(
    name = "enbd-node",
    version,
    about = "ENBD node plugin: client engine, ublk devices, CSI node service",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: owns every ublk device; serves the control socket (and CSI).
    Daemon(DaemonArgs),
    /// Attach a volume as a local block device (via the running daemon).
    Attach(AttachArgs),
    /// Detach a volume (by volume id or device path); refused while it is mounted.
    Detach(DetachArgs),
    /// List attached volumes: device, volume, engine and channel states.
    List(ListArgs),
    /// Drop one channel's connection of an attached volume (fault tests, operators).
    ResetChannel(ResetChannelArgs),
    /// Grow an attached volume's device to the size its server now reports (online resize).
    Resize(ResizeArgs),
    /// Make one replica of a mirrored volume the only in-sync copy (writes it lacks are lost).
    Promote(PromoteArgs),
    /// Replace a replica of an attached mirrored volume whose server is gone for good by a
    /// new one on another server, which receives a full (throttleable) copy.
    Replace(ReplaceArgs),
    /// Benchmark the client engine against an NBD server (no device): IOPS, latency, CPU.
    Bench(crate::bench::BenchArgs),
    /// Measure a mirror's resync: bytes copied per byte written while a replica was away,
    /// and the copy rate (the caller kills and restarts that replica's server when told).
    BenchResync(crate::bench::resync::ResyncBenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The trust root and client identity for TLS connections to servers.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsClientArgs {
    /// CA certificates (PEM) servers' certificates must chain to; TLS is used when given
    /// (re-read when the file changes).
    #[arg(long, env = "ENBD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate chain (PEM), presented when a server asks for one.
    #[arg(long, env = "ENBD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "ENBD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl TlsClientArgs {
    /// The files as the engine takes them; `None` without --tls-ca.
    pub fn files(&self) -> Result<Option<crate::engine::tls::TlsFiles>, CliError> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(CliError::TlsPair),
        };
        match &self.tls_ca {
            Some(ca) => Ok(Some(crate::engine::tls::TlsFiles {
                ca: ca.clone(),
                identity,
            })),
            None if identity.is_some() => Err(CliError::TlsNoCa),
            None => Ok(None),
        }
    }

    /// Loads the files into the engine's TLS settings; `None` without --tls-ca.
    pub fn client_tls(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<crate::engine::tls::ClientTls>>> {
        Ok(match self.files()? {
            None => None,
            Some(f) => Some(std::sync::Arc::new(crate::engine::tls::ClientTls::new(f)?)),
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct ControlSocketArg {
    /// Unix socket between the daemon and the client commands.
    #[arg(
        long,
        env = "ENBD_CONTROL_SOCKET",
        default_value = "/run/enbd-node/control.sock"
    )]
    pub control_socket: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Kubernetes node name reported to CSI (default: the host name).
    #[arg(long, env = "ENBD_NODE_ID")]
    pub node_id: Option<String>,
    /// CSI endpoint, e.g. unix:///csi/csi.sock; without it only the control socket is served.
    #[arg(long, env = "ENBD_CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// CSI driver name reported by GetPluginInfo (the chart's driverName).
    #[arg(long, env = "ENBD_DRIVER_NAME", default_value = "csi.enbd.io")]
    pub driver_name: String,
    /// Where attachment state survives daemon restarts.
    #[arg(long, env = "ENBD_STATE_DIR", default_value = "/var/lib/enbd-node")]
    pub state_dir: PathBuf,
    #[command(flatten)]
    pub control: ControlSocketArg,
    /// Most volumes attached at once (0: no limit).
    #[arg(long, env = "ENBD_MAX_VOLUMES", default_value_t = 0)]
    pub max_volumes: u64,
    /// Prometheus metrics (per-volume engine counters).
    #[arg(long, env = "ENBD_METRICS_LISTEN", default_value = "0.0.0.0:9812")]
    pub metrics_listen: SocketAddr,
    /// Log output format.
    #[arg(long, env = "ENBD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log verbosity: a level (trace, debug, info, warn, error, off) or directives
    /// `[TARGET=]LEVEL,...` such as `info,enbd_node::engine=debug`. RUST_LOG, when set, overrides it.
    #[arg(long, env = "ENBD_LOG_LEVEL", default_value = enbd_proto::cli::DEFAULT_LOG_LEVEL, value_parser = enbd_proto::cli::parse_log_level)]
    pub log_level: String,
    /// Bytes of unacknowledged request payload each volume's journal may hold.
    #[arg(long, env = "ENBD_JOURNAL_BYTES", default_value_t = 64 << 20)]
    pub journal_bytes: usize,
    /// TLS for volumes that do not say (StorageClass parameter `tls`, `attach --tls`):
    /// `require` (needs --tls-ca) or `off`.
    #[arg(long, env = "ENBD_TLS", default_value = "off")]
    pub tls: TlsPolicy,
    #[command(flatten)]
    pub tls_files: TlsClientArgs,
    /// Send a volume's access token (from ControllerPublishVolume) over a connection without
    /// TLS. Off: such a volume fails to attach rather than expose its token. A lab only.
    #[arg(long, env = "ENBD_ACCESS_TOKEN_PLAINTEXT")]
    pub access_token_plaintext: bool,
}

#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// nbd://HOST[:PORT]/EXPORT (instead of --server and --export).
    pub url: Option<String>,
    /// NBD server HOST:PORT; repeat (or separate with commas) for several.
    #[arg(long = "server", env = "ENBD_SERVER", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Export (volume) name on the server.
    #[arg(long, env = "ENBD_EXPORT")]
    pub export: Option<String>,
    /// Name the attachment is known by (default: the export name).
    #[arg(long, env = "ENBD_VOLUME_ID")]
    pub volume_id: Option<String>,
    /// NBD connections per server.
    #[arg(long, env = "ENBD_CHANNELS", default_value_t = 4)]
    pub channels: u16,
    /// ublk hardware queues (one thread each).
    #[arg(long, env = "ENBD_QUEUES", default_value_t = 1)]
    pub queues: u16,
    /// Requests in flight per ublk queue.
    #[arg(long, env = "ENBD_QUEUE_DEPTH", default_value_t = 64)]
    pub queue_depth: u16,
    /// `wait` (hide outages) or `fail-after=<duration>` (EIO once an outage lasts that long;
    /// durations as in StorageClass parameters: `500ms`, `30s`, `1m30s`).
    #[arg(long, env = "ENBD_BROWNOUT", default_value = "wait", value_parser = brownout_arg)]
    pub brownout: String,
    /// Attach read-only: the device refuses writes.
    #[arg(long, env = "ENBD_READ_ONLY")]
    pub read_only: bool,
    /// Mirrored volume: one replica as ID@HOST:PORT@http://HOST:PORT (its server's id, NBD
    /// address, management address); repeat for each (2 or 3). Replaces --server.
    #[arg(long = "replica", env = "ENBD_REPLICAS", value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Mirrored volume: a replica that does not answer within this long is dropped
    /// (`5s`, `1m30s`).
    #[arg(long, env = "ENBD_REPLICA_TIMEOUT", default_value = "5s", value_parser = duration_arg)]
    pub replica_timeout: String,
    /// TLS for this volume: `require` or `off` [default: the daemon's --tls]. The trust
    /// root and client certificate are the daemon's (--tls-ca, --tls-cert, --tls-key).
    #[arg(long, env = "ENBD_VOLUME_TLS")]
    pub tls: Option<TlsPolicy>,
    /// Mirrored volume: most bytes per second a resync copies (`50Mi`, `100MB/s`; default
    /// unlimited).
    #[arg(long, env = "ENBD_RESYNC_BANDWIDTH")]
    pub resync_bandwidth: Option<String>,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct ReplaceArgs {
    /// Volume id or device path of the attached mirrored volume.
    #[arg(long)]
    pub volume: String,
    /// Id of the replica to replace (its server is gone for good, or being retired).
    #[arg(long)]
    pub replica: String,
    /// The new replica as ID@HOST:PORT@http://HOST:PORT: a server that holds no copy yet.
    #[arg(long = "with")]
    pub with: String,
    /// Most bytes per second the full copy (and later resyncs) may take (`50Mi`, `100MB/s`).
    #[arg(long)]
    pub resync_bandwidth: Option<String>,
    /// Replace without a daemon (the volume attached nowhere): every current replica as
    /// ID@HOST:PORT@http://HOST:PORT; only the records change, the next attach makes the copy.
    #[arg(long = "member", value_delimiter = ',')]
    pub members: Vec<String>,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct PromoteArgs {
    /// Volume id or device path of the attached mirrored volume.
    #[arg(long)]
    pub volume: String,
    /// Id of the replica to make the only in-sync copy.
    #[arg(long)]
    pub replica: String,
    /// Confirms that writes the chosen replica did not receive may be lost for good.
    #[arg(long)]
    pub accept_data_loss: bool,
    /// Promote without a daemon (the volume attached nowhere): every replica as
    /// ID@HOST:PORT@http://HOST:PORT, as for `attach --replica`.
    #[arg(long = "member", value_delimiter = ',')]
    pub members: Vec<String>,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct DetachArgs {
    /// Volume id or device path (/dev/ublkbN).
    pub target: String,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long, env = "ENBD_JSON")]
    pub json: bool,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct ResetChannelArgs {
    /// Volume id or device path.
    pub target: String,
    /// Channel index (see `list`).
    pub channel: usize,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

#[derive(Debug, Clone, Args)]
pub struct ResizeArgs {
    /// Volume id or device path.
    pub target: String,
    #[command(flatten)]
    pub control: ControlSocketArg,
}

/// `--brownout`, checked by the StorageClass parameter's parser (kept as text: the daemon
/// parses it again from the request).
fn brownout_arg(s: &str) -> Result<String, String> {
    s.parse::<enbd_proto::params::Brownout>()
        .map(|b| b.to_string())
        .map_err(|e| e.to_string())
}

/// A duration flag, in the StorageClass parameters' syntax.
fn duration_arg(s: &str) -> Result<String, String> {
    enbd_proto::params::parse_duration(s).map(enbd_proto::params::format_duration)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{0:?} is not an nbd:// URL (expected nbd://HOST[:PORT]/EXPORT)")]
    BadUrl(String),
    #[error("give either an nbd:// URL or --server and --export, not both")]
    UrlAndFlags,
    #[error("missing --server (or an nbd:// URL)")]
    NoServer,
    #[error("missing --export (or an nbd:// URL)")]
    NoExport,
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("a client certificate needs --tls-ca too (the servers' trust root)")]
    TlsNoCa,
}

/// Where to attach from: servers and export, from a URL or flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub servers: Vec<String>,
    pub export: String,
}

/// Parses `nbd://HOST[:PORT]/EXPORT` (IPv6 hosts in brackets).
pub fn parse_nbd_url(url: &str) -> Result<Source, CliError> {
    let bad = || CliError::BadUrl(url.to_string());
    let rest = url.strip_prefix("nbd://").ok_or_else(bad)?;
    let (authority, export) = rest.split_once('/').ok_or_else(bad)?;
    if authority.is_empty() || export.is_empty() {
        return Err(bad());
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[..i].ends_with(':') && authority.rfind(']').is_none_or(|b| b < i),
        None => false,
    };
    let server = if has_port {
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        port.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)?;
        format!("{host}:{port}")
    } else {
        format!("{authority}:{NBD_PORT}")
    };
    Ok(Source {
        servers: vec![server],
        export: export.to_string(),
    })
}

impl AttachArgs {
    pub fn source(&self) -> Result<Source, CliError> {
        if !self.replicas.is_empty() && self.servers.is_empty() && self.url.is_none() {
            // A mirror's servers are its replicas' data addresses.
            let export = self.export.clone().ok_or(CliError::NoExport)?;
            let servers = self
                .replicas
                .iter()
                .map(|r| r.split('@').nth(1).unwrap_or_default().to_owned())
                .collect();
            return Ok(Source { servers, export });
        }
        match &self.url {
            Some(url) => {
                if !self.servers.is_empty() || self.export.is_some() {
                    return Err(CliError::UrlAndFlags);
                }
                parse_nbd_url(url)
            }
            None => {
                if self.servers.is_empty() {
                    return Err(CliError::NoServer);
                }
                let export = self.export.clone().ok_or(CliError::NoExport)?;
                let servers = self
                    .servers
                    .iter()
                    .map(|s| {
                        if s.contains(':') {
                            s.clone()
                        } else {
                            format!("{s}:{NBD_PORT}")
                        }
                    })
                    .collect();
                Ok(Source { servers, export })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nbd_urls() {
        assert_eq!(
            parse_nbd_url("nbd://localhost/demo"),
            Ok(Source {
                servers: vec!["localhost:10809".into()],
                export: "demo".into()
            })
        );
        assert_eq!(
            parse_nbd_url("nbd://10.0.0.1:2000/a/b"),
            Ok(Source {
                servers: vec!["10.0.0.1:2000".into()],
                export: "a/b".into()
            })
        );
        assert_eq!(
            parse_nbd_url("nbd://[::1]/v").map(|s| s.servers),
            Ok(vec!["[::1]:10809".into()])
        );
        assert_eq!(
            parse_nbd_url("nbd://[::1]:99/v").map(|s| s.servers),
            Ok(vec!["[::1]:99".into()])
        );
        assert!(parse_nbd_url("http://x/y").is_err());
        assert!(parse_nbd_url("nbd://host/").is_err());
        assert!(parse_nbd_url("nbd://host:0/v").is_err());
    }

    #[test]
    fn attach_arguments() {
        let cli = Cli::try_parse_from([
            "enbd-node",
            "attach",
            "--server",
            "a:1,b",
            "--export",
            "v",
            "--brownout",
            "fail-after=2s",
        ])
        .expect("parse");
        let Command::Attach(a) = cli.command else {
            panic!("not attach")
        };
        assert_eq!(
            a.source(),
            Ok(Source {
                servers: vec!["a:1".into(), "b:10809".into()],
                export: "v".into()
            })
        );
        assert_eq!(a.brownout, "fail-after=2s");
        // One duration syntax: what a StorageClass takes, attach takes (and canonicalises).
        let parse = |b: &str| {
            Cli::try_parse_from(["enbd-node", "attach", "nbd://h/v", "--brownout", b]).map(|c| {
                match c.command {
                    Command::Attach(a) => a.brownout,
                    _ => unreachable!(),
                }
            })
        };
        assert_eq!(parse("fail-after=1m30s").expect("1m30s"), "fail-after=90s");
        assert_eq!(parse("wait").expect("wait"), "wait");
        for bad in [
            "fail-after=0s",
            "fail-after=30",
            "fail-after=1.5s",
            "sometimes",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            Cli::try_parse_from([
                "enbd-node",
                "attach",
                "nbd://h/v",
                "--replica-timeout",
                "2x"
            ])
            .is_err()
        );
        let cli = Cli::try_parse_from(["enbd-node", "attach", "nbd://h/v", "--export", "w"])
            .expect("parse");
        let Command::Attach(a) = cli.command else {
            panic!("not attach")
        };
        assert_eq!(a.source(), Err(CliError::UrlAndFlags));
    }

    #[test]
    fn mirrored_attach_and_promote_arguments() {
        let cli = Cli::try_parse_from([
            "enbd-node",
            "attach",
            "--export",
            "v",
            "--replica",
            "a@h1:10809@http://h1:9100",
            "--replica",
            "b@h2:10809@http://h2:9100",
            "--replica-timeout",
            "2s",
        ])
        .expect("parse");
        let Command::Attach(a) = cli.command else {
            panic!("not attach")
        };
        assert_eq!(a.replicas.len(), 2);
        assert_eq!(a.replica_timeout, "2s");
        assert_eq!(
            a.source(),
            Ok(Source {
                servers: vec!["h1:10809".into(), "h2:10809".into()],
                export: "v".into()
            })
        );
        let cli = Cli::try_parse_from(["enbd-node", "promote", "--volume", "v", "--replica", "a"])
            .expect("parse");
        let Command::Promote(p) = cli.command else {
            panic!("not promote")
        };
        assert!(!p.accept_data_loss);
        assert!(p.members.is_empty());
        let cli = Cli::try_parse_from([
            "enbd-node",
            "replace",
            "--volume",
            "v",
            "--replica",
            "b",
            "--with",
            "c@10.0.0.3:10809@http://10.0.0.3:10810",
            "--resync-bandwidth",
            "50Mi",
        ])
        .expect("parse");
        let Command::Replace(r) = cli.command else {
            panic!("not replace")
        };
        assert_eq!(
            (r.volume.as_str(), r.replica.as_str(), r.with.as_str()),
            ("v", "b", "c@10.0.0.3:10809@http://10.0.0.3:10810")
        );
        assert_eq!(r.resync_bandwidth.as_deref(), Some("50Mi"));
        assert!(
            Cli::try_parse_from(["enbd-node", "replace", "--volume", "v", "--replica", "b"])
                .is_err(),
            "--with is required"
        );
    }

    #[test]
    fn help_documents_the_exit_codes() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for code in ["3 not found", "4 in use", "5 unavailable"] {
            assert!(help.contains(code), "--help lacks {code:?}");
        }
        for kind in [
            crate::control::ErrorKind::NotFound,
            crate::control::ErrorKind::InUse,
            crate::control::ErrorKind::Unavailable,
        ] {
            let code = kind.exit_code().to_string();
            assert!(
                EXIT_CODES.contains(&format!("; {code} ")),
                "{kind:?} -> {code}"
            );
        }
    }

    #[test]
    fn daemon_defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["enbd-node", "daemon"]).expect("parse");
        let Command::Daemon(d) = cli.command else {
            panic!("not daemon")
        };
        assert_eq!(d.state_dir, PathBuf::from("/var/lib/enbd-node"));
        assert_eq!(
            d.control.control_socket,
            PathBuf::from("/run/enbd-node/control.sock")
        );
        assert_eq!(d.driver_name, "csi.enbd.io");
        assert_eq!(
            d.metrics_listen,
            "0.0.0.0:9812".parse::<SocketAddr>().expect("addr")
        );
        assert!(d.csi_endpoint.is_none());
    }
}
