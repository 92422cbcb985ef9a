//! Command line of `enbd-server` (every flag also an `ENBD_<FLAG>` environment variable) and
//! its validation into a plain [`Config`] that is passed down explicitly.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use crate::access::AccessMode;
use clap::{Parser, ValueEnum};
use enbd_proto::ids::ServerId;

/// Where `--demo` keeps its volumes when `--data-dir` is not given.
const DEMO_SUBDIR: &str = "enbd-server/demo";
/// The demo volume's name and size.
pub const DEMO_VOLUME: &str = "demo";
pub const DEMO_VOLUME_BYTES: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How file IO is issued: a positional-IO thread pool or io_uring (see `session::io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoEngineKind {
    Pool,
    Uring,
}

/// TLS on the NBD data path (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsMode {
    /// No TLS: STARTTLS is answered "unsupported".
    Off,
    /// Clients may start TLS or stay in plain text.
    Optional,
    /// Clients must start TLS before anything else.
    Require,
}

/// `--mgmt-tls`: whether the management API speaks mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MgmtTlsMode {
    /// Plain-text gRPC, no authentication (a lab, `--demo`).
    Off,
    /// TLS with the `--tls-cert` certificate; every method but grpc.health.v1 needs a
    /// client certificate signed by `--mgmt-client-ca` whose CN allows it (README: "Security").
    Require,
}

/// NBD volume server with a management gRPC API.
#[derive(Debug, Clone, Parser)]
#[command(name = "enbd-server", version, about)]
pub struct Cli {
    /// Directory holding the volumes (created if missing). Required unless --demo.
    #[arg(long, env = "ENBD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NBD listen address [default: 0.0.0.0:10809; 127.0.0.1:10809 with --demo].
    #[arg(long, env = "ENBD_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Management gRPC listen address [default: 0.0.0.0:10810; 127.0.0.1:10810 with --demo].
    #[arg(long, env = "ENBD_MGMT_LISTEN")]
    pub mgmt_listen: Option<SocketAddr>,
    /// Stable identity of this server (volume ids are <server-id>/<name>) [default: hostname].
    #[arg(long, env = "ENBD_SERVER_ID")]
    pub server_id: Option<String>,
    /// NBD address clients should dial, HOST:PORT [default: the listen address].
    #[arg(long, env = "ENBD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Most NBD connections served at once; more wait in the accept queue.
    #[arg(long, env = "ENBD_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Largest READ/WRITE payload accepted; bigger requests get EINVAL (or EOVERFLOW).
    #[arg(long, env = "ENBD_MAX_REQUEST_BYTES", default_value_t = 32 << 20)]
    pub max_request_bytes: u32,
    /// Most request bytes in flight over all connections (replies not yet written included);
    /// each connection also has its own bound (README: "Bounds").
    #[arg(long, env = "ENBD_MAX_INFLIGHT_BYTES", default_value_t = crate::session::budget::DEFAULT_GLOBAL_BYTES)]
    pub max_inflight_bytes: u64,
    /// Seconds a client may take from connecting to finishing the NBD handshake.
    #[arg(long, env = "ENBD_HANDSHAKE_TIMEOUT_SECS", default_value_t = crate::session::HANDSHAKE_TIMEOUT.as_secs())]
    pub handshake_timeout_secs: u64,
    /// Prometheus metrics listen address [default: 0.0.0.0:9810; 127.0.0.1:9810 with --demo].
    #[arg(long, env = "ENBD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log output format.
    #[arg(long, env = "ENBD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log verbosity: a level (trace, debug, info, warn, error, off) or directives
    /// `[TARGET=]LEVEL,...` such as `info,enbd_server::session=debug`. RUST_LOG, when set, overrides it.
    #[arg(long, env = "ENBD_LOG_LEVEL", default_value = enbd_proto::cli::DEFAULT_LOG_LEVEL, value_parser = enbd_proto::cli::parse_log_level)]
    pub log_level: String,
    /// Serve a 1 GiB volume `demo` from an embedded default data directory on localhost.
    #[arg(long, env = "ENBD_DEMO")]
    pub demo: bool,
    /// File IO engine (chosen by measurement; see the README's benchmarks).
    #[arg(long, env = "ENBD_IO_ENGINE", value_enum, default_value_t = IoEngineKind::Pool)]
    pub io_engine: IoEngineKind,
    /// Threads of the `pool` IO engine.
    #[arg(long, env = "ENBD_IO_THREADS", default_value_t = 16)]
    pub io_threads: usize,
    /// Seconds to let in-flight requests finish on SIGTERM/SIGINT before closing connections.
    #[arg(long, env = "ENBD_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// TLS on the NBD data path (STARTTLS, TLS 1.3); optional and require need --tls-cert
    /// and --tls-key.
    #[arg(long, env = "ENBD_TLS", value_enum, default_value_t = TlsMode::Off)]
    pub tls: TlsMode,
    /// Server certificate chain (PEM, leaf first); re-read when the file changes.
    #[arg(long, env = "ENBD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM); re-read when the file changes.
    #[arg(long, env = "ENBD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): when set, data-path clients must present a certificate they
    /// signed.
    #[arg(long, env = "ENBD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Management API transport: `require` is mutual TLS with per-method roles.
    #[arg(long, env = "ENBD_MGMT_TLS", value_enum, default_value_t = MgmtTlsMode::Off)]
    pub mgmt_tls: MgmtTlsMode,
    /// CA certificates (PEM) that sign management client certificates; needed by
    /// `--mgmt-tls require`. Reloaded when the file changes.
    #[arg(long, env = "ENBD_MGMT_CLIENT_CA")]
    pub mgmt_client_ca: Option<PathBuf>,
    /// Who may open a volume over NBD: `open` (anyone who gets through TLS; the default and
    /// `--demo`) or `published` (only a client presenting the access token of a grant the
    /// controller made with GrantAccess, and only for that volume; README: "Security").
    #[arg(long, env = "ENBD_ACCESS", value_enum, default_value_t = AccessMode::Open)]
    pub access: AccessMode,
    /// Plain-text grpc.health.v1 listener for probes that cannot speak TLS (the kubelet's
    /// `grpc:` probe); only the health service is served there. Off when not given.
    #[arg(long, env = "ENBD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Bytes per second each background snapshot or clone copy may read, 0 for no limit.
    /// Copy-before-write copies done for the source's writes are never held back.
    #[arg(long, env = "ENBD_COPY_RATE_BYTES", default_value_t = 0)]
    pub copy_rate_bytes: u64,
    /// Create --data-dir if missing, give it to UID:GID (mode 0750) and exit: the init step
    /// for a data directory the server's own user cannot create (a Kubernetes hostPath).
    #[arg(long, value_name = "UID:GID")]
    pub prepare_data_dir_for: Option<crate::datadir::Owner>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--data-dir is required (or use --demo)")]
    NoDataDir,
    #[error("--demo needs $XDG_DATA_HOME or $HOME to place its data directory")]
    NoHome,
    #[error("invalid --server-id: {0}")]
    ServerId(#[from] enbd_proto::ids::IdError),
    #[error("cannot read the hostname for the default --server-id: {0}")]
    Hostname(std::io::Error),
    #[error("--max-connections must be at least 1")]
    NoConnections,
    #[error("--max-request-bytes must be between 4096 and 1 GiB, got {0}")]
    RequestBytes(u32),
    #[error("--max-inflight-bytes must be at least --max-request-bytes ({max_request}), got {got}")]
    InflightBytes { got: u64, max_request: u32 },
    #[error("--handshake-timeout-secs must be at least 1")]
    HandshakeTimeout,
    #[error("--advertise-address {0:?} is not HOST:PORT")]
    Advertise(String),
    #[error("--tls {0} needs --tls-cert and --tls-key")]
    TlsFiles(&'static str),
    #[error("--tls-cert and --tls-key go together")]
    TlsPair,
    #[error("--mgmt-tls require needs {0}")]
    MgmtTls(&'static str),
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub mgmt_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub server_id: ServerId,
    /// `None` means "whatever address the NBD listener actually bound".
    pub advertise_address: Option<String>,
    pub max_connections: usize,
    pub max_request_bytes: u32,
    pub max_inflight_bytes: u64,
    pub handshake_timeout: std::time::Duration,
    pub log_format: LogFormat,
    /// `--log-level` directives (checked by the parser).
    pub log_level: String,
    pub io_engine: IoEngineKind,
    pub io_threads: usize,
    pub shutdown_grace: std::time::Duration,
    /// With --demo: the volume to create if missing (name, bytes); also the default export.
    pub demo_volume: Option<(String, u64)>,
    pub tls: TlsMode,
    /// Certificate and key (and the data path's client CA) when given.
    pub tls_files: Option<crate::tls::TlsFiles>,
    /// `--mgmt-tls require`; None: plain-text management API.
    pub mgmt_tls: Option<crate::mgmt::auth::MgmtTls>,
    pub health_listen: Option<SocketAddr>,
    pub access: AccessMode,
    /// `--copy-rate-bytes` (0: unlimited).
    pub copy_rate_bytes: u64,
}

fn demo_data_dir() -> Result<PathBuf, ConfigError> {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(x).join(DEMO_SUBDIR));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or(ConfigError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/share").join(DEMO_SUBDIR))
}

fn hostname() -> Result<String, ConfigError> {
    let raw =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map_err(ConfigError::Hostname)?;
    Ok(raw.trim().to_ascii_lowercase())
}

impl Cli {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let host = if self.demo {
            [127, 0, 0, 1]
        } else {
            [0, 0, 0, 0]
        };
        let data_dir = match (self.data_dir, self.demo) {
            (Some(d), _) => d,
            (None, true) => demo_data_dir()?,
            (None, false) => return Err(ConfigError::NoDataDir),
        };
        let server_id = ServerId::parse(&match self.server_id {
            Some(id) => id,
            None => hostname()?,
        })?;
        if self.max_connections == 0 {
            return Err(ConfigError::NoConnections);
        }
        if !(4096..=1 << 30).contains(&self.max_request_bytes) {
            return Err(ConfigError::RequestBytes(self.max_request_bytes));
        }
        if self.max_inflight_bytes < u64::from(self.max_request_bytes) {
            return Err(ConfigError::InflightBytes {
                got: self.max_inflight_bytes,
                max_request: self.max_request_bytes,
            });
        }
        if self.handshake_timeout_secs == 0 {
            return Err(ConfigError::HandshakeTimeout);
        }
        if let Some(a) = &self.advertise_address {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::Advertise(a.clone()));
            }
        }
        let tls_files = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
                client_cert_optional: false,
            }),
            (None, None) => None,
            _ => return Err(ConfigError::TlsPair),
        };
        match self.tls {
            TlsMode::Optional if tls_files.is_none() => {
                return Err(ConfigError::TlsFiles("optional"));
            }
            TlsMode::Require if tls_files.is_none() => {
                return Err(ConfigError::TlsFiles("require"));
            }
            _ => {}
        }
        let mgmt_tls = match self.mgmt_tls {
            MgmtTlsMode::Off => None,
            MgmtTlsMode::Require => {
                let files = tls_files
                    .as_ref()
                    .ok_or(ConfigError::MgmtTls("--tls-cert and --tls-key"))?;
                Some(crate::mgmt::auth::MgmtTls {
                    cert: files.cert.clone(),
                    key: files.key.clone(),
                    client_ca: self
                        .mgmt_client_ca
                        .ok_or(ConfigError::MgmtTls("--mgmt-client-ca"))?,
                })
            }
        };
        Ok(Config {
            access: self.access,
            mgmt_tls,
            health_listen: self.health_listen,
            copy_rate_bytes: self.copy_rate_bytes,
            data_dir,
            listen: self.listen.unwrap_or((host, 10809).into()),
            mgmt_listen: self.mgmt_listen.unwrap_or((host, 10810).into()),
            metrics_listen: self.metrics_listen.unwrap_or((host, 9810).into()),
            server_id,
            advertise_address: self.advertise_address,
            max_connections: self.max_connections,
            max_request_bytes: self.max_request_bytes,
            max_inflight_bytes: self.max_inflight_bytes,
            handshake_timeout: std::time::Duration::from_secs(self.handshake_timeout_secs),
            log_format: self.log_format,
            log_level: self.log_level,
            io_engine: self.io_engine,
            io_threads: self.io_threads.clamp(1, 256),
            shutdown_grace: std::time::Duration::from_secs(self.shutdown_grace_secs),
            demo_volume: self
                .demo
                .then(|| (DEMO_VOLUME.to_owned(), DEMO_VOLUME_BYTES)),
            tls: self.tls,
            tls_files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_into_config() {
        let cli = Cli::try_parse_from([
            "enbd-server",
            "--data-dir=/var/lib/enbd",
            "--listen=0.0.0.0:10809",
            "--mgmt-listen=0.0.0.0:10810",
            "--server-id=enbd-server-0",
            "--advertise-address=enbd-server-0.enbd.default.svc:10809",
            "--max-connections=64",
            "--max-request-bytes=33554432",
            "--metrics-listen=0.0.0.0:9810",
            "--log-format=json",
        ])
        .unwrap();
        let c = cli.into_config().unwrap();
        assert_eq!(c.server_id.as_str(), "enbd-server-0");
        assert_eq!(c.max_connections, 64);
        assert_eq!(c.max_inflight_bytes, 256 << 20);
        assert_eq!(c.handshake_timeout, std::time::Duration::from_secs(30));
        assert!(c.demo_volume.is_none());
        assert_eq!(c.tls, TlsMode::Off);
        assert!(c.tls_files.is_none());
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["x", "--data-dir=/d", "--server-id=a"];
            args.extend_from_slice(extra);
            Cli::try_parse_from(args).unwrap().into_config()
        };
        assert!(parse(&["--tls=require"]).is_err());
        assert!(parse(&["--tls=optional", "--tls-cert=/c.pem"]).is_err());
        assert!(parse(&["--tls-key=/k.pem"]).is_err());
        let c = parse(&[
            "--tls=require",
            "--tls-cert=/c.pem",
            "--tls-key=/k.pem",
            "--tls-client-ca=/ca.pem",
        ])
        .unwrap();
        assert_eq!(c.tls, TlsMode::Require);
        let f = c.tls_files.unwrap();
        assert_eq!(
            f.client_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert!(Cli::try_parse_from(["x", "--tls=wat"]).is_err());
    }

    #[test]
    fn demo_listens_on_localhost_and_bad_values_are_refused() {
        let c = Cli::try_parse_from(["x", "--demo", "--data-dir=/tmp/d", "--server-id=a"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:10809");
        assert_eq!(c.mgmt_listen.to_string(), "127.0.0.1:10810");
        assert_eq!(c.demo_volume, Some(("demo".into(), 1 << 30)));
        let bad = |args: &[&str]| Cli::try_parse_from(args).unwrap().into_config().is_err();
        assert!(bad(&["x", "--server-id=a"]));
        assert!(bad(&["x", "--data-dir=/d", "--server-id=UPPER"]));
        assert!(bad(&[
            "x",
            "--data-dir=/d",
            "--server-id=a",
            "--max-connections=0"
        ]));
        assert!(bad(&[
            "x",
            "--data-dir=/d",
            "--server-id=a",
            "--advertise-address=nope"
        ]));
        assert!(bad(&[
            "x",
            "--data-dir=/d",
            "--server-id=a",
            "--max-request-bytes=10"
        ]));
        assert!(bad(&[
            "x",
            "--data-dir=/d",
            "--server-id=a",
            "--max-request-bytes=1048576",
            "--max-inflight-bytes=1048575"
        ]));
        assert!(bad(&[
            "x",
            "--data-dir=/d",
            "--server-id=a",
            "--handshake-timeout-secs=0"
        ]));
        let tls = ["x", "--data-dir=/d", "--server-id=a", "--mgmt-tls=require"];
        assert!(bad(&tls));
        assert!(bad(&[&tls[..], &["--tls-cert=/c", "--tls-key=/k"]].concat()));
        let ok = Cli::try_parse_from(
            [
                &tls[..],
                &["--tls-cert=/c", "--tls-key=/k", "--mgmt-client-ca=/ca"],
            ]
            .concat(),
        )
        .unwrap()
        .into_config()
        .unwrap();
        assert_eq!(ok.mgmt_tls.unwrap().client_ca, PathBuf::from("/ca"));
    }
}
