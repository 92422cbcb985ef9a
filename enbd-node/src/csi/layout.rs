//! What is staged and published where, read back from the kernel's mount table rather than
//! from a record of our own, so the answer survives daemon restarts and never disagrees
//! with reality.
//!
//! Layout: a Filesystem volume is staged by mounting its device on the staging directory;
//! a Block volume is staged by bind-mounting its device node onto the file
//! `<staging>/device`. Publishing bind-mounts the staging directory (or that file) onto the
//! target. All functions here block; callers run them on a blocking thread.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::mount::{self, MountEntry, MountTable};

use super::error::NodeError;

/// File inside a Block volume's staging directory on which its device node is bound.
pub const STAGED_DEVICE_FILE: &str = "device";

/// Device number of a block device.
pub type DevNum = (u32, u32);

/// What a staging path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    Nothing,
    Filesystem(MountEntry),
    Block { device_file: PathBuf, dev: DevNum },
}

/// Resolves symlinks in an existing path so it compares equal to mountinfo's form; a path
/// that does not exist (or cannot be resolved) is returned as given.
pub fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

pub fn inspect_staging(table: &MountTable, staging: &Path) -> Result<Staged, NodeError> {
    let staging = resolve(staging);
    if let Some(entry) = table.at(&staging) {
        return Ok(Staged::Filesystem(entry.clone()));
    }
    let device_file = staging.join(STAGED_DEVICE_FILE);
    if table.at(&device_file).is_some() {
        let dev = mount::block_device_number(&device_file)?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!(
                "{} is mounted but is not a block device",
                device_file.display()
            ))
        })?;
        return Ok(Staged::Block { device_file, dev });
    }
    Ok(Staged::Nothing)
}

/// Number of the block device node at `dev_path`.
pub fn device_number(dev_path: &Path) -> Result<DevNum, NodeError> {
    mount::block_device_number(dev_path)?
        .ok_or_else(|| NodeError::Internal(format!("{} is not a block device", dev_path.display())))
}

/// Mount points where the device node `dev_path` (number `dev`) is bind-mounted — raw
/// block publishes, the staged device file, and the read-only loop devices over it that
/// read-only raw publishes get ([`mount::loopdev`]) — excluding `except`. Only mounts whose
/// root is that node's name (or a loop's) are stat-ed, so unrelated (possibly hung) mounts
/// are not touched.
pub fn device_node_binds(
    table: &MountTable,
    dev_path: &Path,
    dev: DevNum,
    except: &Path,
) -> Vec<MountEntry> {
    let Some(name) = dev_path.file_name() else {
        return Vec::new();
    };
    let candidate = |e: &MountEntry| {
        e.root
            .file_name()
            .is_some_and(|root| root == name || root.to_string_lossy().starts_with("loop"))
    };
    table
        .entries()
        .iter()
        .filter(|e| e.mount_point != except && candidate(e))
        .filter(|e| publishes_device(&e.mount_point, dev))
        .cloned()
        .collect()
}

/// Whether the block device node at `path` is device `dev` itself, or a loop device that
/// reads from it (a read-only raw block publish).
pub fn publishes_device(path: &Path, dev: DevNum) -> bool {
    match mount::block_device_number(path) {
        Ok(Some(n)) if n == dev => true,
        Ok(Some(n)) => matches!(mount::loopdev::backing_of(n), Ok(Some(b)) if b == dev),
        _ => false,
    }
}

/// Mounts, other than the staging mount itself, of the filesystem on `dev`.
pub fn filesystem_binds(table: &MountTable, dev: DevNum, staging: &Path) -> Vec<MountEntry> {
    table
        .other_mounts_of(dev.0, dev.1, &resolve(staging))
        .into_iter()
        .cloned()
        .collect()
}

/// Creates the directory a filesystem is mounted on (idempotent).
pub fn ensure_dir(path: &Path) -> Result<(), NodeError> {
    std::fs::create_dir_all(path)
        .map_err(|e| NodeError::Internal(format!("create directory {}: {e}", path.display())))
}

/// Creates the empty file a device node is bound onto (idempotent), and its parent.
pub fn ensure_file(path: &Path) -> Result<(), NodeError> {
    if let Some(parent) = path.parent() {
        ensure_dir(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            return Err(NodeError::FailedPrecondition(format!(
                "{} is a directory; a block volume needs a file there",
                path.display()
            )));
        }
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(NodeError::Internal(format!("stat {}: {e}", path.display()))),
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| NodeError::Internal(format!("create file {}: {e}", path.display())))
}

/// Unmounts everything stacked on `path`, then removes the file or empty directory.
/// A path that is already gone is success; a non-empty directory is left alone (it holds
/// data written while nothing was mounted, which is not ours to delete).
pub fn unmount_and_remove(path: &Path) -> Result<(), NodeError> {
    let resolved = resolve(path);
    // Stacked mounts are rare but possible after a crashed retry; the bound keeps a
    // misbehaving kernel from looping us forever.
    for _ in 0..16 {
        let table = MountTable::read()?;
        if table.at(&resolved).is_none() {
            break;
        }
        mount::unmount(&resolved)?;
    }
    if MountTable::read()?.at(&resolved).is_some() {
        return Err(NodeError::Internal(format!(
            "{} is still mounted after 16 unmounts",
            path.display()
        )));
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NodeError::Internal(format!("stat {}: {e}", path.display()))),
    };
    let removed = if meta.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == ErrorKind::DirectoryNotEmpty => {
            Err(NodeError::FailedPrecondition(format!(
                "{} is not mounted but not empty; refusing to delete its content",
                path.display()
            )))
        }
        Err(e) => Err(NodeError::Internal(format!(
            "remove {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_staged_in_a_fresh_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = MountTable::read().expect("mountinfo");
        assert_eq!(
            inspect_staging(&table, dir.path()).expect("inspect"),
            Staged::Nothing
        );
        assert_eq!(
            inspect_staging(&table, &dir.path().join("missing")).expect("inspect"),
            Staged::Nothing
        );
    }

    #[test]
    fn ensure_file_is_idempotent_and_refuses_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a/b/target");
        ensure_file(&f).expect("create");
        ensure_file(&f).expect("again");
        assert!(f.is_file());
        let err = ensure_file(dir.path()).expect_err("dir");
        assert!(matches!(err, NodeError::FailedPrecondition(_)));
    }

    #[test]
    fn unmount_and_remove_handles_files_dirs_and_absence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d");
        ensure_dir(&d).expect("mkdir");
        unmount_and_remove(&d).expect("remove dir");
        assert!(!d.exists());
        unmount_and_remove(&d).expect("already gone");
        let f = dir.path().join("f");
        ensure_file(&f).expect("create");
        unmount_and_remove(&f).expect("remove file");
        assert!(!f.exists());
    }

    #[test]
    fn unmount_and_remove_keeps_unexpected_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("d");
        ensure_dir(&d).expect("mkdir");
        std::fs::write(d.join("data"), b"precious").expect("write");
        let err = unmount_and_remove(&d).expect_err("non-empty");
        assert!(matches!(err, NodeError::FailedPrecondition(_)));
        assert!(d.join("data").exists());
    }
}
