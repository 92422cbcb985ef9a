//! Test harness: the real `enbd-server` binary of this package, started through the shared
//! harness (127.0.0.1, port 0, a temporary data directory, readiness line, killed by pid on
//! drop) with `--demo` (a 1 GiB sparse volume `demo`) and `--server-id=test-server`.
#![allow(dead_code)]

use std::process::Command;

pub use enbd_test_harness::EnbdServer as TestServer;
use enbd_test_harness::ServerBuilder;

fn demo(log: &str) -> ServerBuilder {
    TestServer::builder()
        .bin(env!("CARGO_BIN_EXE_enbd-server"))
        .demo()
        .log(log)
}

/// Starts the server plus `extra` flags.
pub fn start(extra: &[&str]) -> TestServer {
    demo("enbd_server=debug").args(extra).start()
}

/// As [`start`], on a data directory a crashed server handed back.
pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> TestServer {
    demo("enbd_server=debug").args(extra).start_in(dir)
}

/// As [`start`], with `RUST_LOG=log`.
pub fn start_with_log(extra: &[&str], log: &str) -> TestServer {
    demo(log).args(extra).start()
}

/// Runs a tool; panics with its output if it is missing or fails (a missing tool fails the
/// test loudly, it never skips).
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it with e2e/setup-host.sh): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
