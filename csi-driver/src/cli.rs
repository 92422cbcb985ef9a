//! Command line of the `csi-driver` binary. Every flag is also an environment
//! variable `ENBD_<FLAG>`, and Helm values map one-to-one onto these flags; the
//! e2e suite validates the chart's arguments with [`Cli::try_parse_from`].
//! Parsing only checks syntax; [`crate::config::Config::from_cli`] checks meaning.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// How the controller finds enbd-servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryMode {
    /// Watch enbd-server pods through the Kubernetes API.
    Kubernetes,
    /// Use the fixed `--servers` list.
    Static,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// CSI controller for ENBD network block volumes.
#[derive(Debug, Clone, Parser)]
#[command(name = "csi-driver", version, about)]
pub struct Cli {
    /// Without a subcommand: run the controller.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// CSI endpoint the sidecars dial (`unix:///path` or a plain path); the operator
    /// subcommands dial the running controller there.
    #[arg(long, env = "ENBD_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// CSI driver name reported by GetPluginInfo.
    #[arg(long, env = "ENBD_DRIVER_NAME", default_value = "csi.enbd.io")]
    pub driver_name: String,

    /// Accepted for symmetry with the node plugin; the controller ignores it.
    #[arg(long, env = "ENBD_NODE_ID")]
    pub node_id: Option<String>,

    /// Where the list of enbd-servers comes from.
    #[arg(long, env = "ENBD_DISCOVERY", value_enum, default_value = "kubernetes")]
    pub discovery: DiscoveryMode,

    /// Static discovery: `ID=MGMT_URL` pairs, comma separated
    /// (e.g. `enbd-server-0=http://10.0.0.5:10810`).
    #[arg(long, env = "ENBD_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,

    /// Node ids ControllerPublishVolume accepts, comma separated; any other node is
    /// NOT_FOUND. A lone `*` accepts every node id (giving up NOT_FOUND). Unset: a node
    /// exists when a CSINode object registers this driver with that node id (needs the
    /// Kubernetes API; outside a cluster, set this).
    #[arg(long, env = "ENBD_NODES", value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,

    /// Kubernetes discovery: namespace of the enbd-server pods (default: the
    /// namespace of the service account, else `default`).
    #[arg(long, env = "ENBD_NAMESPACE")]
    pub namespace: Option<String>,

    /// Kubernetes discovery: label selector of the enbd-server pods.
    #[arg(
        long,
        env = "ENBD_SERVER_SELECTOR",
        default_value = "app.kubernetes.io/component=enbd-server"
    )]
    pub server_selector: String,

    /// Prometheus metrics listen address.
    #[arg(long, env = "ENBD_METRICS_LISTEN", default_value = "0.0.0.0:9811")]
    pub metrics_listen: String,

    /// Log output format.
    #[arg(long, env = "ENBD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log verbosity: a level (trace, debug, info, warn, error, off) or directives
    /// `[TARGET=]LEVEL,...` such as `info,csi_driver::servers=debug`. RUST_LOG, when set, overrides it.
    #[arg(long, env = "ENBD_LOG_LEVEL", default_value = enbd_proto::cli::DEFAULT_LOG_LEVEL, value_parser = enbd_proto::cli::parse_log_level)]
    pub log_level: String,

    /// Record Kubernetes Events on PVs and PVCs when a volume's server becomes unreachable
    /// or answers again, and when a mirrored volume is degraded, resyncing or recovered
    /// (one Event per change, never one per poll). Needs the Kubernetes API.
    #[arg(long, env = "ENBD_EVENTS")]
    pub events: bool,

    /// CA certificates (PEM) that sign the enbd-servers' management certificates. With
    /// --mgmt-tls-cert and --mgmt-tls-key: management calls use https with this client
    /// certificate (CN enbd-controller), and Kubernetes discovery dials each server by its
    /// stable DNS name. The files are re-read when they change.
    #[arg(long, env = "ENBD_MGMT_TLS_CA")]
    pub mgmt_tls_ca: Option<std::path::PathBuf>,

    /// The controller's management client certificate (PEM).
    #[arg(long, env = "ENBD_MGMT_TLS_CERT")]
    pub mgmt_tls_cert: Option<std::path::PathBuf>,

    /// Private key of --mgmt-tls-cert (PEM).
    #[arg(long, env = "ENBD_MGMT_TLS_KEY")]
    pub mgmt_tls_key: Option<std::path::PathBuf>,

    /// How often the access grants of published volumes are checked against their current
    /// replica sets (granted where a member lacks one, revoked where a server is no longer a
    /// member); also whenever a server becomes reachable. `500ms`, `30s`, `1m`, ...
    #[arg(long, env = "ENBD_GRANT_RECONCILE_INTERVAL", default_value = "30s",
          value_parser = enbd_proto::params::parse_duration)]
    pub grant_reconcile_interval: std::time::Duration,
}

/// Operator actions, sent to the controller running on `--endpoint` (run them inside its
/// pod: `kubectl exec deploy/<release>-controller -c csi-driver -- csi-driver …`).
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// The controller's half of replacing a mirrored volume's replica: creates the volume
    /// on a new enbd-server (same name, size and labels) and grants it to the node the
    /// volume is attached to. Prints the `--with` argument for the node's
    /// `enbd-node replace`, which then makes the swap and the full copy.
    PrepareReplacement(PrepareReplacementArgs),
}

#[derive(Debug, Clone, Args)]
pub struct PrepareReplacementArgs {
    /// The CSI volume id (the PV's `spec.csi.volumeHandle`, `SERVER/NAME`).
    #[arg(long)]
    pub volume_id: String,
    /// The replica being replaced: its enbd-server id.
    #[arg(long)]
    pub replica: String,
    /// The enbd-server to put the new replica on (default: chosen like a new volume's
    /// replicas: a live non-member with room, in a zone no surviving member uses if any).
    #[arg(long)]
    pub target: Option<String>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::try_parse_from(["csi-driver"]).unwrap();
        assert_eq!(cli.endpoint, "unix:///csi/csi.sock");
        assert_eq!(cli.driver_name, "csi.enbd.io");
        assert_eq!(cli.discovery, DiscoveryMode::Kubernetes);
        assert_eq!(
            cli.server_selector,
            "app.kubernetes.io/component=enbd-server"
        );
        assert_eq!(cli.metrics_listen, "0.0.0.0:9811");
        assert_eq!(cli.log_format, LogFormat::Text);
        assert_eq!(cli.nodes, None);
        assert!(
            !cli.events,
            "events need the Kubernetes API: off unless asked for"
        );
        assert_eq!(cli.log_level, "info");
        assert_eq!(
            cli.grant_reconcile_interval,
            std::time::Duration::from_secs(30)
        );
    }

    #[test]
    fn prepare_replacement_takes_its_arguments_and_the_endpoint() {
        let cli = Cli::try_parse_from([
            "csi-driver",
            "--endpoint",
            "unix:///tmp/c.sock",
            "prepare-replacement",
            "--volume-id",
            "srv-a/pvc-1",
            "--replica",
            "srv-b",
        ])
        .unwrap();
        assert_eq!(cli.endpoint, "unix:///tmp/c.sock");
        let Some(Command::PrepareReplacement(a)) = cli.command else {
            panic!("no subcommand parsed: {:?}", cli.command);
        };
        assert_eq!(
            (a.volume_id.as_str(), a.replica.as_str()),
            ("srv-a/pvc-1", "srv-b")
        );
        assert_eq!(a.target, None);
        assert!(
            Cli::try_parse_from(["csi-driver", "prepare-replacement", "--replica", "b"]).is_err(),
            "--volume-id is required"
        );
        assert!(
            Cli::try_parse_from(["csi-driver"])
                .unwrap()
                .command
                .is_none()
        );
    }

    #[test]
    fn static_servers_split_on_commas() {
        let cli = Cli::try_parse_from([
            "csi-driver",
            "--discovery",
            "static",
            "--servers",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(
            cli.servers,
            ["a=http://127.0.0.1:1", "b=http://127.0.0.1:2"]
        );
    }
}
