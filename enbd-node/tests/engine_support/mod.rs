//! Shared harness of the engine tests: NBD peer servers as real processes on 127.0.0.1
//! (enbd-server through enbd-test-harness; qemu-nbd, nbdkit, nbd-server here), readiness by
//! the server's readiness line or by connecting, kill by pid on drop;
//! and the checksummed workload that proves no acknowledged write is ever lost.
//! A missing peer program fails the test loudly; nothing here skips.
#![allow(dead_code)]

pub mod workload;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use enbd_e2e::faultproxy::FaultProxy;
use enbd_node::engine::ClientConfig;
use enbd_test_harness::EnbdServer;

/// The NBD servers the engine is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    EnbdServer,
    QemuNbd,
    Nbdkit,
    NbdServer,
}

/// A running peer serving one export.
pub struct Peer {
    pub kind: PeerKind,
    pub addr: SocketAddr,
    pub export: String,
    child: Option<Child>,
    /// enbd-server, run by the shared harness.
    enbd: Option<EnbdServer>,
    /// A daemonised peer (nbd-server) is killed by pid.
    daemon_pid: Option<String>,
    /// For file-backed peers: the file; for enbd-server: its data directory.
    pub data: PathBuf,
    _conf: Option<tempfile::TempDir>,
}

impl Peer {
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// The enbd-server behind this peer, if it is one (its management API).
    pub fn enbd(&self) -> Option<&EnbdServer> {
        self.enbd.as_ref()
    }

    /// SIGTERM and wait for the exit: a graceful shutdown (enbd-server lets in-flight
    /// requests finish, then closes its connections).
    pub fn terminate(mut self) {
        if let Some(server) = self.enbd.take() {
            server.terminate(Duration::from_secs(40));
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while c.try_wait().expect("try_wait").is_none() {
                assert!(Instant::now() < deadline, "peer ignored SIGTERM for 40 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_now();
    }

    /// SIGKILL and reap: a crash, not a shutdown.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        drop(self.enbd.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(pid) = self.daemon_pid.take() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill_now();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until `addr` accepts a TCP connection while `child` stays alive.
fn wait_listening(child: &mut Child, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            panic!("{what} exited before listening on {addr}: {st}");
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(cmd: &str, args: &[String]) -> Child {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it with e2e/setup-host.sh): {e}"))
}

/// A sparse file of `size` bytes in `dir`.
pub fn sparse_file(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(size).expect("size image");
    path
}

/// Starts `kind` serving `data` (a file; for enbd-server a data directory whose `demo`
/// volume is served). Port collisions are retried.
pub fn start_peer(kind: PeerKind, data: &Path) -> Peer {
    for _ in 0..5 {
        if let Some(p) = try_start_peer(kind, data) {
            return p;
        }
    }
    panic!("{kind:?} could not be started");
}

fn try_start_peer(kind: PeerKind, data: &Path) -> Option<Peer> {
    let export = match kind {
        PeerKind::EnbdServer => "demo",
        _ => "disk",
    }
    .to_owned();
    if kind == PeerKind::EnbdServer {
        return Some(start_enbd_server(data));
    }
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let file = data.display().to_string();
    let mut conf = None;
    let mut child = match kind {
        PeerKind::QemuNbd => spawn(
            "qemu-nbd",
            &[
                "-f",
                "raw",
                "-x",
                &export,
                "-p",
                &port.to_string(),
                "-b",
                "127.0.0.1",
                "--shared=16",
                "-t",
                "--cache=writeback",
                &file,
            ]
            .map(String::from),
        ),
        PeerKind::Nbdkit => spawn(
            "nbdkit",
            &[
                "-f",
                "-p",
                &port.to_string(),
                "-i",
                "127.0.0.1",
                "-e",
                &export,
                "file",
                &file,
            ]
            .map(String::from),
        ),
        PeerKind::NbdServer => {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = dir.path().join("config");
            std::fs::write(
                &cfg,
                format!(
                    "[generic]\nlistenaddr = 127.0.0.1\nport = {port}\nallowlist = false\n\
                     [{export}]\nexportname = {file}\nflush = true\nfua = true\ntrim = true\nmultifile = false\n"
                ),
            )
            .expect("write nbd-server config");
            let pid = dir.path().join("pid");
            let c = spawn(
                "nbd-server",
                &[
                    "-C".into(),
                    cfg.display().to_string(),
                    "-p".into(),
                    pid.display().to_string(),
                ],
            );
            conf = Some(dir);
            c
        }
        PeerKind::EnbdServer => unreachable!(),
    };
    // nbd-server daemonises: the parent exits at once, the daemon keeps serving.
    if kind == PeerKind::NbdServer {
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pidfile = conf.as_ref().expect("conf").path().join("pid");
        let pid = std::fs::read_to_string(&pidfile).ok()?.trim().to_owned();
        return Some(Peer {
            kind,
            addr,
            export,
            child: None,
            enbd: None,
            daemon_pid: Some(pid),
            data: data.to_owned(),
            _conf: conf,
        });
    }
    std::thread::sleep(Duration::from_millis(10));
    if let Ok(Some(_)) = child.try_wait() {
        return None;
    }
    wait_listening(&mut child, addr, &format!("{kind:?}"));
    Some(Peer {
        kind,
        addr,
        export,
        child: Some(child),
        enbd: None,
        daemon_pid: None,
        data: data.to_owned(),
        _conf: conf,
    })
}

/// Starts enbd-server with `--demo` on `data_dir` (the 1 GiB `demo` volume is created if
/// missing and reused when present, so a restart serves the same data).
pub fn start_enbd_server(data_dir: &Path) -> Peer {
    start_enbd_server_with(data_dir, &[])
}

/// As [`start_enbd_server`], with `extra` flags (TLS, say).
pub fn start_enbd_server_with(data_dir: &Path, extra: &[String]) -> Peer {
    let server = EnbdServer::builder()
        .id("engine-test")
        .demo()
        .data_dir(data_dir)
        .args(extra)
        .start();
    Peer {
        kind: PeerKind::EnbdServer,
        addr: server.nbd(),
        export: "demo".into(),
        child: None,
        enbd: Some(server),
        daemon_pid: None,
        data: data_dir.to_owned(),
        _conf: None,
    }
}

/// nbdkit's file plugin on `data` with `--tls=require` and the x509 certificates of `certs`
/// (a directory with ca-cert.pem, server-cert.pem, server-key.pem).
pub fn start_nbdkit_tls(data: &Path, certs: &Path) -> Peer {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut child = spawn(
        "nbdkit",
        &[
            "-f".into(),
            "-p".into(),
            port.to_string(),
            "-i".into(),
            "127.0.0.1".into(),
            "--tls=require".into(),
            format!("--tls-certificates={}", certs.display()),
            "file".into(),
            data.display().to_string(),
        ],
    );
    wait_listening(&mut child, addr, "nbdkit");
    Peer {
        kind: PeerKind::Nbdkit,
        addr,
        export: String::new(),
        child: Some(child),
        enbd: None,
        daemon_pid: None,
        data: data.to_owned(),
        _conf: None,
    }
}

/// A fresh enbd-server (its data directory and the server) behind a fault proxy, with a client
/// configuration that dials the proxy: what the fault and limit tests start from.
pub async fn proxied_enbd_server() -> (tempfile::TempDir, Peer, FaultProxy, ClientConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = start_enbd_server(dir.path());
    let proxy = FaultProxy::start("127.0.0.1:0".parse().expect("addr"), peer.addr)
        .await
        .expect("proxy");
    let cfg = ClientConfig::new(proxy.local_addr().to_string(), &peer.export);
    (dir, peer, proxy, cfg)
}
