//! The file backend: a volume is one sparse file; IO is pread/pwrite on a shared descriptor.
//!
//! Invariants: TRIM and WRITE_ZEROES without NO_HOLE punch holes (reads return zeroes after);
//! NO_HOLE zeroing keeps blocks allocated. Writes hold the snapshot gate shared, so
//! [`FileBackend::freeze`] gives a snapshot a point at which no write is half-applied.
//! The io_uring engine enters the same gate around the writes it submits.
//!
//! Write intent: a backend may carry a [`WriteIntent`] log. Every write-type op logs its
//! range there (durably) after entering the gate and before touching the file, whenever the
//! log is active; the gate refuses io_uring's detached entry while it is active, so those
//! writes take the `write_at` path, which logs.
//!
//! Copy-before-write: a backend may carry [`PreWrite`] hooks (a snapshot or clone being
//! copied in the background). Every write-type op calls them inside the gate before it
//! touches the file; io_uring's detached entry is refused while any is attached. With none
//! attached the cost on the write path is one atomic load.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{Backend, ExportError, Extent, PreWrite, WriteIntent};
use crate::sys;

pub struct FileBackend {
    file: File,
    read_only: bool,
    gate: Gate,
}

/// Lets writes run concurrently while a snapshot is not being taken, and makes a snapshot
/// wait for the writes already running. Unlike a `RwLock` its "read side" can be entered
/// on one thread and left on another (io_uring completes writes on its own thread).
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    intent: Option<Arc<dyn WriteIntent>>,
    copies: Copies,
}

/// The copy-before-write hooks attached to a backend; `active` is their count, so a write
/// with none attached reads one atomic and nothing else.
#[derive(Default)]
struct Copies {
    active: AtomicUsize,
    hooks: Mutex<Vec<Arc<dyn PreWrite>>>,
}

impl Copies {
    fn before_write(&self, offset: u64, len: u64) {
        if self.active.load(Ordering::Acquire) == 0 || len == 0 {
            return;
        }
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for h in hooks {
            h.before_write(offset, len);
        }
    }
}

#[derive(Default)]
struct GateState {
    frozen: bool,
    writers: usize,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enters as a writer, waiting while frozen.
    pub fn enter(&self) -> WriteToken<'_> {
        let mut st = self.lock();
        while st.frozen {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.writers += 1;
        WriteToken { gate: self }
    }

    /// Enters as a writer unless frozen or unless writes must be logged first (an active
    /// [`WriteIntent`]); never blocks. On `false` the caller must do the write through
    /// [`Backend::write_at`], which waits and logs; on `true` it must call [`Gate::leave`].
    pub fn try_enter_detached(&self) -> bool {
        let mut st = self.lock();
        if st.frozen
            || self.copies.active.load(Ordering::Acquire) != 0
            || self.intent.as_ref().is_some_and(|i| i.active())
        {
            return false;
        }
        st.writers += 1;
        true
    }

    /// Leaves after [`Gate::try_enter_detached`].
    pub fn leave(&self) {
        let mut st = self.lock();
        st.writers -= 1;
        if st.writers == 0 {
            self.changed.notify_all();
        }
    }

    fn freeze(&self) -> Frozen<'_> {
        self.freeze_raw();
        Frozen { gate: self }
    }

    fn freeze_raw(&self) {
        let mut st = self.lock();
        while st.frozen {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.frozen = true;
        while st.writers > 0 {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn thaw(&self) {
        self.lock().frozen = false;
        self.changed.notify_all();
    }
}

/// One write in progress (see [`Gate::enter`]).
pub struct WriteToken<'a> {
    gate: &'a Gate,
}

impl Drop for WriteToken<'_> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

/// Writes are paused while this lives.
#[must_use]
pub struct Frozen<'a> {
    gate: &'a Gate,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        self.gate.thaw();
    }
}

/// [`Frozen`] that owns its backend, for holders that cannot borrow it.
pub struct FrozenBackend {
    backend: Arc<FileBackend>,
}

impl Drop for FrozenBackend {
    fn drop(&mut self) {
        self.backend.gate.thaw();
    }
}

impl FileBackend {
    pub fn new(file: File, read_only: bool) -> Self {
        Self {
            file,
            read_only,
            gate: Gate::default(),
        }
    }

    /// A backend whose writes are logged in `intent` first (see the module doc).
    pub fn with_intent(file: File, read_only: bool, intent: Arc<dyn WriteIntent>) -> Self {
        Self {
            file,
            read_only,
            gate: Gate {
                intent: Some(intent),
                ..Gate::default()
            },
        }
    }

    pub fn inner_file(&self) -> &File {
        &self.file
    }

    /// Blocks new writes and waits for running ones; held while a snapshot is copied.
    pub fn freeze(&self) -> Frozen<'_> {
        self.gate.freeze()
    }

    /// Attaches a copy-before-write hook; `_frozen` proves writes are paused, so every write
    /// that starts later sees it and none is half-applied when it is attached.
    pub fn attach_pre_write(&self, _frozen: &Frozen<'_>, hook: Arc<dyn PreWrite>) {
        let mut hooks = self
            .gate
            .copies
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        hooks.push(hook);
        self.gate
            .copies
            .active
            .store(hooks.len(), Ordering::Release);
    }

    /// Detaches a hook attached with [`FileBackend::attach_pre_write`] (a no-op if it is not
    /// attached). Writes already inside the gate may still call it once.
    pub fn detach_pre_write(&self, hook: &Arc<dyn PreWrite>) {
        let mut hooks = self
            .gate
            .copies
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        hooks.retain(|h| !Arc::ptr_eq(h, hook));
        self.gate
            .copies
            .active
            .store(hooks.len(), Ordering::Release);
    }

    /// How many copy-before-write hooks are attached.
    pub fn pre_write_hooks(&self) -> usize {
        self.gate.copies.active.load(Ordering::Acquire)
    }

    /// [`FileBackend::freeze`] with an owned guard.
    pub fn freeze_owned(self: &Arc<Self>) -> FrozenBackend {
        self.gate.freeze_raw();
        FrozenBackend {
            backend: self.clone(),
        }
    }

    /// Enters the gate for a write of `[offset, offset + len)`, logging it first if the
    /// write intent is active (the range is durable in the log before the data changes).
    fn writable(&self, offset: u64, len: u64) -> Result<WriteToken<'_>, ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        let token = self.gate.enter();
        self.gate.copies.before_write(offset, len);
        if let Some(intent) = &self.gate.intent
            && len > 0
            && intent.active()
        {
            intent.log(offset, len)?;
        }
        Ok(token)
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = CHUNK.min(end - offset) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ExportError> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // Past the file's end (a shorter file than the export) reads as zeroes.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_owned(&self, offset: u64, len: usize) -> Result<bytes::BytesMut, ExportError> {
        let mut buf = bytes::BytesMut::with_capacity(len);
        while buf.len() < len {
            let done = buf.len();
            match sys::pread_append(&self.file, &mut buf, len - done, offset + done as u64) {
                // Past the file's end reads as zeroes.
                Ok(0) => buf.resize(len, 0),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(buf)
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), ExportError> {
        let _gate = self.writable(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        if fua {
            sys::fdatasync(&self.file)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        if self.read_only {
            return Ok(());
        }
        Ok(sys::fdatasync(&self.file)?)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let _gate = self.writable(offset, len)?;
        match sys::punch_hole(&self.file, offset, len) {
            // TRIM is advisory: a filesystem without hole punching just keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => Ok(r?),
        }
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
    ) -> Result<(), ExportError> {
        let _gate = self.writable(offset, len)?;
        let fast = if keep_allocated {
            sys::zero_range(&self.file, offset, len)
        } else {
            sys::punch_hole(&self.file, offset, len)
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) && fast_only => Err(ExportError::NotFast("write zeroes")),
            Err(e) if unsupported(&e) => Ok(self.write_zero_buffers(offset, len)?),
            Err(e) => Err(e.into()),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        Ok(sys::will_need(&self.file, offset, len)?)
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, ExportError> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max_extents.max(1) {
            let data = sys::seek_data(&self.file, pos)?.unwrap_or(end).min(end);
            if data > pos {
                out.push(Extent {
                    length: data - pos,
                    hole: true,
                });
                pos = data;
                continue;
            }
            let hole = sys::seek_hole(&self.file, pos)?.unwrap_or(end).min(end);
            // SEEK_HOLE never returns pos itself when pos is in data; guard anyway.
            let hole = if hole <= pos { end } else { hole };
            out.push(Extent {
                length: hole - pos,
                hole: false,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn write_gate(&self) -> Option<&Gate> {
        Some(&self.gate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enbd_proto::wire::NbdError;

    fn backend(size: u64) -> (tempfile::TempDir, FileBackend) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v"))
            .unwrap();
        f.set_len(size).unwrap();
        (dir, FileBackend::new(f, false))
    }

    #[test]
    fn allocation_map_shows_holes_and_data() {
        let (_d, b) = backend(1 << 20);
        b.write_at(&[1u8; 8192], 65536, false).unwrap();
        let map = b.block_status(0, 1 << 20, 16).unwrap();
        assert_eq!(
            map,
            vec![
                Extent {
                    length: 65536,
                    hole: true
                },
                Extent {
                    length: 8192,
                    hole: false
                },
                Extent {
                    length: (1 << 20) - 65536 - 8192,
                    hole: true
                },
            ]
        );
        assert_eq!(b.block_status(0, 1 << 20, 1).unwrap().len(), 1);
    }

    #[test]
    fn zeroes_with_and_without_holes() {
        let (_d, b) = backend(1 << 20);
        b.write_at(&[5u8; 65536], 0, false).unwrap();
        b.write_zeroes(0, 8192, false, true).unwrap();
        b.write_zeroes(8192, 8192, true, true).unwrap();
        let mut buf = vec![9u8; 16384];
        b.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        let map = b.block_status(0, 65536, 8).unwrap();
        assert_eq!(
            map[0],
            Extent {
                length: 8192,
                hole: true
            }
        );
        assert!(!map[1].hole, "NO_HOLE range must stay allocated: {map:?}");
    }

    #[test]
    fn owned_reads_match_and_zero_fill_past_the_end() {
        let (_d, b) = backend(8192);
        b.write_at(&[3u8; 100], 8000, false).unwrap();
        let got = b.read_owned(7990, 300).unwrap();
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[10..110], &[3u8; 100][..]);
        assert_eq!(got.len(), 300);
        assert!(
            got[110..].iter().all(|&x| x == 0),
            "past the end reads as zeroes"
        );
    }

    #[test]
    fn read_only_refuses_writes() {
        let (_d, b) = backend(4096);
        let ro = FileBackend::new(b.file.try_clone().unwrap(), true);
        assert!(matches!(
            ro.write_at(&[0; 512], 0, false),
            Err(ExportError::ReadOnly)
        ));
        assert!(matches!(ro.trim(0, 512), Err(ExportError::ReadOnly)));
        assert_eq!(ExportError::ReadOnly.nbd_error(), NbdError::Perm);
    }
}
