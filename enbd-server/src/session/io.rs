//! How a session's requests reach the backend: an [`Op`] runs off the async runtime and its
//! result comes back through a callback, so many requests of one connection run at once and
//! finish in any order.
//!
//! Two engines, chosen with `--io-engine` (the default picked by measurement, see the README):
//! - `pool`: each op runs on a small fixed thread pool ([`super::pool`]), pread/pwrite;
//! - `uring`: READ/WRITE/FLUSH on file backends go to an io_uring ring owned by one thread
//!   ([`super::uring`]); everything else takes the pool path.
//!
//! With either engine, a READ the page cache can serve at once is done right on the async
//! thread (tried with RWF_NOWAIT, which never blocks), saving the thread hop.
//!
//! Invariant: `done` is called exactly once per submitted op.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::export::{Backend, ExportError, Extent};

/// Largest READ tried inline on the async thread (bigger copies would hold it too long).
const INLINE_READ_MAX: usize = 256 * 1024;

/// One backend operation, ranges already checked against the export size.
#[derive(Debug)]
pub enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        keep_allocated: bool,
        fast_only: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        max_extents: usize,
    },
}

/// What a successful op produced.
#[derive(Debug)]
pub enum Output {
    None,
    Data(Bytes),
    Extents(Vec<Extent>),
}

pub type OpResult = Result<Output, ExportError>;

/// Runs an op synchronously on the calling thread.
pub fn run_blocking(backend: &dyn Backend, op: Op) -> OpResult {
    match op {
        Op::Read { offset, len } => Ok(Output::Data(backend.read_owned(offset, len)?.freeze())),
        Op::Write { offset, data, fua } => {
            backend.write_at(&data, offset, fua).map(|_| Output::None)
        }
        Op::Flush => backend.flush().map(|_| Output::None),
        Op::Trim { offset, len, fua } => {
            backend.trim(offset, len)?;
            if fua {
                backend.flush()?;
            }
            Ok(Output::None)
        }
        Op::WriteZeroes {
            offset,
            len,
            keep_allocated,
            fast_only,
            fua,
        } => {
            backend.write_zeroes(offset, len, keep_allocated, fast_only)?;
            if fua {
                backend.flush()?;
            }
            Ok(Output::None)
        }
        Op::Cache { offset, len } => backend.cache(offset, len).map(|_| Output::None),
        Op::BlockStatus {
            offset,
            len,
            max_extents,
        } => backend
            .block_status(offset, len, max_extents)
            .map(Output::Extents),
    }
}

/// The engine a server's sessions submit to; cheap to clone.
#[derive(Clone)]
pub enum IoEngine {
    /// Tokio's blocking pool (`spawn_blocking`); used by tests and the fuzz driver.
    Blocking,
    Pool(Arc<super::pool::IoPool>),
    Uring(Arc<super::uring::Uring>),
}

impl IoEngine {
    /// Starts the positional-IO thread pool.
    pub fn pool(threads: usize) -> std::io::Result<Self> {
        Ok(IoEngine::Pool(Arc::new(super::pool::IoPool::start(
            threads,
        )?)))
    }

    /// Starts the io_uring engine's thread.
    pub fn uring() -> std::io::Result<Self> {
        Ok(IoEngine::Uring(super::uring::Uring::start()?))
    }

    /// Starts `op`; `done` receives its result on some thread. Must be called within a Tokio
    /// runtime.
    pub fn submit<F>(&self, backend: &Arc<dyn Backend>, op: Op, done: F)
    where
        F: FnOnce(OpResult) + Send + 'static,
    {
        // Page-cache hits need no thread: try the read right here without blocking
        // (RWF_NOWAIT), and only hand it to the pool if the kernel would have to wait.
        if let (Op::Read { offset, len }, Some(file)) = (&op, backend.file())
            && *len > 0
            && *len <= INLINE_READ_MAX
        {
            let mut buf = BytesMut::zeroed(*len);
            if matches!(crate::sys::pread_nowait(file, &mut buf, *offset), Ok(n) if n == *len) {
                return done(Ok(Output::Data(buf.freeze())));
            }
        }
        if let IoEngine::Uring(ring) = self
            && let Some(file) = backend.file()
            && matches!(op, Op::Read { .. } | Op::Write { .. } | Op::Flush)
        {
            return ring.submit(backend.clone(), file, op, Box::new(done));
        }
        let backend = backend.clone();
        match self {
            IoEngine::Pool(pool) => {
                pool.submit(Box::new(move || done(run_blocking(&*backend, op))))
            }
            _ => {
                tokio::task::spawn_blocking(move || done(run_blocking(&*backend, op)));
            }
        }
    }
}
