//! enbd-node library.
pub mod mount;
pub mod csi;
