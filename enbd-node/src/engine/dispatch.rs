//! Dispatch: how healthy channels share the journal's queue.
//!
//! Channels pull work (a stalled or dead channel simply stops pulling, so new IO flows to
//! the others without any routing table). A waking channel takes an even share of what is
//! queued, never more than it has room for, so a burst spreads across channels instead of
//! landing on whichever woke first; the journal wakes the next channel for the rest.

/// How many queued requests a channel with `room` free in-flight slots should take when
/// `queued` requests wait and `up` channels are connected.
pub(crate) fn share(queued: usize, up: usize, room: usize) -> usize {
    let up = up.max(1);
    queued.div_ceil(up).clamp(1, room.max(1)).min(room)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_evenly_and_respects_room() {
        assert_eq!(share(10, 2, 128), 5);
        assert_eq!(share(11, 2, 128), 6);
        assert_eq!(share(1, 4, 128), 1);
        assert_eq!(share(1000, 1, 128), 128);
        assert_eq!(share(10, 2, 3), 3);
        assert_eq!(share(10, 2, 0), 0);
        assert_eq!(share(0, 2, 8), 1);
        assert_eq!(share(5, 0, 8), 5);
    }
}
