//! enbd-node library.
pub mod mount;
pub mod csi;
pub mod device;
pub mod engine;
