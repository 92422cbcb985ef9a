//! Exports: what an NBD session serves. A [`Backend`] does positional IO on one volume;
//! an [`ExportProvider`] (the volume store, or a test fixture) lists and opens exports.
//!
//! Invariants: the session checks every range against the size negotiated at open before it
//! calls a backend, so backends may assume `offset + len <= size`. Every connection to the same
//! volume shares one backend (one open file), so a FLUSH on any connection makes every write
//! completed on any connection durable — the multi-conn guarantee NBD_FLAG_CAN_MULTI_CONN
//! promises.

use std::any::Any;
use std::fs::File;
use std::io;
use std::sync::Arc;

use enbd_proto::wire::NbdError;
use tokio_util::sync::CancellationToken;

pub mod file;
pub mod memory;

pub use file::FileBackend;
pub use memory::MemoryBackend;

/// A log a backend writes to before a WRITE, TRIM or WRITE_ZEROES touches its data: the
/// store's write-intent bitmaps of mirror members that are away (`store::membership`).
///
/// Contract: [`WriteIntent::active`] may change only while the backend's writes are paused
/// ([`FileBackend::freeze`]), so a write that checked it while inside the write gate sees
/// the value that holds for its whole duration.
pub trait WriteIntent: Send + Sync + 'static {
    /// Whether writes must be logged now. Called on every write: one relaxed atomic load.
    fn active(&self) -> bool;
    /// Makes durable the record that `[offset, offset + len)` is about to change.
    fn log(&self, offset: u64, len: u64) -> io::Result<()>;
}

/// Something that must see a range's old content before a write changes it: a snapshot or
/// clone whose copy runs in the background (`store::copy`, copy-before-write).
///
/// Contract: attached only while the backend's writes are paused ([`FileBackend::freeze`]),
/// so every write that starts after the attach calls it; it may be detached at any time,
/// once it no longer needs to see writes.
pub trait PreWrite: Send + Sync + 'static {
    /// Called inside the write gate before `[offset, offset + len)` changes. It never fails
    /// the write: a copy that cannot preserve the range fails itself instead.
    fn before_write(&self, offset: u64, len: u64);
}

/// Errors a backend operation can end in; the session maps them onto NBD error codes.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("export is read-only")]
    ReadOnly,
    #[error("{0} cannot be done fast on this export")]
    NotFast(&'static str),
}

impl ExportError {
    /// The error to put in the NBD reply: the protocol's mapping of the backend's errno
    /// ([`NbdError::from_errno`], e.g. EFBIG and EDQUOT are `NBD_ENOSPC`).
    pub fn nbd_error(&self) -> NbdError {
        match self {
            Self::ReadOnly => NbdError::Perm,
            Self::NotFast(_) => NbdError::NotSup,
            // An error without an errno is the backend's own failure.
            Self::Io(e) => e.raw_os_error().map_or(NbdError::Io, NbdError::from_errno),
        }
    }
}

/// One run of the `base:allocation` map: `length` bytes that are all holes (read as zeroes)
/// or all data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub hole: bool,
}

/// Positional IO on one volume. Methods block (they are file syscalls); the session runs them
/// off the async runtime.
pub trait Backend: Send + Sync + 'static {
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError>;
    /// Reads `len` bytes at `offset` into a new buffer. Backends override it to skip
    /// zero-filling a buffer they are about to overwrite (it matters for 1 MiB reads).
    fn read_owned(&self, offset: u64, len: usize) -> Result<bytes::BytesMut, ExportError> {
        let mut buf = bytes::BytesMut::zeroed(len);
        self.read_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), ExportError>;
    /// Discards a range; it may read back as anything until rewritten (we make it zeroes).
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Zeroes a range. `keep_allocated` (NO_HOLE) forbids punching holes; `fast_only`
    /// (FAST_ZERO) fails with [`ExportError::NotFast`] instead of writing zeroes slowly.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> Result<(), ExportError>;
    /// Prefetches a range (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// The allocation map of `[offset, offset+len)`, at most `max_extents` runs, together
    /// covering a prefix of the range (at least one byte when `len > 0`).
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, ExportError>;
    /// The open file, for IO engines that submit to the kernel directly (io_uring).
    fn file(&self) -> Option<&File> {
        None
    }
    /// The gate writes submitted outside [`Backend::write_at`] must hold (see
    /// [`file::Gate`]); `None` when [`Backend::file`] is `None`.
    fn write_gate(&self) -> Option<&file::Gate> {
        None
    }
}

/// An opened export as a session sees it. Dropping it releases the connection's claim on
/// the volume (the store counts open connections through `lease`).
pub struct Export {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub backend: Arc<dyn Backend>,
    /// Cancelled when the volume is force-deleted: sessions serving it close.
    pub closed: CancellationToken,
    pub lease: Option<Box<dyn Any + Send + Sync>>,
}

/// Listing entry for NBD_OPT_LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// Why an export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no export named {0:?}")]
    NotFound(String),
    #[error("export {0:?} is being deleted")]
    Unavailable(String),
    #[error("opening export {name:?}: {source}")]
    Io { name: String, source: io::Error },
}

/// Where sessions find exports by name.
pub trait ExportProvider: Send + Sync + 'static {
    fn list(&self) -> Vec<ExportEntry>;
    fn open(&self, name: &str) -> Result<Export, OpenError>;
    /// The export served to clients that ask for the empty name, if any.
    fn default_export(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_errors_take_the_protocols_nbd_values() {
        let io = |errno| ExportError::Io(io::Error::from_raw_os_error(errno)).nbd_error();
        // The document: EFBIG and EDQUOT are ENOSPC; read-only is EPERM.
        assert_eq!(io(libc::EFBIG), NbdError::NoSpc);
        assert_eq!(io(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(io(libc::ENOSPC), NbdError::NoSpc);
        assert_eq!(io(libc::EROFS), NbdError::Perm);
        assert_eq!(io(libc::EACCES), NbdError::Perm);
        assert_eq!(io(libc::EOVERFLOW), NbdError::Inval);
        assert_eq!(io(libc::ENOENT), NbdError::Io);
        let plain = ExportError::Io(io::Error::other("no errno"));
        assert_eq!(plain.nbd_error(), NbdError::Io);
        assert_eq!(ExportError::ReadOnly.nbd_error(), NbdError::Perm);
        assert_eq!(ExportError::NotFast("zero").nbd_error(), NbdError::NotSup);
    }
}
