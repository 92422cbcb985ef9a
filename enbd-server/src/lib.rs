//! enbd-server: an NBD server over volumes kept as sparse files, with a management gRPC API.
//!
//! Layers, dependencies pointing one way: `enbd_proto::wire` (codec) → [`export`] /
//! [`store`] (backends and the volume store) → [`session`] (one NBD connection) →
//! [`server`] (listeners, limits, shutdown) and [`mgmt`] (gRPC) → `main.rs`.

// Tests may unwrap: a panic is the failure report.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod cli;
pub mod datadir;
pub mod export;
pub mod metrics;
pub mod mgmt;
pub mod ready;
pub mod server;
pub mod session;
pub mod store;
mod sys;
/// In-memory exports and a socket-free session driver, for tests and the fuzz target only:
/// not part of the library's API (the `testkit` feature, off by default).
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod tls;
