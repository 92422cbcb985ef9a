//! A ublk queue thread: one async task per tag on a local executor, driven by the queue's
//! io_uring. Each tag task fetches a request, hands it over the bridge, awaits the answer and
//! commits it together with the fetch of the next request.
//! Invariant: every fetched request is committed exactly once, unless the queue goes down.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkUringData};
use tokio::sync::oneshot;

use super::bridge::{Job, QueueLink};
use super::request::{BlockRequest, IoDesc, decode};

/// Seconds the ring may sleep with nothing to do: only a bound on the idle wait; work and
/// doorbells wake it at once.
const IDLE_SECS: u64 = 20;

/// Runs queue `qid` until the device stops. Called on the thread libublk made for the queue.
/// `size_bytes` is the device's current size, shared with [`super::Device::resize`].
pub(crate) fn run(qid: u16, dev: &UblkDev, link: QueueLink, size_bytes: Arc<AtomicU64>) {
    let queue = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(dev_id = dev.dev_info.dev_id, qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let buf_bytes = dev.dev_info.max_io_buf_bytes as usize;
    let tags: Vec<_> = queue
        .tags()
        .map(|tag| {
            exe.spawn(serve_tag(
                queue.clone(),
                tag,
                link.clone(),
                size_bytes.clone(),
                buf_bytes,
            ))
        })
        .collect();
    // The doorbell reader never finishes on its own; it is dropped with the executor.
    let _bell = exe.spawn(listen_doorbell(link.clone()));
    drop(link);

    let runner = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while runner.try_tick() {};
        let done = || tags.iter().all(|t| t.is_finished());
        if let Err(e) =
            libublk::wait_and_handle_io_events(&queue, Some(IDLE_SECS), run_ops, done).await
        {
            tracing::warn!(qid, error = %e, "ublk queue loop ended with an error");
        }
    }));
}

/// Keeps a read armed on the doorbell so that a reply from the runtime wakes the ring; the
/// woken tag tasks are then run by the executor tick that follows every reap.
async fn listen_doorbell(link: QueueLink) {
    let mut counter = Box::new([0u8; 8]);
    loop {
        let sqe =
            opcode::Read::new(types::Fd(link.doorbell.raw_fd()), counter.as_mut_ptr(), 8).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(res) if res >= 0 || res == -libc::EINTR || res == -libc::EAGAIN => {}
            Ok(res) => {
                tracing::error!(errno = -res, "ublk doorbell read failed");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "ublk doorbell read could not be submitted");
                return;
            }
        }
    }
}

async fn serve_tag(
    queue: Rc<UblkQueue<'_>>,
    tag: u16,
    link: QueueLink,
    size: Arc<AtomicU64>,
    buf_bytes: usize,
) {
    let mut buf = IoBuf::<u8>::new(buf_bytes);
    match queue
        .submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), -1, Some(&buf))
        .await
    {
        Ok(_) => {}
        Err(UblkError::QueueIsDown) => return,
        Err(e) => {
            tracing::error!(tag, error = %e, "ublk fetch failed");
            return;
        }
    }
    loop {
        let desc = IoDesc::from(queue.get_iod(tag));
        // Read per request: an online resize may have grown the device since the last one.
        let result = handle(
            desc,
            buf.as_mut_slice(),
            &link,
            size.load(Ordering::Acquire),
        )
        .await;
        match queue
            .submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), result)
            .await
        {
            Ok(_) => {}
            Err(UblkError::QueueIsDown) => return,
            Err(e) => {
                tracing::error!(tag, error = %e, "ublk commit failed");
                return;
            }
        }
    }
}

/// Serves one request; returns the ublk completion value (bytes done, or a negative errno).
async fn handle(desc: IoDesc, buf: &mut [u8], link: &QueueLink, size: u64) -> i32 {
    let req = match decode(desc, buf, size) {
        Ok(req) => req,
        Err(errno) => {
            tracing::warn!(
                op_flags = desc.op_flags,
                sector = desc.start_sector,
                sectors = desc.nr_sectors,
                errno,
                "ublk request rejected"
            );
            return -errno;
        }
    };
    let read_len = match req {
        BlockRequest::Read { len, .. } => Some(len as usize),
        _ => None,
    };
    let done = (desc.nr_sectors as i32).saturating_mul(512);
    let (reply, answer) = oneshot::channel();
    if link.jobs.try_send(Job { req, reply }).is_err() {
        // Only when the runtime side is gone: a failure, not a shutdown (the daemon keeps its
        // runtime running until the process ends, so a stop never lands here).
        return -libc::EIO;
    }
    match answer.await {
        Ok(Ok(data)) => match read_len {
            Some(len) if data.len() == len => {
                buf[..len].copy_from_slice(&data);
                done
            }
            Some(len) => {
                tracing::error!(expected = len, got = data.len(), "short read from target");
                -libc::EIO
            }
            None => done,
        },
        Ok(Err(errno)) => -errno.abs(),
        Err(_) => -libc::EIO,
    }
}
