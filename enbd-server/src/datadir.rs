//! `--prepare-data-dir-for UID:GID`: the one-shot init step of a data directory that the
//! server itself cannot create.
//!
//! Why: a Kubernetes `hostPath` directory of type `DirectoryOrCreate` is created by the kubelet
//! as root, mode 0755, and `fsGroup` does not apply to hostPath volumes, so the server running
//! as its non-root user cannot create `volumes/` in it (the real-cluster suite found this). The
//! chart runs this step in an init container as root with only CAP_CHOWN. Only the directory
//! itself changes hands: everything inside it is created later by the server, as its own user.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// A numeric `UID:GID` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for Owner {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (uid, gid) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not UID:GID"))?;
        let num = |what: &str, v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{s:?}: the {what} {v:?} is not a number"))
        };
        Ok(Owner {
            uid: num("uid", uid)?,
            gid: num("gid", gid)?,
        })
    }
}

/// Creates `dir` (and its parents) if missing, gives it to `owner` and sets mode 0750.
/// A path that exists but is not a directory is an error, never replaced.
pub fn prepare(dir: &Path, owner: Owner) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    // Mode first, while the directory may still be ours: changing the mode of a directory
    // someone else owns takes CAP_FOWNER as well.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    std::os::unix::fs::chown(dir, Some(owner.uid), Some(owner.gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn owner_parses_only_numeric_pairs() {
        assert_eq!(
            "65532:65532".parse(),
            Ok(Owner {
                uid: 65532,
                gid: 65532
            })
        );
        for bad in ["", "65532", "a:1", "1:", ":1", "1:2:3", "-1:0"] {
            assert!(bad.parse::<Owner>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prepare_creates_the_directory_for_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/data");
        // Chowning to ourselves is always allowed; as root, to the server's user too.
        let me = std::fs::metadata(tmp.path()).unwrap();
        let owner = if me.uid() == 0 {
            Owner {
                uid: 65532,
                gid: 65532,
            }
        } else {
            Owner {
                uid: me.uid(),
                gid: me.gid(),
            }
        };
        prepare(&dir, owner).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        assert_eq!(meta.mode() & 0o777, 0o750);
        // Again on the existing directory: still fine.
        prepare(&dir, owner).unwrap();
    }

    #[test]
    fn prepare_refuses_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("data");
        std::fs::write(&file, b"x").unwrap();
        let me = std::fs::metadata(&file).unwrap();
        let err = prepare(
            &file,
            Owner {
                uid: me.uid(),
                gid: me.gid(),
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("not a directory")
                || err.kind() == std::io::ErrorKind::AlreadyExists,
            "{err}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
