//! Format, mount and measure block devices for the CSI node service.
//!
//! Mounting uses mount(2)/umount2(2) directly, so it works the same in a busybox VM and in
//! a minimal container image with no `mount` binary; only formatting and growing run the
//! filesystem's own tools (`mkfs.ext4`/`mkfs.xfs`, `resize2fs`/`xfs_growfs`).
//!
//! Invariants: a device is formatted only when [`probe_device`] finds it blank (all zeros
//! where signatures live); a read-only bind mount is never left read-write (a failed
//! remount undoes the bind); every function here is blocking — async callers run them on
//! a blocking thread.

pub mod loopdev;
pub mod mountinfo;
pub mod options;
pub mod probe;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub use mountinfo::{MountEntry, MountTable};
pub use options::MountOptions;
pub use probe::{Content, FsType};

/// Errors of the format/mount layer.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} is not installed on this node: {source}")]
    ToolMissing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed on {path} ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("mount option {0:?} is not allowed")]
    BadOption(String),
    #[error("{path} holds {found}; refusing to format it")]
    ForeignContent { path: PathBuf, found: String },
    #[error(
        "{path} has {size} bytes, too small for {fs} (mkfs.{fs} needs at least {min} bytes): \
         use a larger claim or ext4"
    )]
    TooSmall {
        path: PathBuf,
        fs: &'static str,
        size: u64,
        min: u64,
    },
    #[error("{path} is busy: {source}")]
    Busy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mountinfo line {line}: {reason}")]
    MountInfo { line: usize, reason: &'static str },
    #[error("path {0:?} contains a NUL byte")]
    NulInPath(PathBuf),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MountError + 'a {
    move |source| MountError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn c_path(path: &Path) -> Result<CString, MountError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| MountError::NulInPath(path.to_path_buf()))
}

/// Reads the head and tail of `dev` and classifies its content.
pub fn probe_device(dev: &Path) -> Result<Content, MountError> {
    probe_with_size(dev).map(|(content, _)| content)
}

/// [`probe_device`] and the device's size in bytes, from one open.
fn probe_with_size(dev: &Path) -> Result<(Content, u64), MountError> {
    let mut file = File::open(dev).map_err(io_err("open", dev))?;
    let size = file.seek(SeekFrom::End(0)).map_err(io_err("seek", dev))?;
    let head = read_at(&mut file, dev, 0, probe::HEAD_BYTES)?;
    let tail_start = size.saturating_sub(probe::TAIL_BYTES as u64);
    let tail = read_at(&mut file, dev, tail_start, probe::TAIL_BYTES)?;
    Ok((probe::classify(&head, &tail), size))
}

fn read_at(file: &mut File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, MountError> {
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek", path))?;
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(buf)
}

/// Creates `fs` on `dev` with the caller's extra mkfs arguments. Refuses unless the
/// device probes blank, so existing data is never overwritten.
pub fn format(dev: &Path, fs: FsType, mkfs_options: &[String]) -> Result<(), MountError> {
    let (content, size) = probe_with_size(dev)?;
    match content {
        Content::Blank => {}
        Content::Filesystem(found) => {
            return Err(MountError::ForeignContent {
                path: dev.to_path_buf(),
                found: found.to_string(),
            });
        }
        Content::Foreign(name) => {
            return Err(MountError::ForeignContent {
                path: dev.to_path_buf(),
                found: name.to_string(),
            });
        }
        Content::UnknownData => {
            return Err(MountError::ForeignContent {
                path: dev.to_path_buf(),
                found: "unrecognised non-zero data".into(),
            });
        }
    }
    // mkfs.xfs refuses a device under 300 MB with a usage text only; say so plainly instead.
    if let Some(min) = fs.min_device_bytes().filter(|&min| size < min) {
        return Err(MountError::TooSmall {
            path: dev.to_path_buf(),
            fs: fs.as_str(),
            size,
            min,
        });
    }
    let (tool, fixed): (&'static str, &[&str]) = match fs {
        // -F: mke2fs would otherwise ask before using a whole disk; the probe above is the guard.
        FsType::Ext4 => ("mkfs.ext4", &["-q", "-F"]),
        FsType::Xfs => ("mkfs.xfs", &["-q"]),
    };
    let mut cmd = Command::new(tool);
    cmd.args(fixed).args(mkfs_options).arg(dev);
    run_tool(tool, dev, cmd)
}

/// Grows the filesystem mounted at `mount_point` from `dev` to fill the device.
pub fn grow_filesystem(dev: &Path, mount_point: &Path, fs: FsType) -> Result<(), MountError> {
    match fs {
        FsType::Ext4 => {
            let mut cmd = Command::new("resize2fs");
            cmd.arg(dev);
            run_tool("resize2fs", dev, cmd)
        }
        FsType::Xfs => {
            let mut cmd = Command::new("xfs_growfs");
            cmd.arg("-d").arg(mount_point);
            run_tool("xfs_growfs", mount_point, cmd)
        }
    }
}

fn run_tool(tool: &'static str, path: &Path, mut cmd: Command) -> Result<(), MountError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => MountError::ToolMissing { tool, source },
            _ => MountError::Io {
                op: tool,
                path: path.to_path_buf(),
                source,
            },
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let msg = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    Err(MountError::ToolFailed {
        tool,
        path: path.to_path_buf(),
        status: out.status.to_string(),
        stderr: msg.trim().chars().take(2000).collect(),
    })
}

fn sys_mount(
    source: Option<&Path>,
    target: &Path,
    fs_type: Option<&str>,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), std::io::Error> {
    let source = source
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .transpose()?;
    let target = CString::new(target.as_os_str().as_bytes())?;
    let fs_type = fs_type.map(CString::new).transpose()?;
    let data = CString::new(data)?;
    let ptr_or_null = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null (allowed by mount(2) for source/fstype when
    // binding or remounting) or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr_or_null(&source),
            target.as_ptr(),
            ptr_or_null(&fs_type),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mounts the filesystem on `dev` at the directory `target`.
pub fn mount_filesystem(
    dev: &Path,
    target: &Path,
    fs: FsType,
    opts: &MountOptions,
) -> Result<(), MountError> {
    c_path(dev)?;
    c_path(target)?;
    let data = fs_data(fs, &opts.data);
    sys_mount(Some(dev), target, Some(fs.as_str()), opts.flags, &data)
        .map_err(io_err("mount", target))
}

/// The mount(2) data for `fs`: the caller's options, plus `nouuid` for xfs. A snapshot's
/// restore or a clone is a block copy with its source's filesystem UUID, and xfs refuses
/// (EINVAL) to mount a second filesystem with a UUID already mounted on the node — so the
/// source and its copy could not be used on one node at once (the upstream suite's "volume
/// and its clone / restored snapshot from pods on the same node" specs failed on it).
fn fs_data(fs: FsType, data: &str) -> String {
    match fs {
        FsType::Xfs if !data.split(',').any(|o| o == "nouuid") => {
            if data.is_empty() {
                "nouuid".to_owned()
            } else {
                format!("{data},nouuid")
            }
        }
        _ => data.to_owned(),
    }
}

/// Bind-mounts `source` (a directory or a device node) onto `target`, then applies the
/// per-mount `flags` (read-only, nosuid, ...) with a bind remount, which a plain bind ignores.
pub fn bind_mount(source: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), MountError> {
    c_path(source)?;
    c_path(target)?;
    sys_mount(Some(source), target, None, libc::MS_BIND, "")
        .map_err(io_err("bind mount", target))?;
    if flags != 0
        && let Err(source) = sys_mount(
            None,
            target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            "",
        )
    {
        // Never leave a mount with weaker protection than asked for.
        let _ = unmount(target);
        return Err(MountError::Io {
            op: "bind remount",
            path: target.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Unmounts `target`. Returns whether something was mounted there; a path that is not a
/// mount point (or does not exist) is not an error.
pub fn unmount(target: &Path) -> Result<bool, MountError> {
    let c = c_path(target)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(false),
        Some(libc::EBUSY) => Err(MountError::Busy {
            path: target.to_path_buf(),
            source: err,
        }),
        _ => Err(MountError::Io {
            op: "unmount",
            path: target.to_path_buf(),
            source: err,
        }),
    }
}

/// Space and inode usage of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn fs_usage(path: &Path) -> Result<FsUsage, MountError> {
    let c = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(MountError::Io {
            op: "statvfs",
            path: path.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field widths differ between targets; u64 holds every one of them.
    let [frsize, blocks, bavail, bfree, files, ffree] = [
        st.f_frsize,
        st.f_blocks,
        st.f_bavail,
        st.f_bfree,
        st.f_files,
        st.f_ffree,
    ]
    .map(u64::from);
    let total_bytes = blocks * frsize;
    Ok(FsUsage {
        total_bytes,
        available_bytes: bavail * frsize,
        used_bytes: total_bytes.saturating_sub(bfree * frsize),
        total_inodes: files,
        free_inodes: ffree,
        used_inodes: files.saturating_sub(ffree),
    })
}

/// Size in bytes of the block device at `path` (or of whatever block device is bound there).
pub fn block_device_size(path: &Path) -> Result<u64, MountError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    file.seek(SeekFrom::End(0)).map_err(io_err("seek", path))
}

// Block-layer read-only flag ioctls (linux/fs.h: _IO(0x12, 93) and _IO(0x12, 94)).
const BLKROSET: libc::c_ulong = 0x125d;
const BLKROGET: libc::c_ulong = 0x125e;

/// Sets or clears the kernel's read-only flag on a block device. A read-only mount does not
/// stop writes through a device node bound on it; this flag does.
pub fn set_device_read_only(dev: &Path, read_only: bool) -> Result<(), MountError> {
    use std::os::fd::AsRawFd;
    let file = File::open(dev).map_err(io_err("open", dev))?;
    let value: libc::c_int = read_only.into();
    // SAFETY: the fd is open for the duration of the call and BLKROSET reads one c_int
    // through the pointer, which points to a live local.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKROSET as _,
            &value as *const libc::c_int,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(MountError::Io {
            op: "BLKROSET",
            path: dev.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Whether the kernel's read-only flag is set on a block device.
pub fn device_read_only(dev: &Path) -> Result<bool, MountError> {
    use std::os::fd::AsRawFd;
    let file = File::open(dev).map_err(io_err("open", dev))?;
    let mut value: libc::c_int = 0;
    // SAFETY: the fd is open and BLKROGET writes one c_int through the pointer.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            BLKROGET as _,
            &mut value as *mut libc::c_int,
        )
    };
    if rc == 0 {
        Ok(value != 0)
    } else {
        Err(MountError::Io {
            op: "BLKROGET",
            path: dev.to_path_buf(),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Device number (major, minor) of the block device node at `path`; `None` if `path` is
/// not a block device.
pub fn block_device_number(path: &Path) -> Result<Option<(u32, u32)>, MountError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    if !meta.file_type().is_block_device() {
        return Ok(None);
    }
    Ok(Some(split_dev(meta.rdev())))
}

/// Device number of the filesystem that holds `path`.
pub fn containing_device(path: &Path) -> Result<(u32, u32), MountError> {
    let meta = std::fs::metadata(path).map_err(io_err("stat", path))?;
    Ok(split_dev(meta.dev()))
}

/// Splits a Linux `dev_t` into major and minor (the glibc encoding; within 32 bits it is
/// also the kernel's `new_encode_dev`/`huge_encode_dev`, which loop status reports).
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major as u32, minor as u32)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn split_dev_matches_libc() {
        for (maj, min) in [
            (8u32, 0u32),
            (259, 3),
            (4095, 255),
            (4096, 1 << 19),
            (1, 70000),
        ] {
            let dev = libc::makedev(maj, min);
            assert_eq!(split_dev(dev), (maj, min));
        }
    }

    #[test]
    fn probe_of_zero_file_is_blank_and_of_written_file_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let f = File::create(&path).expect("create");
        f.set_len(8 << 20).expect("set_len");
        assert_eq!(probe_device(&path).expect("probe"), Content::Blank);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.seek(SeekFrom::Start((8 << 20) - 100)).expect("seek");
        f.write_all(b"x").expect("write");
        assert_eq!(probe_device(&path).expect("probe"), Content::UnknownData);
    }

    #[test]
    fn format_refuses_non_blank_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        let mut f = File::create(&path).expect("create");
        f.set_len(4 << 20).expect("set_len");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.write_all(b"XFSB").expect("write");
        let err = format(&path, FsType::Ext4, &[]).expect_err("must refuse");
        assert!(
            matches!(err, MountError::ForeignContent { ref found, .. } if found == "xfs"),
            "{err}"
        );
    }

    /// A sparse file of `size` bytes standing in for a blank device.
    fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        File::create(&path)
            .expect("create")
            .set_len(size)
            .expect("set_len");
        path
    }

    #[test]
    fn xfs_mounts_with_nouuid_so_a_copy_mounts_beside_its_source() {
        assert_eq!(fs_data(FsType::Xfs, ""), "nouuid");
        assert_eq!(
            fs_data(FsType::Xfs, "logbsize=256k"),
            "logbsize=256k,nouuid"
        );
        assert_eq!(fs_data(FsType::Xfs, "nouuid,noquota"), "nouuid,noquota");
        assert_eq!(fs_data(FsType::Ext4, ""), "");
        assert_eq!(fs_data(FsType::Ext4, "discard"), "discard");
    }

    #[test]
    fn a_device_too_small_for_xfs_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sparse_file(dir.path(), "small", 1 << 20);
        let err = format(&path, FsType::Xfs, &[]).expect_err("1 MiB must be refused for xfs");
        assert!(
            matches!(
                err,
                MountError::TooSmall {
                    size: 1048576,
                    min: 300_000_000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("too small for xfs"), "{err}");
        // Nothing was written: the device still probes blank, and ext4 takes it.
        assert_eq!(probe_device(&path).expect("probe"), Content::Blank);
        format(&path, FsType::Ext4, &[]).expect("ext4 on 1 MiB");
    }

    /// A loop device over `file` (util-linux losetup; root and the loop driver, as the rest of
    /// the suite needs), detached on drop.
    struct Loop(String);
    impl Loop {
        fn attach(file: &Path) -> Loop {
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(file)
                .output()
                .expect("run losetup");
            assert!(
                out.status.success(),
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
        }
    }
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }

    /// A block copy of an xfs filesystem (what a clone or a snapshot's restore is) mounts on
    /// the same machine as its source: plain mount(2) refuses the duplicate UUID (checked
    /// here, so the test shows the failure it guards against), ours adds `nouuid`. (Ours also
    /// mounts sources with `nouuid`, which keeps them out of the UUID table altogether.)
    #[test]
    fn an_xfs_copy_mounts_beside_its_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let source = sparse_file(dir.path(), "source", 320 << 20);
        format(&source, FsType::Xfs, &[]).expect("mkfs.xfs");
        let copy = dir.path().join("copy");
        std::fs::copy(&source, &copy).expect("copy the device");
        let (a, b) = (Loop::attach(&source), Loop::attach(&copy));
        let (ma, mb) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&ma).unwrap();
        std::fs::create_dir(&mb).unwrap();
        let opts = MountOptions::default();
        // The source mounted plainly (a nouuid mount does not enter the kernel's UUID table,
        // which would hide the refusal below).
        sys_mount(Some(Path::new(&a.0)), &ma, Some("xfs"), 0, "").expect("mount the source");
        let plain = sys_mount(Some(Path::new(&b.0)), &mb, Some("xfs"), 0, "");
        let refused = plain.as_ref().map_err(std::io::Error::raw_os_error).err();
        if plain.is_ok() {
            let _ = unmount(&mb);
        }
        let ours = mount_filesystem(Path::new(&b.0), &mb, FsType::Xfs, &opts);
        let _ = unmount(&mb);
        let _ = unmount(&ma);
        assert_eq!(
            refused,
            Some(Some(libc::EINVAL)),
            "xfs took a duplicate UUID without nouuid"
        );
        ours.expect("the copy mounts beside its source");
    }

    /// Real mkfs on a sparse file: the tools are installed on every machine that builds this.
    #[test]
    fn format_blank_file_then_probe_finds_filesystem() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (fs, size) in [(FsType::Ext4, 32u64 << 20), (FsType::Xfs, 320 << 20)] {
            let path = sparse_file(dir.path(), fs.as_str(), size);
            format(&path, fs, &[]).expect("mkfs");
            assert_eq!(probe_device(&path).expect("probe"), Content::Filesystem(fs));
            let again = format(&path, fs, &[]).expect_err("second format must refuse");
            assert!(matches!(again, MountError::ForeignContent { .. }));
        }
    }

    #[test]
    fn mkfs_options_reach_the_tool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sparse_file(dir.path(), "img", 32 << 20);
        let err =
            format(&path, FsType::Ext4, &["--no-such-option".into()]).expect_err("bad option");
        assert!(
            matches!(
                err,
                MountError::ToolFailed {
                    tool: "mkfs.ext4",
                    ..
                }
            ),
            "{err}"
        );
        // Nothing was written: the device still probes blank.
        assert_eq!(probe_device(&path).expect("probe"), Content::Blank);
    }

    #[test]
    fn unmount_of_plain_directory_reports_nothing_mounted() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!unmount(dir.path()).expect("unmount"));
        assert!(!unmount(&dir.path().join("missing")).expect("unmount"));
    }

    #[test]
    fn fs_usage_of_tempdir_is_sane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let u = fs_usage(dir.path()).expect("statvfs");
        assert!(u.total_bytes > 0);
        assert!(u.available_bytes <= u.total_bytes);
        assert!(u.used_bytes <= u.total_bytes);
    }

    #[test]
    fn block_device_number_of_regular_file_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        File::create(&path).expect("create");
        assert_eq!(block_device_number(&path).expect("stat"), None);
    }

    #[test]
    fn nul_in_path_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/a\0b"));
        assert!(matches!(unmount(p), Err(MountError::NulInPath(_))));
    }
}
