//! enbd-node library.
