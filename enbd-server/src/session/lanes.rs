//! One write thread per open volume (the `pool` engine's write path).
//!
//! Why: Linux filesystems (ext4, xfs) take the inode's lock exclusively for every buffered
//! write, so writes to one file never run in parallel however many threads issue them. With
//! sixteen pool threads writing to one volume, most of the CPU went to spinning on that lock
//! (measured: 16 threads 31 k 4k writes/s at ~45 µs of server CPU each, one thread 46 k; see
//! the README's benchmark section). A lane per volume does the same writes back to back on one
//! thread, and volumes still write in parallel with each other.
//!
//! Invariants: every job submitted runs exactly once, in submission order for its lane; a lane
//! thread exits only after it has been idle for [`IDLE_EXIT`] with an empty queue, and it
//! removes itself from the map under the same lock submitters use, so no job is ever queued
//! on a lane whose thread has gone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// How long an idle lane keeps its thread.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// Most jobs a lane takes from its queue at once (the rest stay visible to `submit`).
const BATCH: usize = 64;

struct Lane {
    jobs: VecDeque<Job>,
    sleeping: bool,
    wake: Arc<Condvar>,
}

#[derive(Default)]
struct Shared {
    lanes: Mutex<HashMap<usize, Lane>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<usize, Lane>> {
        self.lanes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The lanes of one server; cheap to share.
#[derive(Default)]
pub struct WriteLanes {
    shared: Arc<Shared>,
}

impl WriteLanes {
    /// Runs `job` on the lane of `key` (a volume's identity: the address of its backend,
    /// which the job keeps alive), starting the lane's thread if it has none. The job comes
    /// back with the error if no thread could be started.
    pub fn submit(&self, key: usize, job: Job) -> Result<(), (std::io::Error, Job)> {
        let mut lanes = self.shared.lock();
        let lane = match lanes.get_mut(&key) {
            Some(lane) => lane,
            None => {
                let shared = self.shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("enbd-write".into())
                    .spawn(move || run_lane(&shared, key));
                if let Err(e) = spawned {
                    return Err((e, job));
                }
                lanes.entry(key).or_insert(Lane {
                    jobs: VecDeque::new(),
                    sleeping: false,
                    wake: Arc::new(Condvar::new()),
                })
            }
        };
        lane.jobs.push_back(job);
        if lane.sleeping {
            lane.wake.notify_one();
        }
        Ok(())
    }

    /// Lanes with a live thread.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.shared.lock().len()
    }
}

fn run_lane(shared: &Shared, key: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    loop {
        {
            let mut lanes = shared.lock();
            loop {
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                if !lane.jobs.is_empty() {
                    let n = lane.jobs.len().min(BATCH);
                    batch.extend(lane.jobs.drain(..n));
                    break;
                }
                lane.sleeping = true;
                let wake = lane.wake.clone();
                let (guard, timeout) = wake
                    .wait_timeout(lanes, IDLE_EXIT)
                    .unwrap_or_else(|p| p.into_inner());
                lanes = guard;
                let Some(lane) = lanes.get_mut(&key) else {
                    return;
                };
                lane.sleeping = false;
                if timeout.timed_out() && lane.jobs.is_empty() {
                    lanes.remove(&key);
                    return;
                }
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
    use std::sync::mpsc;

    #[test]
    fn jobs_of_one_lane_run_once_in_order_and_lanes_are_separate() {
        let lanes = WriteLanes::default();
        let (tx, rx) = mpsc::channel();
        for i in 0..2000u32 {
            let tx = tx.clone();
            let key = (i % 2) as usize + 1;
            lanes
                .submit(
                    key,
                    Box::new(move || {
                        let name = std::thread::current().name().map(str::to_owned);
                        tx.send((key, i, name)).unwrap();
                    }),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let mut last = HashMap::new();
        for _ in 0..2000 {
            let (key, i, name) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(name.as_deref(), Some("enbd-write"));
            if let Some(prev) = last.insert(key, i) {
                assert!(prev < i, "lane {key} ran {i} after {prev}");
            }
        }
        assert!(rx.try_recv().is_err(), "a job ran twice");
        assert_eq!(lanes.active(), 2);
    }
}
