//! The io_uring IO engine: one thread owns a ring and runs READ, WRITE and FLUSH
//! (fdatasync) of file backends; sessions hand it work through a queue and an eventfd.
//!
//! Invariants:
//! - Every buffer handed to the kernel (a read's `BytesMut`, a write's `Bytes`) and the
//!   backend that owns the file descriptor live in the op's slot until its completion is
//!   reaped, so the kernel never sees a dangling pointer or a closed (reused) descriptor.
//! - Short reads and writes are resubmitted for the remainder; a read past the end of the
//!   file reads zeroes. A FUA write is followed by an fdatasync before it completes.
//! - Writes hold the backend's write gate from submission to completion (a snapshot waits for
//!   them); if a snapshot holds it, the write takes the thread-pool path instead of blocking
//!   the ring.
//! - `done` runs exactly once per op, on the ring thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use io_uring::{IoUring, opcode, types};

use super::io::{Op, OpResult, Output, run_blocking};
use crate::export::{Backend, ExportError};

type Done = Box<dyn FnOnce(OpResult) + Send>;

const RING_ENTRIES: u32 = 256;
/// Ops in the kernel at once; more wait in the ring thread's backlog.
const MAX_IN_FLIGHT: usize = 1024;
const WAKE: u64 = u64::MAX;

struct Submission {
    backend: Arc<dyn Backend>,
    fd: RawFd,
    op: Op,
    done: Done,
}

enum Work {
    /// `buf.len()` is what has been read so far, `want` the request's length.
    Read {
        buf: BytesMut,
        offset: u64,
        want: usize,
    },
    Write {
        data: Bytes,
        offset: u64,
        done_len: usize,
        fua: bool,
        gated: bool,
    },
    Sync {
        gated: bool,
    },
}

struct Slot {
    backend: Arc<dyn Backend>,
    fd: RawFd,
    work: Work,
    done: Done,
}

/// Handle on the ring thread.
pub struct Uring {
    queue: Mutex<Vec<Submission>>,
    wake: OwnedFd,
}

impl Uring {
    /// Creates the ring and starts its thread.
    pub fn start() -> io::Result<Arc<Self>> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new descriptor we own (or -1, checked).
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let this = Arc::new(Self {
            queue: Mutex::new(Vec::new()),
            wake,
        });
        let worker = this.clone();
        std::thread::Builder::new()
            .name("enbd-uring".into())
            .spawn(move || {
                if let Err(e) = worker.run(ring) {
                    tracing::error!(error = %e, "io_uring thread failed");
                }
            })?;
        Ok(this)
    }

    pub fn submit(&self, backend: Arc<dyn Backend>, file: &File, op: Op, done: Done) {
        let fd = file.as_raw_fd();
        let was_empty = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.push(Submission {
                backend: backend.clone(),
                fd,
                op,
                done,
            });
            q.len() == 1
        };
        // Only the first submission after the ring thread drained the queue needs a wake-up.
        if was_empty {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local to our eventfd.
            let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn run(&self, mut ring: IoUring) -> io::Result<()> {
        let mut slots: Vec<Option<Slot>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut backlog: VecDeque<Submission> = VecDeque::new();
        let mut in_flight = 0usize;
        let mut wake_buf = [0u8; 8];
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize * 2);
        let wake_fd = self.wake.as_raw_fd();
        arm_wake(&mut ring, wake_fd, &mut wake_buf)?;
        loop {
            ring.submit_and_wait(1)?;
            completions.clear();
            completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, res) in &completions {
                if user_data == WAKE {
                    let drained =
                        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
                    backlog.extend(drained);
                    arm_wake(&mut ring, wake_fd, &mut wake_buf)?;
                    continue;
                }
                let idx = user_data as usize;
                let Some(slot) = slots.get_mut(idx).and_then(Option::take) else {
                    continue;
                };
                in_flight -= 1;
                if let Some(slot) = complete(slot, res) {
                    start(&mut ring, &mut slots, &mut free, &mut in_flight, slot)?;
                } else {
                    free.push(idx);
                }
            }
            while in_flight < MAX_IN_FLIGHT {
                let Some(sub) = backlog.pop_front() else {
                    break;
                };
                if let Some(slot) = prepare(sub) {
                    start(&mut ring, &mut slots, &mut free, &mut in_flight, slot)?;
                }
            }
        }
    }
}

fn arm_wake(ring: &mut IoUring, fd: RawFd, buf: &mut [u8; 8]) -> io::Result<()> {
    let sqe = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
        .build()
        .user_data(WAKE);
    push(ring, &sqe)
}

fn push(ring: &mut IoUring, sqe: &io_uring::squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every pointer in `sqe` refers to a buffer kept alive in a slot (or the
        // ring thread's wake buffer) until its completion is reaped.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Turns a submission into a slot, or finishes it here if it needs no kernel IO.
fn prepare(sub: Submission) -> Option<Slot> {
    let Submission {
        backend,
        fd,
        op,
        done,
    } = sub;
    let work = match op {
        Op::Read { offset, len } => {
            if len == 0 {
                done(Ok(Output::Data(Bytes::new())));
                return None;
            }
            // Not zeroed: the kernel fills it, and only what it filled counts as data.
            Work::Read {
                buf: BytesMut::with_capacity(len),
                offset,
                want: len,
            }
        }
        Op::Write { data, offset, fua } => {
            let gate = backend.write_gate();
            let gated = match gate {
                Some(g) if g.try_enter_detached() => true,
                Some(_) => {
                    // A snapshot is being taken, or the write must be logged first (mirror write
                    // intent): wait and log on a thread, not on the ring.
                    let op = Op::Write { data, offset, fua };
                    tokio_free_blocking(backend, op, done);
                    return None;
                }
                None => false,
            };
            if data.is_empty() {
                if fua {
                    return Some(Slot {
                        backend,
                        fd,
                        work: Work::Sync { gated },
                        done,
                    });
                }
                leave_gate(&backend, gated);
                done(Ok(Output::None));
                return None;
            }
            Work::Write {
                data,
                offset,
                done_len: 0,
                fua,
                gated,
            }
        }
        Op::Flush => Work::Sync { gated: false },
        other => {
            tokio_free_blocking(backend, other, done);
            return None;
        }
    };
    Some(Slot {
        backend,
        fd,
        work,
        done,
    })
}

/// Runs an op on a plain thread (the ring thread is not inside a Tokio runtime).
fn tokio_free_blocking(backend: Arc<dyn Backend>, op: Op, done: Done) {
    let spawned = std::thread::Builder::new()
        .name("enbd-uring-slow".into())
        .spawn(move || done(run_blocking(&*backend, op)));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot spawn a thread for a slow-path op");
    }
}

fn start(
    ring: &mut IoUring,
    slots: &mut Vec<Option<Slot>>,
    free: &mut Vec<usize>,
    in_flight: &mut usize,
    mut slot: Slot,
) -> io::Result<()> {
    let idx = free.pop().unwrap_or_else(|| {
        slots.push(None);
        slots.len() - 1
    });
    let fd = types::Fd(slot.fd);
    let sqe = match &mut slot.work {
        Work::Read { buf, offset, want } => {
            let done = buf.len();
            let rest = &mut buf.spare_capacity_mut()[..*want - done];
            opcode::Read::new(fd, rest.as_mut_ptr().cast(), rest.len() as u32)
                .offset(*offset + done as u64)
                .build()
        }
        Work::Write {
            data,
            offset,
            done_len,
            ..
        } => {
            let rest = &data[*done_len..];
            opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                .offset(*offset + *done_len as u64)
                .build()
        }
        Work::Sync { .. } => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    slots[idx] = Some(slot);
    *in_flight += 1;
    push(ring, &sqe.user_data(idx as u64))
}

fn leave_gate(backend: &Arc<dyn Backend>, gated: bool) {
    if gated && let Some(g) = backend.write_gate() {
        g.leave();
    }
}

/// Handles one completion. Returns the slot if it needs another submission.
fn complete(mut slot: Slot, res: i32) -> Option<Slot> {
    if res == -libc::EINTR || res == -libc::EAGAIN {
        return Some(slot);
    }
    if res < 0 {
        let gated = match slot.work {
            Work::Write { gated, .. } | Work::Sync { gated } => gated,
            Work::Read { .. } => false,
        };
        leave_gate(&slot.backend, gated);
        (slot.done)(Err(ExportError::Io(io::Error::from_raw_os_error(-res))));
        return None;
    }
    let n = res as usize;
    match &mut slot.work {
        Work::Read { buf, want, .. } => {
            if n == 0 {
                // End of file: the rest of the export reads as zeroes.
                buf.resize(*want, 0);
            } else {
                // SAFETY: the kernel reported `n` bytes written into the spare capacity this
                // read was submitted with, which `start` limited to `want - buf.len()`.
                unsafe { buf.set_len(buf.len() + n.min(*want - buf.len())) };
            }
            if buf.len() < *want {
                return Some(slot);
            }
            let Work::Read { buf, .. } = slot.work else {
                return None;
            };
            (slot.done)(Ok(Output::Data(buf.freeze())));
            None
        }
        Work::Write {
            data,
            done_len,
            fua,
            gated,
            ..
        } => {
            *done_len += n;
            if n == 0 {
                leave_gate(&slot.backend, *gated);
                (slot.done)(Err(ExportError::Io(io::ErrorKind::WriteZero.into())));
                return None;
            }
            if *done_len < data.len() {
                return Some(slot);
            }
            if *fua {
                slot.work = Work::Sync { gated: *gated };
                return Some(slot);
            }
            leave_gate(&slot.backend, *gated);
            (slot.done)(Ok(Output::None));
            None
        }
        Work::Sync { gated } => {
            leave_gate(&slot.backend, *gated);
            (slot.done)(Ok(Output::None));
            None
        }
    }
}
