//! Thin safe wrappers over the Linux file calls the standard library lacks: hole punching,
//! zeroing, SEEK_DATA/SEEK_HOLE, reflink, copy_file_range, fdatasync-by-fd, statvfs.
//!
//! Invariant: every wrapper takes a borrowed, open descriptor and returns `io::Error` from
//! `errno`; none keeps a descriptor beyond the call.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Deallocates `[offset, offset+len)`; reads of it return zeroes afterwards. Size unchanged.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate only reads its integer arguments; the fd is open for the call's duration.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, off(offset)?, off(len)?) })
}

/// Zeroes `[offset, offset+len)` keeping it allocated (no hole), without writing data blocks.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: as in `punch_hole`.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, off(offset)?, off(len)?) })
}

/// Where the next data (`SEEK_DATA`) or hole (`SEEK_HOLE`) starts at or after `from`;
/// `None` when there is no data at or after `from` (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on an open fd has no memory-safety requirements.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off(from)?, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

pub fn seek_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_DATA)
}

pub fn seek_hole(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_HOLE)
}

/// Starts writeback of `[offset, offset + len)` (`wait`: and waits for it, including
/// writeback already running there). Not durability (no metadata, no cache flush): a bulk
/// copy uses it to keep its dirty pages few, so the kernel's dirty throttling does not
/// fall on other writers.
pub fn writeback(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: plain syscall on a valid descriptor; no memory is passed.
    check(unsafe { libc::sync_file_range(file.as_raw_fd(), off(offset)?, off(len)?, flags) })
}

/// Durability of the file's data (and the metadata needed to read it back).
pub fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Makes `dst` share `src`'s blocks (copy-on-write). Fails with EOPNOTSUPP/EXDEV/EINVAL on
/// filesystems without reflink (ext4, tmpfs); callers fall back to a copy (`store::copy`).
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source fd as its integer argument and touches no user memory.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) })
}

/// Copies `[start, start + len)` of `src` to the same offsets of `dst` (copy_file_range:
/// in-kernel, and a reflink where the filesystem can).
pub fn copy_range(src: &File, dst: &File, start: u64, mut len: u64) -> io::Result<()> {
    let mut src_off = off(start)?;
    let mut dst_off = src_off;
    while len > 0 {
        let chunk = len.min(1 << 30) as usize;
        // SAFETY: both offsets point at live locals; the kernel copies between the two fds.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut src_off,
                dst.as_raw_fd(),
                &mut dst_off,
                chunk,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        len -= n as u64;
    }
    Ok(())
}

/// Reads at `offset` only if it can be done without blocking (data in the page cache), into
/// the spare capacity of `buf` (which must have room for `len`), without zero-filling it
/// first: `Ok(n)` bytes read and appended (possibly short), `Err(EAGAIN)` if it would have to
/// wait for the disk.
pub fn pread_nowait_append(
    file: &File,
    buf: &mut bytes::BytesMut,
    len: usize,
    offset: u64,
) -> io::Result<usize> {
    preadv2_append(file, buf, len, offset, libc::RWF_NOWAIT)
}

/// Reads up to `len` bytes at `offset` into the spare capacity of `buf` (which must have room)
/// without zero-filling it first; returns how many bytes were read and appended.
pub fn pread_append(
    file: &File,
    buf: &mut bytes::BytesMut,
    len: usize,
    offset: u64,
) -> io::Result<usize> {
    preadv2_append(file, buf, len, offset, 0)
}

fn preadv2_append(
    file: &File,
    buf: &mut bytes::BytesMut,
    len: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    if spare.len() < len {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `iov` covers `len` bytes of spare capacity, valid for writes; the kernel writes
    // at most that many and we mark as initialised only the `n` it reported.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off(offset)?, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `n <= len <= spare.len()` bytes were just initialised by preadv2.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Filesystem totals for the data directory: (total bytes, bytes available to us).
pub fn statvfs(path: &Path) -> io::Result<(u64, u64)> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: zeroed statvfs is a valid out-parameter; `c` is NUL-terminated and outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Tells the kernel that reads of `file` (this open file description) are random: no
/// readahead, so the page cache holds the pages clients asked for in small folios.
///
/// Why: a block volume's readahead is the client's business (its filesystem and block layer
/// read ahead already). And on kernels with large page-cache folios (ext4 since 6.16), every
/// small buffered write into a large folio walks all of the folio's buffer heads: 4k random
/// writes into large folios measured about 3× slower than into small ones.
pub fn advise_random(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise reads only its integer arguments.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if r != 0 {
        Err(io::Error::from_raw_os_error(r))
    } else {
        Ok(())
    }
}

/// Hints the kernel to read `[offset, offset+len)` into the page cache (NBD_CMD_CACHE).
pub fn will_need(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: posix_fadvise reads only its integer arguments.
    let r = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            off(offset)?,
            off(len)?,
            libc::POSIX_FADV_WILLNEED,
        )
    };
    if r != 0 {
        Err(io::Error::from_raw_os_error(r))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn punch_hole_reads_back_zero() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&[1u8; 65536], 0).unwrap();
        punch_hole(&f, 4096, 8192).unwrap();
        let mut b = [1u8; 8192];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0u8; 8192]);
        assert_eq!(seek_hole(&f, 0).unwrap(), Some(4096));
    }
}
