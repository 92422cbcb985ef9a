//! Validated configuration, built once from the [`Cli`] and passed down
//! explicitly. Invariant: a `Config` only holds values that were checked here,
//! so the services never re-validate start-up input.

use std::net::SocketAddr;
use std::path::PathBuf;

use enbd_proto::ids::ServerId;

use crate::cli::{Cli, DiscoveryMode, LogFormat};

/// Why the command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--endpoint {0:?}: only unix sockets are supported (unix:///path or /path)")]
    Endpoint(String),
    #[error(
        "--driver-name {0:?}: must be 1 to 63 characters of letters, digits, '-' and '.', \
         beginning and ending with a letter or digit"
    )]
    DriverName(String),
    #[error("--servers entry {0:?}: expected ID=URL, e.g. enbd-server-0=http://10.0.0.5:10810")]
    ServerEntry(String),
    #[error("--servers entry {entry:?}: {source}")]
    ServerId {
        entry: String,
        source: enbd_proto::ids::IdError,
    },
    #[error("--servers entry {0:?}: URL must start with http:// or https:// and name a host")]
    ServerUrl(String),
    #[error("--servers names {0} twice")]
    DuplicateServer(String),
    #[error("--discovery static needs at least one --servers entry")]
    NoServers,
    #[error("--servers is only used with --discovery static")]
    ServersWithoutStatic,
    #[error("--servers entry {0:?}: a zone (after @) is 1 to 63 letters, digits, '-', '_' or '.'")]
    ServerZone(String),
    #[error("--server-selector must not be empty")]
    EmptySelector,
    #[error("--nodes entry {0:?}: node ids are 1 to 256 printable characters without spaces")]
    NodeId(String),
    #[error("--metrics-listen {0:?}: expected HOST:PORT with an IP address, or empty to disable")]
    MetricsListen(String),
    #[error("--mgmt-tls-ca, --mgmt-tls-cert and --mgmt-tls-key go together (missing {0})")]
    MgmtTls(&'static str),
}

/// One statically configured enbd-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticServer {
    pub id: ServerId,
    /// Management gRPC URL, e.g. `http://127.0.0.1:10810`.
    pub mgmt_url: String,
    /// `ID=URL@ZONE`: the server's failure domain.
    pub zone: Option<String>,
}

/// Where the server list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    Static(Vec<StaticServer>),
    Kubernetes {
        namespace: Option<String>,
        selector: String,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket_path: PathBuf,
    pub driver_name: String,
    pub discovery: Discovery,
    /// `None` disables the metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    /// `--log-level` directives (checked by the parser).
    pub log_level: String,
    /// `--events`: Kubernetes Events on volume state changes.
    pub events: bool,
    /// `--nodes`: the node ids that exist (`*`: any); `None` asks Kubernetes (CSINode).
    pub nodes: Option<Vec<String>>,
    /// Management mTLS files; `None`: plain-text management calls.
    pub mgmt_tls: Option<crate::mgmt_tls::MgmtTlsFiles>,
    /// `--grant-reconcile-interval` (the parser refuses zero).
    pub grant_reconcile_interval: std::time::Duration,
}

fn valid_driver_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.'))
}

/// The socket path of an `--endpoint` (`unix:///path` or `/path`).
pub fn parse_socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(ConfigError::Endpoint(endpoint.to_owned()));
    }
    Ok(PathBuf::from(path))
}

fn parse_static_server(entry: &str) -> Result<StaticServer, ConfigError> {
    let (id, url) = entry
        .split_once('=')
        .ok_or_else(|| ConfigError::ServerEntry(entry.to_owned()))?;
    let id = ServerId::parse(id.trim()).map_err(|source| ConfigError::ServerId {
        entry: entry.to_owned(),
        source,
    })?;
    let (url, zone) = match url.trim().rsplit_once('@') {
        Some((u, z)) => {
            let ok = !z.is_empty()
                && z.len() <= 63
                && z.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(ConfigError::ServerZone(entry.to_owned()));
            }
            (u, Some(z.to_owned()))
        }
        None => (url.trim(), None),
    };
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    match host {
        Some(h) if !h.is_empty() && !h.starts_with(':') && !h.starts_with('/') => {}
        _ => return Err(ConfigError::ServerUrl(entry.to_owned())),
    }
    Ok(StaticServer {
        id,
        mgmt_url: url.trim_end_matches('/').to_owned(),
        zone,
    })
}

impl Config {
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let socket_path = parse_socket_path(&cli.endpoint)?;
        if !valid_driver_name(&cli.driver_name) {
            return Err(ConfigError::DriverName(cli.driver_name.clone()));
        }
        let discovery = match cli.discovery {
            DiscoveryMode::Static => {
                let mut servers: Vec<StaticServer> = Vec::new();
                for entry in cli.servers.iter().filter(|e| !e.trim().is_empty()) {
                    let server = parse_static_server(entry)?;
                    if servers.iter().any(|s| s.id == server.id) {
                        return Err(ConfigError::DuplicateServer(server.id.to_string()));
                    }
                    servers.push(server);
                }
                if servers.is_empty() {
                    return Err(ConfigError::NoServers);
                }
                Discovery::Static(servers)
            }
            DiscoveryMode::Kubernetes => {
                if cli.servers.iter().any(|e| !e.trim().is_empty()) {
                    return Err(ConfigError::ServersWithoutStatic);
                }
                if cli.server_selector.trim().is_empty() {
                    return Err(ConfigError::EmptySelector);
                }
                Discovery::Kubernetes {
                    namespace: cli.namespace.clone().filter(|n| !n.is_empty()),
                    selector: cli.server_selector.clone(),
                }
            }
        };
        let nodes = match &cli.nodes {
            None => None,
            Some(list) => {
                let ids: Vec<String> = list
                    .iter()
                    .map(|n| n.trim())
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect();
                // The CSI spec's node_id limit is 256 bytes.
                if let Some(bad) = ids.iter().find(|n| {
                    n.len() > 256 || n.chars().any(|c| c.is_whitespace() || c.is_control())
                }) {
                    return Err(ConfigError::NodeId(bad.clone()));
                }
                Some(ids)
            }
        };
        let metrics_listen = match cli.metrics_listen.trim() {
            "" => None,
            addr => Some(
                addr.parse()
                    .map_err(|_| ConfigError::MetricsListen(cli.metrics_listen.clone()))?,
            ),
        };
        let mgmt_tls = match (&cli.mgmt_tls_ca, &cli.mgmt_tls_cert, &cli.mgmt_tls_key) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(crate::mgmt_tls::MgmtTlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, _, _) => return Err(ConfigError::MgmtTls("--mgmt-tls-ca")),
            (_, None, _) => return Err(ConfigError::MgmtTls("--mgmt-tls-cert")),
            (_, _, None) => return Err(ConfigError::MgmtTls("--mgmt-tls-key")),
        };
        Ok(Config {
            grant_reconcile_interval: cli.grant_reconcile_interval,
            mgmt_tls,
            socket_path,
            driver_name: cli.driver_name.clone(),
            discovery,
            metrics_listen,
            log_format: cli.log_format,
            log_level: cli.log_level.clone(),
            events: cli.events,
            nodes,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["csi-driver"];
        argv.extend_from_slice(args);
        Config::from_cli(&Cli::try_parse_from(argv).unwrap())
    }

    #[test]
    fn static_discovery() {
        let c = config(&[
            "--endpoint",
            "unix:///tmp/x/csi.sock",
            "--discovery",
            "static",
            "--servers",
            "s0=http://127.0.0.1:10810/,s1=https://srv:1@zone-b",
            "--metrics-listen",
            "",
        ])
        .unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/tmp/x/csi.sock"));
        assert_eq!(c.metrics_listen, None);
        let Discovery::Static(servers) = c.discovery else {
            panic!("static expected")
        };
        assert_eq!(servers[0].mgmt_url, "http://127.0.0.1:10810");
        assert_eq!(servers[1].id.as_str(), "s1");
        assert_eq!(servers[0].zone, None);
        assert_eq!(servers[1].zone.as_deref(), Some("zone-b"));
        assert_eq!(servers[1].mgmt_url, "https://srv:1");
        assert_eq!(c.nodes, None, "unset: nodes come from CSINode objects");
        let c = config(&[
            "--discovery",
            "static",
            "--servers",
            "s0=http://127.0.0.1:10810",
            "--nodes",
            "node-1, node-2",
        ])
        .unwrap();
        assert_eq!(c.nodes, Some(vec!["node-1".into(), "node-2".into()]));
        assert!(matches!(
            config(&["--nodes", "a b"]),
            Err(ConfigError::NodeId(_))
        ));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            config(&["--endpoint", "tcp://x:1"]),
            Err(ConfigError::Endpoint(_))
        ));
        assert!(matches!(
            config(&["--endpoint", "relative"]),
            Err(ConfigError::Endpoint(_))
        ));
        assert!(matches!(
            config(&["--driver-name=-x"]),
            Err(ConfigError::DriverName(_))
        ));
        assert!(matches!(
            config(&["--discovery", "static"]),
            Err(ConfigError::NoServers)
        ));
        assert!(matches!(
            config(&["--discovery", "static", "--servers", "s0"]),
            Err(ConfigError::ServerEntry(_))
        ));
        assert!(matches!(
            config(&["--discovery", "static", "--servers", "S0=http://a:1"]),
            Err(ConfigError::ServerId { .. })
        ));
        assert!(matches!(
            config(&["--discovery", "static", "--servers", "s0=a:1"]),
            Err(ConfigError::ServerUrl(_))
        ));
        for bad in ["s0=http://a:1@", "s0=http://a:1@a b", "s0=http://a:1@x/y"] {
            assert!(
                matches!(
                    config(&["--discovery", "static", "--servers", bad]),
                    Err(ConfigError::ServerZone(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            config(&[
                "--discovery",
                "static",
                "--servers",
                "s0=http://a:1,s0=http://b:1"
            ]),
            Err(ConfigError::DuplicateServer(_))
        ));
        assert!(matches!(
            config(&["--servers", "s0=http://a:1"]),
            Err(ConfigError::ServersWithoutStatic)
        ));
        assert!(matches!(
            config(&["--metrics-listen", "localhost"]),
            Err(ConfigError::MetricsListen(_))
        ));
        for bad in ["0s", "30", ""] {
            assert!(
                Cli::try_parse_from(["csi-driver", "--grant-reconcile-interval", bad]).is_err(),
                "{bad:?}: a duration longer than zero, with its unit"
            );
        }
    }

    #[test]
    fn kubernetes_is_the_default() {
        let c = config(&["--namespace", "storage"]).unwrap();
        assert_eq!(
            c.discovery,
            Discovery::Kubernetes {
                namespace: Some("storage".into()),
                selector: "app.kubernetes.io/component=enbd-server".into()
            }
        );
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9811".parse().unwrap()));
        assert_eq!(c.mgmt_tls, None);
    }

    #[test]
    fn mgmt_tls_files_go_together() {
        let all = [
            "--mgmt-tls-ca=/ca",
            "--mgmt-tls-cert=/c",
            "--mgmt-tls-key=/k",
        ];
        let c = config(&all).unwrap();
        assert_eq!(c.mgmt_tls.unwrap().key, PathBuf::from("/k"));
        for missing in 0..3 {
            let args: Vec<&str> = (0..3).filter(|i| *i != missing).map(|i| all[i]).collect();
            assert!(
                matches!(config(&args), Err(ConfigError::MgmtTls(_))),
                "{args:?}"
            );
        }
    }
}
