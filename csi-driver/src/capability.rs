//! Which volume capabilities this driver supports, decided in one place.
//!
//! Block and Filesystem (ext4, xfs) access; every single-node access mode and
//! multi-node read-only. Multi-node writers are allowed only on raw Block
//! volumes: ext4 and xfs are not cluster filesystems, and two nodes mounting one
//! read-write would corrupt it. Multi-node single-writer is refused because
//! nothing could enforce "single writer" across nodes.

use enbd_proto::csi::VolumeCapability;
use enbd_proto::csi::volume_capability::AccessType;
use enbd_proto::csi::volume_capability::access_mode::Mode;
use enbd_proto::params::FsType;

/// A capability this driver accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub block: bool,
    pub mode: Mode,
}

impl Checked {
    /// Whether more than one node may have the volume published at once.
    pub fn multi_node(self) -> bool {
        matches!(
            self.mode,
            Mode::MultiNodeReaderOnly | Mode::MultiNodeMultiWriter
        )
    }
}

/// The smallest volume every filesystem these capabilities mount can be made on (`default`:
/// the StorageClass's `fsType`, used where a capability names none), and that filesystem;
/// `None` when no mounted filesystem has a floor (ext4, raw block).
pub fn fs_floor(caps: &[VolumeCapability], default: FsType) -> Option<(FsType, u64)> {
    caps.iter()
        .filter_map(|c| match &c.access_type {
            Some(AccessType::Mount(m)) if m.fs_type.is_empty() => Some(default),
            Some(AccessType::Mount(m)) => m.fs_type.parse::<FsType>().ok(),
            _ => None,
        })
        .filter_map(|fs| fs.min_device_bytes().map(|min| (fs, min)))
        .max_by_key(|&(_, min)| min)
}

/// Checks one capability; the error says what is unsupported.
pub fn check(cap: &VolumeCapability) -> Result<Checked, String> {
    let block = match &cap.access_type {
        None => return Err("volume capability has no access type (block or mount)".into()),
        Some(AccessType::Block(_)) => true,
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() {
                m.fs_type.parse::<FsType>().map_err(|_| {
                    format!("fs_type {:?} is not supported (ext4 or xfs)", m.fs_type)
                })?;
            }
            false
        }
    };
    let raw = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
    let mode = Mode::try_from(raw).map_err(|_| format!("access mode {raw} is unknown"))?;
    match mode {
        Mode::Unknown => Err("volume capability has no access mode".into()),
        Mode::MultiNodeSingleWriter => {
            Err("access mode MULTI_NODE_SINGLE_WRITER is not supported".into())
        }
        Mode::MultiNodeMultiWriter if !block => {
            Err("access mode MULTI_NODE_MULTI_WRITER is only supported for block volumes".into())
        }
        _ => Ok(Checked { block, mode }),
    }
}

/// Checks a non-empty list of capabilities.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Checked>, String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    caps.iter().map(check).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use enbd_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    use super::*;

    fn cap(block: bool, fs: &str, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                })
            }),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn supported() {
        for (block, fs, mode) in [
            (false, "", Mode::SingleNodeWriter),
            (false, "xfs", Mode::SingleNodeSingleWriter),
            (false, "ext4", Mode::MultiNodeReaderOnly),
            (true, "", Mode::MultiNodeMultiWriter),
            (true, "", Mode::SingleNodeMultiWriter),
            (false, "", Mode::SingleNodeReaderOnly),
        ] {
            assert!(
                check(&cap(block, fs, mode)).is_ok(),
                "{block} {fs} {mode:?}"
            );
        }
        assert!(
            check(&cap(true, "", Mode::MultiNodeMultiWriter))
                .unwrap()
                .multi_node()
        );
        assert!(
            !check(&cap(false, "", Mode::SingleNodeWriter))
                .unwrap()
                .multi_node()
        );
    }

    #[test]
    fn unsupported() {
        assert!(
            check(&cap(false, "btrfs", Mode::SingleNodeWriter))
                .unwrap_err()
                .contains("btrfs")
        );
        assert!(check(&cap(false, "", Mode::MultiNodeMultiWriter)).is_err());
        assert!(check(&cap(true, "", Mode::MultiNodeSingleWriter)).is_err());
        assert!(check(&cap(true, "", Mode::Unknown)).is_err());
        assert!(
            check(&VolumeCapability {
                access_type: None,
                access_mode: None
            })
            .is_err()
        );
        assert!(check_all(&[]).is_err());
    }
}
