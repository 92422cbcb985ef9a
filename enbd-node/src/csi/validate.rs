//! Argument checks shared by the node RPCs, run before anything touches the system.
//!
//! Invariants: a path accepted here is absolute, at most 4096 bytes, free of NUL and of
//! `.`/`..` components, and not `/` itself; a capability accepted here names exactly one
//! access type and an access mode this node can serve.

use std::path::{Component, Path, PathBuf};

use enbd_proto::csi::VolumeCapability;
use enbd_proto::csi::volume_capability::{AccessType, access_mode::Mode};
use enbd_proto::ids::VolumeId;
use enbd_proto::params::FsType;

use super::error::NodeError;

const MAX_PATH_LEN: usize = 4096;

/// Parses a required volume id.
pub fn volume_id(raw: &str) -> Result<VolumeId, NodeError> {
    if raw.is_empty() {
        return Err(NodeError::InvalidArgument("volume_id is required".into()));
    }
    Ok(VolumeId::parse(raw)?)
}

/// Parses the volume id of a call about a volume that must already be here (stats,
/// expansion): an id we could never have issued names a volume that does not exist on this
/// node, so it is `NotFound`, as the spec asks for an unknown volume; only a missing id is
/// `InvalidArgument`.
pub fn existing_volume_id(raw: &str) -> Result<VolumeId, NodeError> {
    if raw.is_empty() {
        return Err(NodeError::InvalidArgument("volume_id is required".into()));
    }
    VolumeId::parse(raw)
        .map_err(|e| NodeError::NotFound(format!("volume {raw:?} is not known here ({e})")))
}

/// A required argument is there (checked before anything else, so a call missing one is
/// `InvalidArgument` even when its other arguments name nothing known).
pub fn present(field: &str, raw: &str) -> Result<(), NodeError> {
    if raw.is_empty() {
        Err(NodeError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Checks the path of a call that looks at what is already there (stats): no volume can be
/// at a path this node would never have used, so a malformed one is `NotFound`; only a
/// missing one is `InvalidArgument`.
pub fn existing_path(field: &str, raw: &str) -> Result<PathBuf, NodeError> {
    match path(field, raw) {
        Err(NodeError::InvalidArgument(why)) if !raw.is_empty() => {
            Err(NodeError::NotFound(format!("no volume at {field}: {why}")))
        }
        other => other,
    }
}

/// Checks a required path argument (`field` names it in the error).
pub fn path(field: &str, raw: &str) -> Result<PathBuf, NodeError> {
    if raw.is_empty() {
        return Err(NodeError::InvalidArgument(format!("{field} is required")));
    }
    let bad = |why: &str| NodeError::InvalidArgument(format!("{field} {raw:?} {why}"));
    if raw.len() > MAX_PATH_LEN {
        return Err(bad("is too long"));
    }
    if raw.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let p = Path::new(raw);
    if !p.is_absolute() {
        return Err(bad("is not absolute"));
    }
    if raw.split('/').any(|c| c == ".." || c == ".") {
        return Err(bad("contains a '.' or '..' component"));
    }
    if !p.components().any(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("is the root directory"));
    }
    Ok(p.components().collect())
}

/// Checks an optional path argument: empty means absent.
pub fn optional_path(field: &str, raw: &str) -> Result<Option<PathBuf>, NodeError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        path(field, raw).map(Some)
    }
}

/// How a volume is presented to its users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount {
        /// Filesystem asked for by the capability; `None` when it left the choice to the
        /// StorageClass (or an existing filesystem).
        fs_type: Option<FsType>,
        mount_flags: Vec<String>,
    },
}

/// A validated volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Reader-only modes: the device is attached and mounted read-only.
    pub fn reader_only(&self) -> bool {
        matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }

    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }
}

/// Validates a required capability.
pub fn capability(cap: Option<&VolumeCapability>) -> Result<Capability, NodeError> {
    let cap =
        cap.ok_or_else(|| NodeError::InvalidArgument("volume_capability is required".into()))?;
    let access = match &cap.access_type {
        None => {
            return Err(NodeError::InvalidArgument(
                "volume_capability needs an access type (block or mount)".into(),
            ));
        }
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if !m.volume_mount_group.is_empty() {
                return Err(NodeError::InvalidArgument(
                    "volume_mount_group is not supported (VOLUME_MOUNT_GROUP is not advertised)"
                        .into(),
                ));
            }
            let fs_type = if m.fs_type.is_empty() {
                None
            } else {
                Some(m.fs_type.parse::<FsType>().map_err(|_| {
                    NodeError::InvalidArgument(format!(
                        "fs_type {:?} is not supported: use ext4 or xfs",
                        m.fs_type
                    ))
                })?)
            };
            // Refused options are caught here, before anything is attached.
            crate::mount::options::parse(&m.mount_flags, false)?;
            Access::Mount {
                fs_type,
                mount_flags: m.mount_flags.clone(),
            }
        }
    };
    let raw_mode = cap
        .access_mode
        .ok_or_else(|| NodeError::InvalidArgument("volume_capability needs an access mode".into()))?
        .mode;
    let mode = Mode::try_from(raw_mode)
        .map_err(|_| NodeError::InvalidArgument(format!("unknown access mode {raw_mode}")))?;
    let supported = match mode {
        Mode::Unknown => false,
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter
        | Mode::MultiNodeReaderOnly => true,
        // A filesystem mounted from two nodes at once would be corrupted; a raw device can be
        // shared by applications that coordinate their own writes.
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => matches!(access, Access::Block),
    };
    if !supported {
        let kind = if matches!(access, Access::Block) {
            "block"
        } else {
            "mount"
        };
        return Err(NodeError::InvalidArgument(format!(
            "access mode {} is not supported for {kind} volumes",
            mode.as_str_name()
        )));
    }
    Ok(Capability { access, mode })
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use enbd_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use tonic::Code;

    fn code(e: NodeError) -> Code {
        tonic::Status::from(e).code()
    }

    #[test]
    fn paths() {
        assert_eq!(
            path("p", "/var/lib/x").expect("ok"),
            PathBuf::from("/var/lib/x")
        );
        assert_eq!(
            path("p", "/var//lib/x/").expect("ok"),
            PathBuf::from("/var/lib/x")
        );
        for bad in [
            "",
            "relative/x",
            "/a/../b",
            "/a/./b",
            "/..",
            "/",
            "//",
            "/a\0b",
        ] {
            let err = path("target_path", bad).expect_err(bad);
            assert_eq!(code(err), Code::InvalidArgument, "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(5000));
        assert!(path("p", &long).is_err());
        assert_eq!(optional_path("p", "").expect("ok"), None);
        assert!(optional_path("p", "x").is_err());
    }

    #[test]
    fn lookups_of_what_cannot_exist_are_not_found() {
        assert_eq!(
            code(existing_volume_id("").expect_err("empty")),
            Code::InvalidArgument
        );
        for unknown in ["noslash", "Server/x", "some-id"] {
            assert_eq!(
                code(existing_volume_id(unknown).expect_err(unknown)),
                Code::NotFound,
                "{unknown}"
            );
        }
        assert!(existing_volume_id("server-0/pvc-1").is_ok());
        assert_eq!(
            code(existing_path("volume_path", "").expect_err("empty")),
            Code::InvalidArgument
        );
        for bad in ["some/path", "/a/../b", "/"] {
            assert_eq!(
                code(existing_path("volume_path", bad).expect_err(bad)),
                Code::NotFound,
                "{bad}"
            );
        }
        assert!(existing_path("volume_path", "/var/lib/x").is_ok());
    }

    #[test]
    fn volume_ids() {
        assert!(volume_id("server-0/pvc-1").is_ok());
        for bad in ["", "noslash", "Server/x", "s/../x", "s/a/b"] {
            assert_eq!(
                code(volume_id(bad).expect_err(bad)),
                Code::InvalidArgument,
                "{bad}"
            );
        }
    }

    fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        }
    }

    fn block_cap(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }

    #[test]
    fn capabilities() {
        let c = capability(Some(&mount_cap("", Mode::SingleNodeWriter))).expect("ok");
        assert_eq!(
            c.access,
            Access::Mount {
                fs_type: None,
                mount_flags: vec![]
            }
        );
        let c = capability(Some(&mount_cap("xfs", Mode::SingleNodeReaderOnly))).expect("ok");
        assert!(c.reader_only());
        assert!(
            capability(Some(&block_cap(Mode::MultiNodeMultiWriter)))
                .expect("ok")
                .is_block()
        );

        let bad = [
            None,
            Some(mount_cap("btrfs", Mode::SingleNodeWriter)),
            Some(mount_cap("ext4", Mode::MultiNodeMultiWriter)),
            Some(mount_cap("ext4", Mode::Unknown)),
            Some(VolumeCapability {
                access_mode: None,
                ..mount_cap("", Mode::SingleNodeWriter)
            }),
            Some(VolumeCapability {
                access_type: None,
                ..mount_cap("", Mode::SingleNodeWriter)
            }),
            Some(VolumeCapability {
                access_mode: Some(AccessMode { mode: 99 }),
                ..block_cap(Mode::SingleNodeWriter)
            }),
            Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    mount_flags: vec!["rbind".into()],
                    ..Default::default()
                })),
                ..mount_cap("", Mode::SingleNodeWriter)
            }),
        ];
        for cap in bad {
            let err = capability(cap.as_ref()).expect_err("must refuse");
            assert_eq!(code(err), Code::InvalidArgument);
        }
    }
}
