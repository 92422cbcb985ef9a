//! Parser for `/proc/self/mountinfo`, the kernel's authoritative list of what is mounted
//! where in this mount namespace.
//!
//! Invariant: paths are unescaped (the kernel writes space, tab, newline and backslash as
//! `\ooo` octal) so they compare equal to the paths callers hold. When several mounts are
//! stacked on one mount point, the last line is the visible one.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::MountError;

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Path within the source filesystem that is mounted here (`/` for a whole filesystem;
    /// the file or directory name for a bind mount).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `ro`, `nosuid`, ...).
    pub mount_options: String,
    pub fs_type: String,
    /// Mount source as given to mount(2), e.g. `/dev/ublkb0`.
    pub source: String,
    /// Per-superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// Whether this mount is read-only for its users.
    pub fn is_read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }
}

/// A snapshot of the mount table.
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    entries: Vec<MountEntry>,
}

impl MountTable {
    /// Reads this process's mount table.
    pub fn read() -> Result<MountTable, MountError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = std::fs::read_to_string(path).map_err(|source| MountError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?;
        MountTable::parse(&text)
    }

    pub fn parse(text: &str) -> Result<MountTable, MountError> {
        let entries = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(idx, line)| {
                parse_line(line).map_err(|reason| MountError::MountInfo {
                    line: idx + 1,
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MountTable { entries })
    }

    pub fn entries(&self) -> &[MountEntry] {
        &self.entries
    }

    /// The visible (topmost) mount at exactly `mount_point`, if any.
    pub fn at(&self, mount_point: &Path) -> Option<&MountEntry> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.mount_point == mount_point)
    }

    /// Mount points, other than `except`, whose source is the device `major:minor`.
    pub fn other_mounts_of(&self, major: u32, minor: u32, except: &Path) -> Vec<&MountEntry> {
        self.entries
            .iter()
            .filter(|e| e.major == major && e.minor == minor && e.mount_point != except)
            .collect()
    }
}

fn parse_line(line: &str) -> Result<MountEntry, &'static str> {
    let (left, right) = line.split_once(" - ").ok_or("missing ' - ' separator")?;
    let mut l = left.split(' ');
    let mount_id = l
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad mount id")?;
    let parent_id = l
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad parent id")?;
    let (major, minor) = l
        .next()
        .and_then(|s| s.split_once(':'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or("bad major:minor")?;
    let root = unescape(l.next().ok_or("missing root")?);
    let mount_point = unescape(l.next().ok_or("missing mount point")?);
    let mount_options = l.next().ok_or("missing mount options")?.to_string();
    // The remaining fields on the left are optional tags (shared:N, master:N, ...).
    let mut r = right.split(' ');
    let fs_type = r
        .next()
        .filter(|s| !s.is_empty())
        .ok_or("missing fs type")?
        .to_string();
    let source =
        String::from_utf8_lossy(&unescape_bytes(r.next().ok_or("missing source")?)).into_owned();
    let super_options = r.next().unwrap_or_default().to_string();
    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

fn unescape(field: &str) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(unescape_bytes(field)))
}

/// Undoes the kernel's `\ooo` octal escaping.
fn unescape_bytes(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - rootfs rootfs rw
23 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs devtmpfs rw,size=1010000k,nr_inodes=252500,mode=755
61 22 259:0 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.enbd.io/abc/globalmount rw,relatime shared:30 - ext4 /dev/ublkb0 rw
62 22 259:0 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount ro,relatime shared:30 - ext4 /dev/ublkb0 rw
63 22 0:5 /ublkb1 /var/lib/kubelet/pods/p2/volumeDevices/x/pvc-2 rw,nosuid,relatime shared:2 - devtmpfs devtmpfs rw,size=1010000k
64 22 0:40 / /mnt/with\\040space\\011tab rw master:7 - tmpfs tmp\\134fs rw
65 22 0:41 / /mnt/stack rw - tmpfs first rw
66 65 0:42 / /mnt/stack rw - tmpfs second rw
";

    #[test]
    fn parses_every_line() {
        let t = MountTable::parse(SAMPLE).expect("parse");
        assert_eq!(t.entries().len(), 8);
        let e = &t.entries()[2];
        assert_eq!(e.mount_id, 61);
        assert_eq!(e.parent_id, 22);
        assert_eq!((e.major, e.minor), (259, 0));
        assert_eq!(e.fs_type, "ext4");
        assert_eq!(e.source, "/dev/ublkb0");
        assert!(!e.is_read_only());
        assert!(t.entries()[3].is_read_only());
    }

    #[test]
    fn bind_mount_of_device_node_keeps_its_root() {
        let t = MountTable::parse(SAMPLE).expect("parse");
        let e = t
            .at(Path::new("/var/lib/kubelet/pods/p2/volumeDevices/x/pvc-2"))
            .expect("found");
        assert_eq!(e.root, Path::new("/ublkb1"));
        assert_eq!(e.fs_type, "devtmpfs");
    }

    #[test]
    fn octal_escapes_are_undone() {
        let t = MountTable::parse(SAMPLE).expect("parse");
        let e = t.at(Path::new("/mnt/with space\ttab")).expect("found");
        assert_eq!(e.source, "tmp\\fs");
    }

    #[test]
    fn topmost_mount_wins() {
        let t = MountTable::parse(SAMPLE).expect("parse");
        assert_eq!(
            t.at(Path::new("/mnt/stack")).expect("found").source,
            "second"
        );
        assert!(t.at(Path::new("/mnt")).is_none());
    }

    #[test]
    fn other_mounts_of_device() {
        let t = MountTable::parse(SAMPLE).expect("parse");
        let staging =
            Path::new("/var/lib/kubelet/plugins/kubernetes.io/csi/csi.enbd.io/abc/globalmount");
        let others = t.other_mounts_of(259, 0, staging);
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].mount_id, 62);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let err = MountTable::parse("22 1 0:21 / / rw shared:1 - rootfs rootfs rw\nnonsense\n")
            .expect_err("must fail");
        assert!(
            matches!(err, MountError::MountInfo { line: 2, .. }),
            "{err}"
        );
        let err = MountTable::parse("x 1 0:21 / / rw - rootfs rootfs rw").expect_err("must fail");
        assert!(matches!(
            err,
            MountError::MountInfo {
                line: 1,
                reason: "bad mount id"
            }
        ));
    }

    #[test]
    fn reads_the_live_table() {
        let t = MountTable::read().expect("read /proc/self/mountinfo");
        assert!(t.entries().iter().any(|e| e.mount_point == Path::new("/")));
    }
}
