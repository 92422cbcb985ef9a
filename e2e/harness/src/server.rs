//! enbd-server as a process, the way every test of the workspace runs it: listeners on
//! 127.0.0.1 port 0 (the ports come from the server's readiness line, so tests never race
//! for ports), a temporary data directory unless the test brings its own, and a kill by pid
//! on drop.
//!
//! Invariant: while an [`EnbdServer`] exists its process has printed its readiness line
//! (every listener bound, the store open) or has been killed by [`EnbdServer::kill`]; when
//! it is dropped the process is killed and reaped.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use enbd_proto::enbd::replica_service_client::ReplicaServiceClient;
use enbd_proto::enbd::volume_service_client::VolumeServiceClient;
use enbd_server::ready::{ReadyLine, spawn_until_ready};
use tonic::transport::Channel;

/// How to start one enbd-server; [`ServerBuilder::start`] runs it.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    bin: Option<PathBuf>,
    id: String,
    demo: bool,
    data_dir: Option<PathBuf>,
    args: Vec<OsString>,
    log: Option<String>,
}

impl ServerBuilder {
    /// The binary to run (an integration test of enbd-server passes
    /// `env!("CARGO_BIN_EXE_enbd-server")`); default [`crate::bin::enbd_server`].
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// `--server-id` (default `test-server`).
    pub fn id(mut self, id: &str) -> Self {
        id.clone_into(&mut self.id);
        self
    }

    /// `--demo`: a 1 GiB sparse volume `demo`, created if missing, served by default.
    pub fn demo(mut self) -> Self {
        self.demo = true;
        self
    }

    /// Serve this directory (the caller keeps it) instead of a fresh temporary one.
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_owned());
        self
    }

    /// More command-line arguments, after the harness's own.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// `RUST_LOG` for the server (its logs go to the test's stderr); default: inherited.
    pub fn log(mut self, filter: &str) -> Self {
        self.log = Some(filter.to_owned());
        self
    }

    /// Starts the server and waits for its readiness line; panics (with the server's own
    /// complaint on stderr) if it exits first.
    pub fn start(self) -> EnbdServer {
        let temp = match self.data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))),
        };
        self.start_with(temp)
    }

    /// Starts on `dir`, a temporary directory the server owns from now on (a restart after
    /// [`EnbdServer::crash`] hands it back this way).
    pub fn start_in(self, dir: tempfile::TempDir) -> EnbdServer {
        self.start_with(Some(dir))
    }

    fn start_with(self, temp: Option<tempfile::TempDir>) -> EnbdServer {
        let data = match (&temp, &self.data_dir) {
            (Some(t), _) => t.path().to_owned(),
            (None, Some(d)) => d.clone(),
            (None, None) => unreachable!("start() always brings a directory"),
        };
        let (child, ready) = self.spawn(&data);
        EnbdServer {
            child: Some(child),
            ready,
            data,
            temp,
            builder: self,
        }
    }

    fn spawn(&self, data: &Path) -> (Child, ReadyLine) {
        let bin = self.bin.clone().unwrap_or_else(crate::bin::enbd_server);
        let mut cmd = Command::new(&bin);
        if self.demo {
            cmd.arg("--demo");
        }
        cmd.arg(format!("--server-id={}", self.id))
            .args(["--listen=127.0.0.1:0", "--mgmt-listen=127.0.0.1:0"])
            .arg("--metrics-listen=127.0.0.1:0")
            .arg(format!("--data-dir={}", data.display()))
            .args(&self.args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(log) = &self.log {
            cmd.env("RUST_LOG", log);
        }
        spawn_until_ready(&mut cmd)
            .unwrap_or_else(|e| panic!("{} did not start: {e}", bin.display()))
    }
}

/// A running enbd-server (see the module's invariant).
pub struct EnbdServer {
    child: Option<Child>,
    ready: ReadyLine,
    data: PathBuf,
    temp: Option<tempfile::TempDir>,
    builder: ServerBuilder,
}

impl EnbdServer {
    /// A server `test-server` on a fresh temporary data directory, no demo volume.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            bin: None,
            id: "test-server".to_owned(),
            demo: false,
            data_dir: None,
            args: Vec::new(),
            log: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.builder.id
    }

    /// What the server announced (the addresses of its current process).
    pub fn ready(&self) -> ReadyLine {
        self.ready
    }

    pub fn nbd(&self) -> SocketAddr {
        self.ready.nbd
    }

    pub fn mgmt(&self) -> SocketAddr {
        self.ready.mgmt
    }

    pub fn metrics(&self) -> SocketAddr {
        self.ready.metrics
    }

    /// `http://ADDR` of the management API.
    pub fn mgmt_url(&self) -> String {
        format!("http://{}", self.ready.mgmt)
    }

    /// `nbd://ADDR/EXPORT`, for NBD tools.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.ready.nbd)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The process id; panics after [`EnbdServer::kill`].
    pub fn pid(&self) -> i32 {
        match &self.child {
            Some(c) => i32::try_from(c.id()).unwrap_or_else(|_| panic!("pid out of range")),
            None => panic!("the server was killed"),
        }
    }

    pub async fn mgmt_client(&self) -> VolumeServiceClient<Channel> {
        VolumeServiceClient::connect(self.mgmt_url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.mgmt_url()))
    }

    pub async fn replica_client(&self) -> ReplicaServiceClient<Channel> {
        ReplicaServiceClient::connect(self.mgmt_url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.mgmt_url()))
    }

    /// SIGKILL and reap, as a crash would; the data directory stays. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server (if running) and starts a new process with the same command line
    /// on the same data directory; the new process has new ports.
    pub fn restart(&mut self) {
        self.kill();
        let (child, ready) = self.builder.spawn(&self.data);
        self.child = Some(child);
        self.ready = ready;
    }

    /// kill -9, then hands back the temporary data directory for a restart
    /// ([`ServerBuilder::start_in`]). Panics if the directory was the caller's.
    pub fn crash(mut self) -> tempfile::TempDir {
        self.kill();
        match self.temp.take() {
            Some(t) => t,
            None => panic!("crash(): the data directory belongs to the caller, not the server"),
        }
    }

    /// SIGTERM, then waits for the exit (a graceful shutdown); panics (after a SIGKILL) if
    /// the server is still running `within` later.
    pub fn terminate(mut self, within: Duration) -> ExitStatus {
        let Some(mut c) = self.child.take() else {
            panic!("terminate(): the server was killed");
        };
        // SAFETY: signalling our own child by pid; it has not been reaped, so the pid is ours.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("enbd-server did not stop within {within:?} of SIGTERM");
                }
                Err(e) => panic!("waiting for enbd-server: {e}"),
            }
        }
    }
}

impl Drop for EnbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
