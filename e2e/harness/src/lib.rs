//! enbd-test-harness: what the workspace's tests share to run the real thing.
//!
//! - [`server`]: enbd-server as a process on 127.0.0.1 with port-0 listeners and a temporary
//!   data directory, ready once it printed its readiness line, killed by pid (and reaped) on
//!   drop, so no test leaves a server behind.
//! - [`bin`]: where the built workspace binaries are.
//! - [`unix`]: gRPC channels over unix sockets (the CSI endpoints of our daemons).
//! - [`lines`]: waiting for another daemon's readiness line on its stdout.
//! - [`pit`]: writers of sequence-numbered blocks and the point-in-time check of a snapshot
//!   taken under them (with a minimal blocking NBD client).
//! - [`prom`]: scraping `/metrics` and parsing the Prometheus text format strictly.
//!
//! A missing binary or a server that does not come up fails the test loudly (these helpers
//! panic with the reason); nothing here skips. Test code only: this crate is a
//! dev-dependency everywhere except the e2e tools.

pub mod bin;
pub mod lines;
pub mod pit;
pub mod prom;
pub mod server;
pub mod unix;

pub use server::{EnbdServer, ServerBuilder};
pub use unix::unix_channel;
