//! The one rule for a poisoned mutex in csi-driver: recover the guard and carry on, logging
//! that it happened.
//!
//! The same rule as enbd-node's `sync` module (see the README, "Mutex poisoning"): every
//! mutex here guards data that stays consistent between statements (a set insert or remove,
//! a map entry), so recovering is sound, and refusing service would turn one panic into a
//! stuck volume.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the guard if a panicking thread poisoned it.
pub fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|p: PoisonError<_>| {
        tracing::warn!(
            lock = what,
            "a thread panicked while holding this lock; recovering its data"
        );
        p.into_inner()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_yields_its_data() {
        let m = Mutex::new(vec![1, 2]);
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let mut g = m.lock().unwrap();
                g.push(3);
                panic!("poison it");
            })
            .join()
        });
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m, "test"), vec![1, 2, 3]);
    }
}
