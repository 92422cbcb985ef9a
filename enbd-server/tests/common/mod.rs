//! Test harness: runs the real `enbd-server` binary on 127.0.0.1 with port 0 and a
//! temporary data directory, waits for its readiness line, and kills it (by pid) on drop.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_server::ready::spawn_until_ready;
use tonic::transport::Channel;

pub struct TestServer {
    pub child: Child,
    pub nbd: SocketAddr,
    pub mgmt: SocketAddr,
    pub metrics: SocketAddr,
    dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts the server with `--demo` (a 1 GiB sparse volume `demo`) plus `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_in_with_log(dir, extra, "enbd_server=debug")
    }

    /// As [`TestServer::start`], with `RUST_LOG=log`.
    pub fn start_with_log(extra: &[&str], log: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in_with_log(dir, extra, log)
    }

    fn start_in_with_log(dir: tempfile::TempDir, extra: &[&str], log: &str) -> Self {
        let (child, ready) = spawn_until_ready(
            Command::new(env!("CARGO_BIN_EXE_enbd-server"))
                .args(["--demo", "--server-id=test-server", "--listen=127.0.0.1:0"])
                .args(["--mgmt-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
                .arg(format!("--data-dir={}", dir.path().display()))
                .args(extra)
                .env("RUST_LOG", log)
                .stderr(Stdio::inherit()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        TestServer {
            nbd: ready.nbd,
            mgmt: ready.mgmt,
            metrics: ready.metrics,
            child,
            dir: Some(dir),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.as_ref().expect("data dir").path()
    }

    /// kill -9, as a crash would; hands back the data directory for a restart.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.take().expect("data dir")
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.nbd, export)
    }

    pub async fn client(&self) -> VolumeServiceClient<Channel> {
        VolumeServiceClient::connect(format!("http://{}", self.mgmt))
            .await
            .expect("mgmt connect")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for the exit status (graceful shutdown).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not stop within 6 s of SIGTERM");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
