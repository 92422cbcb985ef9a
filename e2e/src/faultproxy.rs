//! A TCP fault-injection proxy for the engine's failover tests (and the VM suite).
//!
//! Each accepted connection is a separate pipe to the upstream address, addressable by id, so
//! one NBD channel can be reset while its siblings keep running. Faults on command:
//! `reset` (RST both ends), `close` (FIN both ends), `stall`/`resume` (blackhole: nothing is
//! forwarded, bytes stay queued and flow again on resume — what a network partition that
//! heals looks like to TCP), `delay` (each chunk forwarded that long after it arrived),
//! `refuse` (new connections are reset at once), and `upstream` (point new connections
//! elsewhere, e.g. a restarted server). Invariant: a killed connection's queued bytes are
//! discarded, never delivered late.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read from one side per chunk.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction before the reader stops reading (TCP backpressure).
const QUEUED_CHUNKS: usize = 64;

/// How a connection is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Abortive close: both peers see ECONNRESET.
    Reset,
    /// Orderly close: both peers see EOF.
    Close,
}

/// Forwarding conditions shared by every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Mode {
    stalled: bool,
    delay: Duration,
}

/// One live proxied connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub id: u64,
    /// The client's address as the proxy sees it (the client's local address).
    pub client: SocketAddr,
    pub upstream: SocketAddr,
}

struct ConnCtl {
    info: ConnInfo,
    kill: mpsc::UnboundedSender<Kill>,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    mode: watch::Sender<Mode>,
    refuse: AtomicBool,
    conns: Mutex<HashMap<u64, ConnCtl>>,
    changed: Notify,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnCtl>> {
        // Every critical section is a single map operation: a poisoned map is still whole.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn upstream(&self) -> SocketAddr {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running proxy. Dropping it stops accepting and kills every connection.
pub struct FaultProxy {
    shared: Arc<Shared>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            mode: watch::Sender::new(Mode::default()),
            refuse: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let acceptor = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy {
            shared,
            local,
            acceptor,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// New connections go to `addr`; existing ones are untouched.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Live connections, oldest first.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let mut v: Vec<ConnInfo> = self
            .shared
            .conns()
            .values()
            .map(|c| c.info.clone())
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Connections accepted since start (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Kills connection `id`; false if no such live connection.
    pub fn kill(&self, id: u64, how: Kill) -> bool {
        match self.shared.conns().get(&id) {
            Some(c) => c.kill.send(how).is_ok(),
            None => false,
        }
    }

    /// Kills the connection whose client end is `client` (e.g. an engine channel's local
    /// address); false if none.
    pub fn kill_client(&self, client: SocketAddr, how: Kill) -> bool {
        let id = self
            .shared
            .conns()
            .values()
            .find(|c| c.info.client == client)
            .map(|c| c.info.id);
        id.is_some_and(|id| self.kill(id, how))
    }

    /// Kills every live connection; returns how many.
    pub fn kill_all(&self, how: Kill) -> usize {
        self.shared
            .conns()
            .values()
            .filter(|c| c.kill.send(how).is_ok())
            .count()
    }

    /// Refuses new connections and kills every live one, then waits until all have ended
    /// (false if some are still live at `timeout`). `kill_all` only tells each connection's
    /// task, which acts when it next looks: until it has, bytes sent next can still get
    /// through, so a test that cuts a server off and then writes must wait here.
    pub async fn cut_off(&self, how: Kill, timeout: Duration) -> bool {
        self.refuse(true);
        self.kill_all(how);
        self.wait_connections(0, timeout).await
    }

    /// Stops forwarding in both directions on every connection (new ones too).
    pub fn stall(&self) {
        self.shared.mode.send_modify(|m| m.stalled = true);
    }

    pub fn resume(&self) {
        self.shared.mode.send_modify(|m| m.stalled = false);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared.mode.send_modify(|m| m.delay = delay);
    }

    /// While on, new connections are reset as soon as they are accepted.
    pub fn refuse(&self, on: bool) {
        self.shared.refuse.store(on, Ordering::Release);
    }

    /// Waits until exactly `n` connections are live; false on timeout.
    pub async fn wait_connections(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.shared.conns().len() == n {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Applies a textual command (the binary's control protocol) and returns a one-line answer.
    pub fn apply(&self, cmd: &Command) -> String {
        match cmd {
            Command::Kill(how, None) => format!("ok {} {}", how_name(*how), self.kill_all(*how)),
            Command::Kill(how, Some(id)) => {
                if self.kill(*id, *how) {
                    format!("ok {} {id}", how_name(*how))
                } else {
                    format!("err no connection {id}")
                }
            }
            Command::Stall => {
                self.stall();
                "ok stalled".into()
            }
            Command::Resume => {
                self.resume();
                "ok resumed".into()
            }
            Command::Delay(d) => {
                self.set_delay(*d);
                format!("ok delay {}ms", d.as_millis())
            }
            Command::Refuse(on) => {
                self.refuse(*on);
                format!("ok refuse {}", if *on { "on" } else { "off" })
            }
            Command::Upstream(a) => {
                self.set_upstream(*a);
                format!("ok upstream {a}")
            }
            Command::List => {
                let conns = self.connections();
                let list: Vec<String> = conns
                    .iter()
                    .map(|c| format!("{}={}", c.id, c.client))
                    .collect();
                format!("ok {} {}", conns.len(), list.join(" "))
                    .trim_end()
                    .to_owned()
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.kill_all(Kill::Reset);
    }
}

fn how_name(how: Kill) -> &'static str {
    match how {
        Kill::Reset => "reset",
        Kill::Close => "close",
    }
}

/// A control command: `reset [ID]`, `close [ID]`, `stall`, `resume`, `delay MS`,
/// `refuse on|off`, `upstream HOST:PORT`, `list`. Without an ID, all connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Kill(Kill, Option<u64>),
    Stall,
    Resume,
    Delay(Duration),
    Refuse(bool),
    Upstream(SocketAddr),
    List,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "bad command {line:?}: {why} (commands: reset [ID], close [ID], stall, resume, delay MS, refuse on|off, upstream ADDR, list)"
)]
pub struct CommandError {
    line: String,
    why: &'static str,
}

impl FromStr for Command {
    type Err = CommandError;
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = |why| CommandError {
            line: line.to_owned(),
            why,
        };
        let mut words = line.split_whitespace();
        let verb = words.next().ok_or_else(|| bad("empty"))?;
        let arg = words.next();
        if words.next().is_some() {
            return Err(bad("too many arguments"));
        }
        let id = |a: Option<&str>| {
            a.map(|s| s.parse::<u64>().map_err(|_| bad("ID must be a number")))
                .transpose()
        };
        match (verb, arg) {
            ("reset", a) => Ok(Self::Kill(Kill::Reset, id(a)?)),
            ("close", a) => Ok(Self::Kill(Kill::Close, id(a)?)),
            ("stall", None) => Ok(Self::Stall),
            ("resume", None) => Ok(Self::Resume),
            ("delay", Some(ms)) => ms
                .parse()
                .map(|ms| Self::Delay(Duration::from_millis(ms)))
                .map_err(|_| bad("MS must be a number")),
            ("refuse", Some("on")) => Ok(Self::Refuse(true)),
            ("refuse", Some("off")) => Ok(Self::Refuse(false)),
            ("upstream", Some(a)) => a
                .parse()
                .map(Self::Upstream)
                .map_err(|_| bad("ADDR must be IP:PORT")),
            ("list", None) => Ok(Self::List),
            _ => Err(bad("unknown command or wrong arguments")),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kill(how, None) => f.write_str(how_name(*how)),
            Self::Kill(how, Some(id)) => write!(f, "{} {id}", how_name(*how)),
            Self::Stall => f.write_str("stall"),
            Self::Resume => f.write_str("resume"),
            Self::Delay(d) => write!(f, "delay {}", d.as_millis()),
            Self::Refuse(on) => write!(f, "refuse {}", if *on { "on" } else { "off" }),
            Self::Upstream(a) => write!(f, "upstream {a}"),
            Self::List => f.write_str("list"),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: back off briefly rather than spin.
                tracing::warn!(error = %e, "fault proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.refuse.load(Ordering::Acquire) {
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        tokio::spawn(serve(client, peer, shared.clone()));
    }
}

async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let upstream_addr = shared.upstream();
    let upstream = match TcpStream::connect(upstream_addr).await {
        Ok(s) => s,
        Err(_) => {
            // Upstream down: the client sees a reset, like a server host with no listener.
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
    shared.conns().insert(
        id,
        ConnCtl {
            info: ConnInfo {
                id,
                client: peer,
                upstream: upstream_addr,
            },
            kill: kill_tx,
        },
    );
    shared.changed.notify_waiters();

    let client = Arc::new(client);
    let upstream = Arc::new(upstream);
    let mut up = tokio::spawn(pump(
        client.clone(),
        upstream.clone(),
        shared.mode.subscribe(),
    ));
    let mut down = tokio::spawn(pump(
        upstream.clone(),
        client.clone(),
        shared.mode.subscribe(),
    ));
    let how = tokio::select! {
        k = kill_rx.recv() => k.unwrap_or(Kill::Reset),
        _ = &mut up => Kill::Close,
        _ = &mut down => Kill::Close,
    };
    // Queued bytes die with the pumps: a killed connection never delivers late.
    for pump in [&mut up, &mut down] {
        if !pump.is_finished() {
            pump.abort();
            let _ = pump.await;
        }
    }
    if how == Kill::Reset {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    shared.conns().remove(&id);
    shared.changed.notify_waiters();
}

/// Forwards `from` → `to` under the current mode. Ends at EOF (after forwarding what was
/// read) or on any error.
async fn pump(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let reader = async move {
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = read_some(&from, &mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            buf.truncate(n);
            if tx.send((Instant::now(), buf)).await.is_err() {
                return Ok(());
            }
        }
    };
    let writer = async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            loop {
                let m = *mode.borrow_and_update();
                if m.stalled {
                    if mode.changed().await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                let due = arrived + m.delay;
                if Instant::now() < due {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = mode.changed() => continue,
                    }
                }
                break;
            }
            write_all(&to, &chunk).await?;
        }
        Ok::<(), io::Error>(())
    };
    let (r, w) = tokio::join!(reader, writer);
    r.and(w)
}

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        s.writable().await?;
        match s.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for line in [
            "reset",
            "reset 3",
            "close",
            "close 0",
            "stall",
            "resume",
            "delay 250",
            "refuse on",
            "refuse off",
            "upstream 127.0.0.1:10809",
            "list",
        ] {
            let c: Command = line.parse().expect(line);
            assert_eq!(c.to_string(), line);
        }
        for bad in [
            "",
            "reset x",
            "delay",
            "refuse maybe",
            "upstream nowhere",
            "stall 1",
            "explode",
        ] {
            assert!(bad.parse::<Command>().is_err(), "{bad:?} accepted");
        }
    }
}
