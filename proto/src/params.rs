//! Typed StorageClass parameters and the CSI volume context built from them.
//!
//! The controller validates a StorageClass's `parameters` once, in CreateVolume
//! ([`VolumeParams::from_map`]); anything unknown or malformed is refused with an
//! error naming the key, and nothing is created. The validated values travel to
//! the node inside the volume's `volume_context` ([`VolumeContext::to_context`])
//! in canonical form, next to where the data lives (`enbd.io/server`,
//! `enbd.io/export`), so the node never sees a value the controller did not
//! accept. Keys under `csi.storage.k8s.io/` and `storage.kubernetes.io/` belong to
//! Kubernetes (the provisioner's and kubelet's extras) and are ignored on both paths.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Filesystem created on a blank Filesystem-mode volume.
pub const FS_TYPE: &str = "fsType";
/// Extra `mkfs` arguments, whitespace separated.
pub const MKFS_OPTIONS: &str = "mkfsOptions";
/// NBD connections per server.
pub const CHANNELS: &str = "channels";
/// In-flight requests per ublk queue.
pub const QUEUE_DEPTH: &str = "queueDepth";
/// ublk hardware queues.
pub const QUEUES: &str = "queues";
/// What IO does while no channel is up.
pub const BROWNOUT: &str = "brownout";
/// Copies of the data, each on a different enbd-server (1 to [`MAX_REPLICAS`]).
pub const REPLICAS: &str = "replicas";
/// With replicas: how long a replica may leave a write unanswered before it is dropped
/// from the in-sync set (the `brownout` policy governs the case where no replica answers).
pub const REPLICA_TIMEOUT: &str = "replicaTimeout";
/// TLS on the volume's data connections: `require` or `off` (absent: the node's
/// `--tls` default).
pub const TLS: &str = "tls";
/// With replicas: the most bytes per second a resync (a returning replica's catch-up, or
/// a replacement's full copy) may copy, so that it does not starve application IO.
pub const RESYNC_BANDWIDTH: &str = "resyncBandwidth";
/// Lowest `resyncBandwidth` accepted (1 MiB/s): anything lower is a typo, not a limit.
pub const MIN_RESYNC_BANDWIDTH: u64 = 1 << 20;
/// Volume context, replicated volumes only: every replica as
/// `<replica-id>@<nbd HOST:PORT>@<management URL>`, comma separated.
pub const CTX_REPLICAS: &str = "enbd.io/replicas";
/// `publish_context` key (ControllerPublishVolume → NodeStageVolume): the access token the
/// node presents to every replica's server (ENBD_OPT_ACCESS). A secret: never logged.
pub const PUBLISH_ACCESS_TOKEN: &str = "enbd.io/access-token";
/// Volume context: NBD data address `HOST:PORT` of the server holding the volume.
pub const CTX_SERVER: &str = "enbd.io/server";
/// Volume context: NBD export name of the volume on that server.
pub const CTX_EXPORT: &str = "enbd.io/export";
/// Prefixes of the keys Kubernetes adds to parameters and contexts: `csi.storage.k8s.io/`
/// (the provisioner's PVC/PV names, the kubelet's pod info) and `storage.kubernetes.io/`
/// (the provisioner's `csiProvisionerIdentity`, which it writes into every PV's volume
/// attributes: the node sees it in NodeStage/NodePublish).
pub const KUBERNETES_PREFIXES: [&str; 2] = ["csi.storage.k8s.io/", "storage.kubernetes.io/"];

/// Whether `key` is one of Kubernetes' own (ignored by every parameter and context parser).
pub fn is_kubernetes_key(key: &str) -> bool {
    KUBERNETES_PREFIXES.iter().any(|p| key.starts_with(p))
}

pub const DEFAULT_CHANNELS: u16 = 4;
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
pub const DEFAULT_QUEUES: u16 = 1;
pub const MAX_CHANNELS: u16 = 16;
pub const MAX_QUEUE_DEPTH: u16 = 1024;
pub const MAX_QUEUES: u16 = 16;
pub const MAX_REPLICAS: u16 = 3;
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
/// mkfs options are argv words, never a shell line; this caps their total size.
pub const MAX_MKFS_OPTIONS_LEN: usize = 512;

/// Why parameters or a volume context were refused. Every variant names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("unknown parameter(s): {}", .0.join(", "))]
    Unknown(Vec<String>),
    #[error("parameter {key}={value:?} is invalid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("volume context lacks {0}")]
    MissingContext(&'static str),
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ParamError {
    ParamError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Filesystems the node knows how to create and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsType {
    #[default]
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// The smallest device this filesystem's mkfs accepts, where it has a floor worth
    /// checking first: xfsprogs (5.19 and later) refuses filesystems under 300 MB. The node
    /// refuses to format below it; the controller creates volumes of at least this size.
    pub fn min_device_bytes(self) -> Option<u64> {
        match self {
            FsType::Xfs => Some(300_000_000),
            FsType::Ext4 => None,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            _ => Err(invalid(
                FS_TYPE,
                s,
                "supported filesystems are ext4 and xfs",
            )),
        }
    }
}

/// Whether a volume's NBD connections use TLS (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Plain text.
    Off,
    /// TLS or nothing: a server that does not offer TLS is an error, never a fallback.
    Require,
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsPolicy::Off => "off",
            TlsPolicy::Require => "require",
        })
    }
}

impl FromStr for TlsPolicy {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        match s {
            "off" => Ok(TlsPolicy::Off),
            "require" => Ok(TlsPolicy::Require),
            _ => Err(invalid(TLS, s, "expected \"require\" or \"off\"")),
        }
    }
}

/// What IO does while every channel to the server is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Brownout {
    /// Queue IO until a channel is back: the outage stays invisible above.
    #[default]
    Wait,
    /// Fail queued IO with EIO once the outage lasts this long.
    FailAfter(Duration),
}

impl fmt::Display for Brownout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Brownout::Wait => f.write_str("wait"),
            Brownout::FailAfter(d) => write!(f, "fail-after={}", format_duration(*d)),
        }
    }
}

impl FromStr for Brownout {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, ParamError> {
        if s == "wait" {
            return Ok(Brownout::Wait);
        }
        let Some(d) = s.strip_prefix("fail-after=") else {
            return Err(invalid(
                BROWNOUT,
                s,
                "expected \"wait\" or \"fail-after=<duration>\"",
            ));
        };
        let d = parse_duration(d).map_err(|reason| invalid(BROWNOUT, s, reason))?;
        Ok(Brownout::FailAfter(d))
    }
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or a sum such as `1m30s`; zero is refused
/// because failing IO immediately is never what a volume owner means.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("duration {s:?}: expected a number before {rest:?}"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "" => return Err(format!("duration {s:?}: missing unit (ms, s, m or h)")),
            u => {
                return Err(format!(
                    "duration {s:?}: unknown unit {u:?} (use ms, s, m or h)"
                ));
            }
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(part);
    }
    if total.is_zero() {
        return Err("duration must be greater than zero".into());
    }
    Ok(total)
}

/// Canonical form that [`parse_duration`] reads back exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Validated StorageClass parameters (see the module docs and README table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    /// Used when the mount capability names no filesystem.
    pub fs_type: FsType,
    /// Extra `mkfs` argv words, in order.
    pub mkfs_options: Vec<String>,
    pub channels: u16,
    pub queue_depth: u16,
    pub queues: u16,
    pub brownout: Brownout,
    pub replicas: u16,
    pub replica_timeout: Duration,
    /// `None`: the node's default (`enbd-node daemon --tls`).
    pub tls: Option<TlsPolicy>,
    /// Resync copy limit in bytes per second (`None`: unlimited).
    pub resync_bandwidth: Option<u64>,
}

impl Default for VolumeParams {
    fn default() -> Self {
        Self {
            fs_type: FsType::default(),
            mkfs_options: Vec::new(),
            channels: DEFAULT_CHANNELS,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            queues: DEFAULT_QUEUES,
            brownout: Brownout::default(),
            replicas: 1,
            replica_timeout: DEFAULT_REPLICA_TIMEOUT,
            tls: None,
            resync_bandwidth: None,
        }
    }
}

fn parse_bounded(key: &'static str, value: &str, max: u16) -> Result<u16, ParamError> {
    let n: u16 = value.parse().map_err(|_| {
        invalid(
            key,
            value,
            format!("expected a whole number from 1 to {max}"),
        )
    })?;
    if n == 0 || n > max {
        return Err(invalid(key, value, format!("must be from 1 to {max}")));
    }
    Ok(n)
}

/// Parses a bandwidth in bytes per second: a whole number with an optional unit (`K`, `M`,
/// `G` decimal; `Ki`, `Mi`, `Gi` binary; each optionally followed by `B`) and an optional
/// `/s`, e.g. `50Mi`, `100MB/s`, `20000000`. At least [`MIN_RESYNC_BANDWIDTH`].
pub fn parse_bandwidth(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let v = v.strip_suffix("/s").unwrap_or(v);
    let v = v.strip_suffix('B').unwrap_or(v);
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected bytes per second such as 50Mi or 100MB/s".to_owned())?;
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} (K, M, G, Ki, Mi, Gi)")),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| "too large".to_owned())?;
    if bytes < MIN_RESYNC_BANDWIDTH {
        return Err("must be at least 1Mi (1 MiB/s)".into());
    }
    Ok(bytes)
}

fn parse_mkfs_options(value: &str) -> Result<Vec<String>, ParamError> {
    if value.len() > MAX_MKFS_OPTIONS_LEN {
        return Err(invalid(
            MKFS_OPTIONS,
            value,
            format!("longer than {MAX_MKFS_OPTIONS_LEN} bytes"),
        ));
    }
    // Printable ASCII only: the words go straight into mkfs's argv, and control
    // characters there are never intended.
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(invalid(
            MKFS_OPTIONS,
            value,
            format!("contains the character {c:?}"),
        ));
    }
    Ok(value.split_whitespace().map(str::to_owned).collect())
}

impl VolumeParams {
    /// Validates a StorageClass's parameters. Unknown keys are all named in one
    /// error; keys under `csi.storage.k8s.io/` are ignored.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ParamError> {
        Self::from_entries(map.iter().map(|(k, v)| (k.as_str(), v.as_str())), &[])
    }

    /// Parses entries, skipping Kubernetes' keys and the `extra_known` keys the
    /// caller handles itself.
    fn from_entries<'a>(
        entries: impl Iterator<Item = (&'a str, &'a str)>,
        extra_known: &[&str],
    ) -> Result<Self, ParamError> {
        let mut params = VolumeParams::default();
        let mut unknown = BTreeSet::new();
        for (key, value) in entries {
            match key {
                FS_TYPE => params.fs_type = value.parse()?,
                MKFS_OPTIONS => params.mkfs_options = parse_mkfs_options(value)?,
                CHANNELS => params.channels = parse_bounded(CHANNELS, value, MAX_CHANNELS)?,
                QUEUE_DEPTH => {
                    params.queue_depth = parse_bounded(QUEUE_DEPTH, value, MAX_QUEUE_DEPTH)?
                }
                QUEUES => params.queues = parse_bounded(QUEUES, value, MAX_QUEUES)?,
                BROWNOUT => params.brownout = value.parse()?,
                TLS => params.tls = Some(value.parse()?),
                REPLICAS => params.replicas = parse_bounded(REPLICAS, value, MAX_REPLICAS)?,
                REPLICA_TIMEOUT => {
                    let d = parse_duration(value).map_err(|_| {
                        invalid(
                            REPLICA_TIMEOUT,
                            value,
                            "expected a duration such as 5s or 500ms",
                        )
                    })?;
                    if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
                        return Err(invalid(REPLICA_TIMEOUT, value, "must be from 100ms to 10m"));
                    }
                    params.replica_timeout = d;
                }
                RESYNC_BANDWIDTH => {
                    params.resync_bandwidth = Some(
                        parse_bandwidth(value)
                            .map_err(|why| invalid(RESYNC_BANDWIDTH, value, why))?,
                    );
                }
                k if is_kubernetes_key(k) || extra_known.contains(&k) => {}
                k => {
                    unknown.insert(k.to_owned());
                }
            }
        }
        if !unknown.is_empty() {
            return Err(ParamError::Unknown(unknown.into_iter().collect()));
        }
        Ok(params)
    }

    /// The parameters in canonical form, as volume-context entries.
    pub fn to_context(&self) -> HashMap<String, String> {
        let mut map = HashMap::from([
            (FS_TYPE.to_owned(), self.fs_type.to_string()),
            (CHANNELS.to_owned(), self.channels.to_string()),
            (QUEUE_DEPTH.to_owned(), self.queue_depth.to_string()),
            (QUEUES.to_owned(), self.queues.to_string()),
            (BROWNOUT.to_owned(), self.brownout.to_string()),
            (REPLICAS.to_owned(), self.replicas.to_string()),
        ]);
        if self.replicas > 1 {
            map.insert(
                REPLICA_TIMEOUT.to_owned(),
                format_duration(self.replica_timeout),
            );
        }
        if let Some(b) = self.resync_bandwidth.filter(|_| self.replicas > 1) {
            map.insert(RESYNC_BANDWIDTH.to_owned(), b.to_string());
        }
        if !self.mkfs_options.is_empty() {
            map.insert(MKFS_OPTIONS.to_owned(), self.mkfs_options.join(" "));
        }
        if let Some(tls) = self.tls {
            map.insert(TLS.to_owned(), tls.to_string());
        }
        map
    }
}

/// Everything the node needs to attach a volume, carried in `volume_context`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeContext {
    /// NBD data address `HOST:PORT` (a stable DNS name in a cluster).
    pub server: String,
    /// NBD export name of the volume.
    pub export: String,
    pub params: VolumeParams,
    /// Every replica, the one at `server` included; empty for a single-copy volume.
    pub replicas: Vec<ReplicaEndpoint>,
}

/// Where one replica of a mirrored volume lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEndpoint {
    /// The holding server's id (stable across restarts).
    pub id: crate::ids::ServerId,
    /// NBD data address `HOST:PORT`.
    pub data: String,
    /// Management gRPC URL (`http://HOST:PORT`), for the replica membership calls.
    pub mgmt: String,
}

impl fmt::Display for ReplicaEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}", self.id, self.data, self.mgmt)
    }
}

impl FromStr for ReplicaEndpoint {
    type Err = ParamError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| ParamError::Invalid {
            key: CTX_REPLICAS,
            value: s.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = s.split('@');
        let (Some(id), Some(data), Some(mgmt), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <replica-id>@<HOST:PORT>@<management URL>"));
        };
        let id = crate::ids::ServerId::parse(id).map_err(|e| bad(&e.to_string()))?;
        validate_server_address(data).map_err(|_| bad("data address is not HOST:PORT"))?;
        if !(mgmt.starts_with("http://") || mgmt.starts_with("https://"))
            || mgmt.len() > 512
            || mgmt.chars().any(|c| c.is_whitespace() || c == ',')
        {
            return Err(bad("management URL must be http(s)://HOST:PORT"));
        }
        Ok(Self {
            id,
            data: data.to_owned(),
            mgmt: mgmt.to_owned(),
        })
    }
}

/// Parses the `enbd.io/replicas` context value: 2 to [`MAX_REPLICAS`] distinct replicas.
fn parse_replicas(value: &str) -> Result<Vec<ReplicaEndpoint>, ParamError> {
    let list = value
        .split(',')
        .map(str::parse)
        .collect::<Result<Vec<ReplicaEndpoint>, _>>()?;
    let mut ids: Vec<_> = list.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    ids.dedup();
    if list.len() < 2 || list.len() > MAX_REPLICAS as usize || ids.len() != list.len() {
        return Err(ParamError::Invalid {
            key: CTX_REPLICAS,
            value: value.to_owned(),
            reason: format!("expected 2 to {MAX_REPLICAS} replicas on distinct servers"),
        });
    }
    Ok(list)
}

fn validate_server_address(value: &str) -> Result<(), ParamError> {
    let bad = |reason: &str| ParamError::Invalid {
        key: "enbd.io/server",
        value: value.to_owned(),
        reason: reason.to_owned(),
    };
    let (host, port) = value
        .rsplit_once(':')
        .ok_or_else(|| bad("expected HOST:PORT"))?;
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad("host is empty or malformed"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(bad("port must be 1 to 65535")),
    }
}

impl VolumeContext {
    pub fn to_context(&self) -> HashMap<String, String> {
        let mut map = self.params.to_context();
        map.insert(CTX_SERVER.to_owned(), self.server.clone());
        map.insert(CTX_EXPORT.to_owned(), self.export.clone());
        if !self.replicas.is_empty() {
            let list: Vec<String> = self.replicas.iter().map(ToString::to_string).collect();
            map.insert(CTX_REPLICAS.to_owned(), list.join(","));
        }
        map
    }

    /// Reads a volume context back (the node side). Strict like `from_map`: a
    /// key nobody wrote is an error, Kubernetes' own keys are ignored.
    pub fn from_context(map: &HashMap<String, String>) -> Result<Self, ParamError> {
        let server = map
            .get(CTX_SERVER)
            .ok_or(ParamError::MissingContext(CTX_SERVER))?;
        validate_server_address(server)?;
        let export = map
            .get(CTX_EXPORT)
            .ok_or(ParamError::MissingContext(CTX_EXPORT))?;
        if export.is_empty() || export.len() > 4096 {
            return Err(ParamError::Invalid {
                key: CTX_EXPORT,
                value: export.clone(),
                reason: "export name must be 1 to 4096 bytes".into(),
            });
        }
        let params = VolumeParams::from_entries(
            map.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &[CTX_SERVER, CTX_EXPORT, CTX_REPLICAS],
        )?;
        let replicas = match map.get(CTX_REPLICAS) {
            Some(v) => parse_replicas(v)?,
            None => Vec::new(),
        };
        // The count the class asked for and the replicas the controller placed must agree:
        // a node must never serve a mirrored volume as a single copy, or the reverse.
        let placed = replicas.len().max(1);
        if placed != params.replicas as usize {
            return Err(ParamError::Invalid {
                key: CTX_REPLICAS,
                value: map.get(CTX_REPLICAS).cloned().unwrap_or_default(),
                reason: format!(
                    "{} replica(s) listed but the volume has replicas={}",
                    placed, params.replicas
                ),
            });
        }
        if !replicas.is_empty() && !replicas.iter().any(|r| &r.data == server) {
            return Err(ParamError::Invalid {
                key: CTX_REPLICAS,
                value: map.get(CTX_REPLICAS).cloned().unwrap_or_default(),
                reason: format!("no replica is at {server}, the volume's server"),
            });
        }
        Ok(Self {
            server: server.clone(),
            export: export.clone(),
            params,
            replicas,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_map_gives_defaults() {
        let p = VolumeParams::from_map(&HashMap::new()).expect("defaults");
        assert_eq!(p, VolumeParams::default());
        assert_eq!(p.fs_type, FsType::Ext4);
        assert_eq!((p.channels, p.queue_depth, p.queues), (4, 128, 1));
        assert_eq!(p.brownout, Brownout::Wait);
        assert_eq!(p.replicas, 1);
    }

    #[test]
    fn parses_every_key() {
        let p = VolumeParams::from_map(&map(&[
            ("fsType", "xfs"),
            ("mkfsOptions", "-m 0  -L data"),
            ("channels", "16"),
            ("queueDepth", "1024"),
            ("queues", "2"),
            ("brownout", "fail-after=1m30s"),
            ("replicas", "1"),
            ("csi.storage.k8s.io/pvc/name", "data-0"),
            ("csi.storage.k8s.io/pv/name", "pvc-1"),
        ]))
        .expect("valid");
        assert_eq!(p.fs_type, FsType::Xfs);
        assert_eq!(p.mkfs_options, ["-m", "0", "-L", "data"]);
        assert_eq!((p.channels, p.queue_depth, p.queues), (16, 1024, 2));
        assert_eq!(p.brownout, Brownout::FailAfter(Duration::from_secs(90)));
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let err = VolumeParams::from_map(&map(&[("zeta", "1"), ("alpha", "2"), ("channels", "2")]))
            .unwrap_err();
        assert_eq!(
            err,
            ParamError::Unknown(vec!["alpha".into(), "zeta".into()])
        );
        assert_eq!(err.to_string(), "unknown parameter(s): alpha, zeta");
    }

    #[test]
    fn malformed_values_name_their_key() {
        for (key, value) in [
            ("fsType", "btrfs"),
            ("channels", "0"),
            ("channels", "17"),
            ("channels", "four"),
            ("queueDepth", "1025"),
            ("queues", "-1"),
            ("brownout", "never"),
            ("brownout", "fail-after="),
            ("brownout", "fail-after=0s"),
            ("brownout", "fail-after=10"),
            ("brownout", "fail-after=3d"),
            ("replicas", "0"),
            ("replicas", "4"),
            ("replicaTimeout", "50ms"),
            ("replicaTimeout", "11m"),
            ("replicaTimeout", "soon"),
            ("mkfsOptions", "-L\tx"),
            ("tls", "on"),
            ("tls", "Require"),
        ] {
            let err = VolumeParams::from_map(&map(&[(key, value)])).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("parameter {key}=")),
                "{key}={value}: {msg}"
            );
        }
        let p = VolumeParams::from_map(&map(&[("replicas", "3"), ("replicaTimeout", "1500ms")]))
            .expect("three replicas");
        assert_eq!(
            (p.replicas, p.replica_timeout),
            (3, Duration::from_millis(1500))
        );
        assert_eq!(
            p.to_context().get(REPLICA_TIMEOUT).map(String::as_str),
            Some("1500ms")
        );
        // tls: carried only when the StorageClass sets it (else the node's default applies).
        let p = VolumeParams::from_map(&map(&[("tls", "require")])).expect("tls");
        assert_eq!(p.tls, Some(TlsPolicy::Require));
        assert_eq!(p.to_context().get(TLS).map(String::as_str), Some("require"));
        assert!(!VolumeParams::default().to_context().contains_key(TLS));
        let p = VolumeParams::from_map(&map(&[("replicas", "2"), ("resyncBandwidth", "50Mi")]))
            .expect("bandwidth");
        assert_eq!(p.resync_bandwidth, Some(50 << 20));
        let ctx = p.to_context();
        assert_eq!(
            ctx.get(RESYNC_BANDWIDTH).map(String::as_str),
            Some("52428800")
        );
        // The canonical form parses back to the same value.
        let again: HashMap<String, String> = ctx.into_iter().collect();
        assert_eq!(VolumeParams::from_map(&again).expect("again"), p);
        for (v, want) in [
            ("100MB/s", 100_000_000),
            ("2Gi", 2 << 30),
            ("1048576", 1 << 20),
        ] {
            assert_eq!(parse_bandwidth(v), Ok(want), "{v}");
        }
        for bad in ["", "fast", "10", "5Ti", "-1Mi", "99999999999999999999"] {
            assert!(
                VolumeParams::from_map(&map(&[("resyncBandwidth", bad)]))
                    .unwrap_err()
                    .to_string()
                    .starts_with("parameter resyncBandwidth="),
                "{bad:?}"
            );
        }
        // A single copy has no replica timeout to carry.
        assert!(
            !VolumeParams::default()
                .to_context()
                .contains_key(REPLICA_TIMEOUT)
        );
    }

    fn replicated_context() -> VolumeContext {
        let ep = |i: u32| ReplicaEndpoint {
            id: crate::ids::ServerId::parse(&format!("enbd-server-{i}")).unwrap(),
            data: format!("enbd-server-{i}.enbd-server.storage.svc:10809"),
            mgmt: format!("http://enbd-server-{i}.enbd-server.storage.svc:10810"),
        };
        VolumeContext {
            server: ep(0).data,
            export: "pvc-1".into(),
            params: VolumeParams {
                replicas: 2,
                ..VolumeParams::default()
            },
            replicas: vec![ep(0), ep(1)],
        }
    }

    #[test]
    fn replicated_context_round_trips_and_is_checked() {
        let ctx = replicated_context();
        let map = ctx.to_context();
        assert_eq!(VolumeContext::from_context(&map), Ok(ctx.clone()));

        // The count and the list must agree.
        let mut m = map.clone();
        m.insert(REPLICAS.into(), "3".into());
        assert!(VolumeContext::from_context(&m).is_err());
        let mut m = map.clone();
        m.remove(CTX_REPLICAS);
        assert!(VolumeContext::from_context(&m).is_err());
        // The same server twice is not a mirror.
        let mut m = map.clone();
        let first = ctx.replicas[0].to_string();
        m.insert(CTX_REPLICAS.into(), format!("{first},{first}"));
        assert!(VolumeContext::from_context(&m).is_err());
        // The volume's own server must be one of the replicas.
        let mut m = map.clone();
        m.insert(CTX_SERVER.into(), "elsewhere:10809".into());
        assert!(VolumeContext::from_context(&m).is_err());
        for bad in [
            "x",
            "a@b@c",
            "enbd-server-0@host:1@ftp://h:2",
            "Bad_Id@h:1@http://h:2",
        ] {
            assert!(bad.parse::<ReplicaEndpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h1s"), Ok(Duration::from_secs(3601)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn context_round_trips() {
        let ctx = VolumeContext {
            server: "enbd-server-0.enbd-server.storage.svc:10809".into(),
            export: "pvc-1".into(),
            params: VolumeParams {
                fs_type: FsType::Xfs,
                mkfs_options: vec!["-K".into()],
                channels: 2,
                queue_depth: 64,
                queues: 4,
                brownout: Brownout::FailAfter(Duration::from_millis(2500)),
                replicas: 1,
                replica_timeout: DEFAULT_REPLICA_TIMEOUT,
                tls: Some(TlsPolicy::Require),
                resync_bandwidth: None,
            },
            replicas: Vec::new(),
        };
        let mut map = ctx.to_context();
        assert_eq!(
            map.get("enbd.io/server").map(String::as_str),
            Some(ctx.server.as_str())
        );
        assert_eq!(
            map.get("brownout").map(String::as_str),
            Some("fail-after=2500ms")
        );
        // kubelet adds pod information to the context it hands the node.
        map.insert("csi.storage.k8s.io/pod.name".into(), "web-0".into());
        // What external-provisioner writes into every PV's volume attributes.
        map.insert(
            "storage.kubernetes.io/csiProvisionerIdentity".into(),
            "1764612345678-1234-csi.enbd.io".into(),
        );
        assert_eq!(VolumeContext::from_context(&map), Ok(ctx.clone()));

        let defaults = VolumeContext {
            params: VolumeParams::default(),
            ..ctx
        };
        assert_eq!(
            VolumeContext::from_context(&defaults.to_context()),
            Ok(defaults)
        );
    }

    #[test]
    fn context_needs_server_and_export() {
        let full = VolumeContext {
            server: "10.0.0.1:10809".into(),
            export: "v".into(),
            params: VolumeParams::default(),
            replicas: Vec::new(),
        }
        .to_context();
        let mut m = full.clone();
        m.remove(CTX_SERVER);
        assert_eq!(
            VolumeContext::from_context(&m),
            Err(ParamError::MissingContext(CTX_SERVER))
        );
        let mut m = full.clone();
        m.remove(CTX_EXPORT);
        assert_eq!(
            VolumeContext::from_context(&m),
            Err(ParamError::MissingContext(CTX_EXPORT))
        );
        for bad in ["host", ":10809", "host:0", "host:port", "a b:1"] {
            let mut m = full.clone();
            m.insert(CTX_SERVER.into(), bad.into());
            assert!(VolumeContext::from_context(&m).is_err(), "{bad}");
        }
        let mut m = full;
        m.insert("surprise".into(), "x".into());
        assert_eq!(
            VolumeContext::from_context(&m),
            Err(ParamError::Unknown(vec!["surprise".into()]))
        );
    }
}
