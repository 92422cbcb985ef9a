//! A small fixed pool of IO threads for positional IO (the `pool` engine).
//!
//! Why not `spawn_blocking`: its pool grows a thread per concurrent job (64 requests in flight
//! make 64 threads fighting over 2 cores) and wakes one for every job. Here a few threads
//! drain one queue in batches; while they are busy, submitting is a mutex push and no wake-up.
//!
//! Invariants: every queued job runs exactly once; a worker sleeps only when the queue is
//! empty, and a submit wakes one only if some worker is asleep.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    sleeping: usize,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle on the pool; threads live for the rest of the process.
pub struct IoPool {
    shared: Arc<Shared>,
}

impl IoPool {
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        for i in 0..threads.max(1) {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("enbd-io-{i}"))
                .spawn(move || worker(&s))?;
        }
        Ok(Self { shared })
    }

    pub fn submit(&self, job: Job) {
        let wake = {
            let mut q = self.shared.lock();
            q.jobs.push_back(job);
            q.sleeping > 0
        };
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

fn worker(s: &Shared) {
    let mut batch: Vec<Job> = Vec::with_capacity(16);
    loop {
        {
            let mut q = s.lock();
            while q.jobs.is_empty() {
                q.sleeping += 1;
                q = s.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                q.sleeping -= 1;
            }
            // Take a few, not all: other workers should get a share while we run these.
            let n = q.jobs.len().div_ceil(2).min(16);
            batch.extend(q.jobs.drain(..n));
            // More left and someone asleep: hand the rest over.
            if !q.jobs.is_empty() && q.sleeping > 0 {
                s.ready.notify_one();
            }
        }
        for job in batch.drain(..) {
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_once() {
        let pool = IoPool::start(3).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..1000 {
            let (c, tx) = (count.clone(), tx.clone());
            pool.submit(Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            }));
        }
        for _ in 0..1000 {
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        }
        assert_eq!(count.load(Ordering::SeqCst), 1000);
    }
}
