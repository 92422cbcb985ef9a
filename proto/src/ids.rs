//! CSI volume and snapshot identifiers: `<server-id>/<name>`.
//!
//! The server id is the enbd-server's `--server-id` (its StatefulSet pod name),
//! so a node can reach the server through stable DNS without asking anyone; the
//! name is the volume's or snapshot's name on that server (also its NBD export).
//!
//! Invariants, checked once at parse/construction time so nothing downstream has
//! to re-check: the server id is 1..=63 bytes of `[a-z0-9.-]` starting with a
//! letter or digit (a DNS label, dots allowed); the name is 1..=128 bytes of ASCII
//! letters, digits, `.`, `_`, `-` starting with a letter or digit (one safe path
//! component, as the server requires); the whole id is at most 128 bytes, the
//! CSI spec's limit for string fields.

use std::fmt;
use std::str::FromStr;

/// The CSI spec's general size limit for string fields, IDs included.
pub const MAX_ID_LEN: usize = 128;
/// Longest server id: a DNS label (StatefulSet pod names are hostnames).
pub const MAX_SERVER_ID_LEN: usize = 63;
/// Longest volume or snapshot name on a server.
pub const MAX_NAME_LEN: usize = 128;

/// Why an identifier was refused. Messages name the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {id:?} is not of the form <server-id>/<name>")]
    MissingSeparator { kind: &'static str, id: String },
    #[error(
        "server id {0:?} is invalid: it must be 1 to {MAX_SERVER_ID_LEN} characters of \
         lower-case letters, digits, '.' or '-', starting with a letter or digit"
    )]
    BadServerId(String),
    #[error(
        "name {0:?} is invalid: it must be 1 to {MAX_NAME_LEN} characters of letters, digits, \
         '.', '_' or '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("{kind} {id:?} is {len} bytes long; CSI allows at most {MAX_ID_LEN}")]
    TooLong {
        kind: &'static str,
        id: String,
        len: usize,
    },
}

/// A validated enbd-server identity (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(String);

impl ServerId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_SERVER_ID_LEN
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::BadServerId(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// A validated volume or snapshot name on one server (see the module invariants).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName(String);

impl ObjectName {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_NAME_LEN
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::BadName(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ObjectName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// Defines a `<server-id>/<name>` identifier type; volumes and snapshots share
/// the format but must never be confused, hence two types.
macro_rules! qualified_id {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $ty {
            server: ServerId,
            name: ObjectName,
        }

        impl $ty {
            /// Joins a server and a name, refusing a result longer than CSI allows.
            pub fn new(server: ServerId, name: ObjectName) -> Result<Self, IdError> {
                let len = server.0.len() + 1 + name.0.len();
                if len > MAX_ID_LEN {
                    return Err(IdError::TooLong {
                        kind: $kind,
                        id: format!("{server}/{name}"),
                        len,
                    });
                }
                Ok(Self { server, name })
            }

            /// Parses `<server-id>/<name>`; the first `/` separates the parts
            /// (names never contain one, so any later `/` makes the name invalid).
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if s.is_empty() {
                    return Err(IdError::Empty { kind: $kind });
                }
                if s.len() > MAX_ID_LEN {
                    return Err(IdError::TooLong { kind: $kind, id: s.to_owned(), len: s.len() });
                }
                let (server, name) = s
                    .split_once('/')
                    .ok_or_else(|| IdError::MissingSeparator { kind: $kind, id: s.to_owned() })?;
                Self::new(ServerId::parse(server)?, ObjectName::parse(name)?)
            }

            pub fn server(&self) -> &ServerId {
                &self.server
            }

            pub fn name(&self) -> &ObjectName {
                &self.name
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}", self.server, self.name)
            }
        }

        impl FromStr for $ty {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
    };
}

qualified_id!(
    /// A CSI `volume_id`: the volume `name` on enbd-server `server`.
    VolumeId,
    "volume id"
);
qualified_id!(
    /// A CSI `snapshot_id`: the snapshot `name` on enbd-server `server`.
    SnapshotId,
    "snapshot id"
);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_round_trips() {
        let id = VolumeId::parse("enbd-server-0/pvc-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab")
            .expect("valid id");
        assert_eq!(id.server().as_str(), "enbd-server-0");
        assert_eq!(
            id.name().as_str(),
            "pvc-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab"
        );
        assert_eq!(
            id.to_string(),
            "enbd-server-0/pvc-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab"
        );
        assert_eq!(id.to_string().parse::<VolumeId>(), Ok(id));
    }

    #[test]
    fn new_joins_parts() {
        let server = ServerId::parse("node-a.storage").expect("server");
        let name = ObjectName::parse("Snap_1.v2").expect("name");
        let id = SnapshotId::new(server, name).expect("fits");
        assert_eq!(id.to_string(), "node-a.storage/Snap_1.v2");
    }

    #[test]
    fn refuses_malformed_ids_naming_the_problem() {
        assert_eq!(
            VolumeId::parse(""),
            Err(IdError::Empty { kind: "volume id" })
        );
        assert_eq!(
            VolumeId::parse("no-slash"),
            Err(IdError::MissingSeparator {
                kind: "volume id",
                id: "no-slash".into()
            })
        );
        assert_eq!(
            VolumeId::parse("/name"),
            Err(IdError::BadServerId(String::new()))
        );
        assert_eq!(
            VolumeId::parse("Upper/name"),
            Err(IdError::BadServerId("Upper".into()))
        );
        assert_eq!(
            VolumeId::parse("-s/name"),
            Err(IdError::BadServerId("-s".into()))
        );
        assert_eq!(
            VolumeId::parse("s_x/name"),
            Err(IdError::BadServerId("s_x".into()))
        );
        assert_eq!(VolumeId::parse("s/"), Err(IdError::BadName(String::new())));
        assert_eq!(
            VolumeId::parse("s/a/b"),
            Err(IdError::BadName("a/b".into()))
        );
        assert_eq!(VolumeId::parse("s/.."), Err(IdError::BadName("..".into())));
        assert_eq!(
            VolumeId::parse("s/a b"),
            Err(IdError::BadName("a b".into()))
        );
        let msg = VolumeId::parse("s/a b")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"a b\""), "{msg}");
    }

    #[test]
    fn enforces_length_limits() {
        let long_server = "s".repeat(MAX_SERVER_ID_LEN + 1);
        assert_eq!(
            ServerId::parse(&long_server),
            Err(IdError::BadServerId(long_server.clone()))
        );
        assert!(ServerId::parse(&"s".repeat(MAX_SERVER_ID_LEN)).is_ok());
        assert!(ObjectName::parse(&"n".repeat(MAX_NAME_LEN)).is_ok());
        assert!(ObjectName::parse(&"n".repeat(MAX_NAME_LEN + 1)).is_err());

        // 1 + 1 + 126 = 128 bytes: the longest id that fits.
        let fits = format!("s/{}", "n".repeat(126));
        assert!(VolumeId::parse(&fits).is_ok());
        let too_long = format!("s/{}", "n".repeat(127));
        assert!(matches!(
            VolumeId::parse(&too_long),
            Err(IdError::TooLong { len: 129, .. })
        ));
        let server = ServerId::parse("s").expect("server");
        let name = ObjectName::parse(&"n".repeat(127)).expect("name");
        assert!(matches!(
            SnapshotId::new(server, name),
            Err(IdError::TooLong { .. })
        ));
    }
}
