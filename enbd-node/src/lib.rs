//! enbd-node library.
pub mod mount;
