//! Engine configuration: what to connect to and how to behave when the network goes away.
//! Invariant: a `ClientConfig` that passed `validate` describes a usable engine.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

/// What IO does while no channel can reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrownoutPolicy {
    /// IO waits (journalled) and resumes when a channel returns: the outage is invisible above.
    #[default]
    Wait,
    /// A request not acknowledged by the server within this time of its submission completes
    /// with EIO; the channel that held it is reset so it can never be applied later.
    FailAfter(Duration),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "brownout policy {0:?}: expected `wait` or `fail-after=<duration>` (e.g. 2s, 500ms, 1m30s)"
    )]
    BadBrownout(String),
    /// The shared parser's message (it names the duration).
    #[error("{0}")]
    BadDuration(String),
    #[error("no server address given")]
    NoServers,
    #[error("server address {0:?} is not HOST:PORT")]
    BadServer(String),
    #[error("export name is longer than 4096 bytes")]
    ExportTooLong,
    #[error("channels must be between 1 and {max}, got {got}")]
    BadChannels { got: u16, max: u16 },
    #[error(
        "journal_bytes {0} is too small: it must hold at least one maximum-size request ({1} bytes)"
    )]
    JournalTooSmall(usize, usize),
    #[error("queue_depth must be at least 1")]
    BadQueueDepth,
}

/// Parses a duration in the one syntax shared with the StorageClass parameters
/// ([`enbd_proto::params::parse_duration`]): `500ms`, `2s`, `1m`, `1h` or a sum such as
/// `1m30s`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    enbd_proto::params::parse_duration(s.trim()).map_err(ConfigError::BadDuration)
}

fn format_duration(d: Duration) -> String {
    enbd_proto::params::format_duration(d)
}

impl FromStr for BrownoutPolicy {
    type Err = ConfigError;
    /// The StorageClass parameter's parser, so that `attach --brownout` and a StorageClass
    /// accept exactly the same values.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<enbd_proto::params::Brownout>() {
            Ok(enbd_proto::params::Brownout::Wait) => Ok(Self::Wait),
            Ok(enbd_proto::params::Brownout::FailAfter(d)) => Ok(Self::FailAfter(d)),
            Err(_) => Err(ConfigError::BadBrownout(s.to_owned())),
        }
    }
}

impl fmt::Display for BrownoutPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Wait => f.write_str("wait"),
            Self::FailAfter(d) => write!(f, "fail-after={}", format_duration(*d)),
        }
    }
}

/// Most channels one volume may open to one server.
pub const MAX_CHANNELS: u16 = 64;
/// Largest single request the engine sends; bigger reads/writes are refused (the device layer
/// caps its IO size below this).
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Everything the engine needs to serve one volume.
///
/// `servers` is a list so replicas can be added later; today the engine uses the first entry
/// and opens `channels` connections to it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// NBD data addresses, `HOST:PORT`.
    pub servers: Vec<String>,
    pub export: String,
    /// Connections to open; more than one only when the server advertises CAN_MULTI_CONN.
    pub channels: u16,
    pub brownout: BrownoutPolicy,
    /// Bytes of request payload the journal may hold (reads count their length too);
    /// when full, new IO waits.
    pub journal_bytes: usize,
    /// Most requests in flight on one channel.
    pub queue_depth: u16,
    /// Time allowed for TCP connect + handshake before the attempt counts as failed.
    pub connect_timeout: Duration,
    /// A channel whose oldest request has had no reply for this long is declared dead and
    /// reconnected (its requests re-issued). `None`: only socket errors kill a channel.
    pub io_timeout: Option<Duration>,
    /// First and largest delay between reconnect attempts (doubling in between).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// TLS for every connection (NBD_OPT_STARTTLS required); `None`: plain text.
    pub tls: Option<std::sync::Arc<super::tls::ClientTls>>,
    /// Access token presented to every server (ENBD_OPT_ACCESS); `None`: none is sent.
    pub access: Option<std::sync::Arc<super::access::AccessCredential>>,
}

impl ClientConfig {
    /// A config with the defaults for everything but the address and export.
    pub fn new(server: impl Into<String>, export: impl Into<String>) -> Self {
        Self {
            servers: vec![server.into()],
            export: export.into(),
            channels: 1,
            brownout: BrownoutPolicy::Wait,
            journal_bytes: 64 << 20,
            queue_depth: 128,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Some(Duration::from_secs(30)),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            tls: None,
            access: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(ConfigError::NoServers);
        }
        for s in &self.servers {
            match s.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(ConfigError::BadServer(s.clone())),
            }
        }
        if self.export.len() > 4096 {
            return Err(ConfigError::ExportTooLong);
        }
        if self.channels == 0 || self.channels > MAX_CHANNELS {
            return Err(ConfigError::BadChannels {
                got: self.channels,
                max: MAX_CHANNELS,
            });
        }
        if self.queue_depth == 0 {
            return Err(ConfigError::BadQueueDepth);
        }
        if self.journal_bytes < MAX_REQUEST_BYTES {
            return Err(ConfigError::JournalTooSmall(
                self.journal_bytes,
                MAX_REQUEST_BYTES,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brownout_parses_and_prints() {
        assert_eq!("wait".parse::<BrownoutPolicy>(), Ok(BrownoutPolicy::Wait));
        assert_eq!(
            "fail-after=2s".parse::<BrownoutPolicy>(),
            Ok(BrownoutPolicy::FailAfter(Duration::from_secs(2)))
        );
        assert_eq!(
            "fail-after=250ms".parse::<BrownoutPolicy>(),
            Ok(BrownoutPolicy::FailAfter(Duration::from_millis(250)))
        );
        assert_eq!(
            BrownoutPolicy::FailAfter(Duration::from_secs(3)).to_string(),
            "fail-after=3s"
        );
        assert_eq!(
            BrownoutPolicy::FailAfter(Duration::from_millis(1500)).to_string(),
            "fail-after=1500ms"
        );
        // The StorageClass syntax: sums of units, as `brownout: fail-after=1m30s` takes.
        assert_eq!(
            "fail-after=1m30s".parse::<BrownoutPolicy>(),
            Ok(BrownoutPolicy::FailAfter(Duration::from_secs(90)))
        );
        assert_eq!(parse_duration("1h2m3s"), Ok(Duration::from_secs(3723)));
        for bad in [
            "",
            "fail",
            "fail-after=",
            "fail-after=0s",
            "fail-after=3x",
            "fail-after=30",
            "fail-after=1.5s",
            "waitx",
        ] {
            assert!(bad.parse::<BrownoutPolicy>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn validate_catches_bad_configs() {
        let ok = ClientConfig::new("127.0.0.1:10809", "vol");
        assert_eq!(ok.validate(), Ok(()));
        let mut c = ok.clone();
        c.servers.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoServers));
        let mut c = ok.clone();
        c.servers = vec!["nohost".into()];
        assert!(matches!(c.validate(), Err(ConfigError::BadServer(_))));
        let mut c = ok.clone();
        c.channels = 0;
        assert!(matches!(c.validate(), Err(ConfigError::BadChannels { .. })));
        let mut c = ok;
        c.journal_bytes = 4096;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::JournalTooSmall(..))
        ));
    }
}
