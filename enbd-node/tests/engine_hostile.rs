//! The engine against a broken or hostile NBD server: a small fake server on 127.0.0.1
//! (written from the protocol document, independent of the codec) misbehaves in one way on
//! its first connection and serves properly on the next ones. The engine must refuse the
//! misbehaviour with a clear error — never panic, never buffer without bound — and, in the
//! transmission phase, reset the channel and re-issue the request on a good connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use enbd_node::engine::{Client, ClientConfig, EngineError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const CHUNK_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const ERR_UNSUP: u32 = 0x8000_0001;
const CHUNK_OFFSET_DATA: u16 = 1;
const FLAG_DONE: u16 = 1;
const SIZE: u64 = 1 << 20;
/// HAS_FLAGS | SEND_FLUSH.
const TX_FLAGS: u16 = 1 | 4;

/// What the fake server does wrong on its first connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Misbehave {
    /// Answers NBD_OPT_GO with NBD_REP_INFO forever, never an ACK.
    EndlessInfo,
    /// Answers NBD_OPT_GO with NBD_REP_SERVER replies forever.
    EndlessServerReplies,
    /// A simple reply whose cookie was never sent.
    UnknownCookieSimple,
    /// A structured chunk whose cookie was never sent.
    UnknownCookieChunk,
    /// An OFFSET_DATA chunk announcing more data than the READ asked for (only its header is
    /// sent: an engine that waited to buffer the payload would hang).
    OversizedChunk,
}

impl Misbehave {
    fn structured(self) -> bool {
        matches!(self, Self::UnknownCookieChunk | Self::OversizedChunk)
    }
}

fn option_reply(option: u32, ty: u32, data: &[u8]) -> Vec<u8> {
    let mut b = REP_MAGIC.to_be_bytes().to_vec();
    b.extend(option.to_be_bytes());
    b.extend(ty.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    b
}

fn info_export() -> Vec<u8> {
    let mut d = 0u16.to_be_bytes().to_vec();
    d.extend(SIZE.to_be_bytes());
    d.extend(TX_FLAGS.to_be_bytes());
    option_reply(OPT_GO, REP_INFO, &d)
}

/// The data the good connections serve: byte `i` of the export is `i % 251`.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

/// Serves one connection; `bad` says whether to misbehave on it.
async fn serve(mut s: TcpStream, how: Misbehave, bad: bool) -> std::io::Result<()> {
    let mut greeting = b"NBDMAGIC".to_vec();
    greeting.extend(IHAVEOPT.to_be_bytes());
    greeting.extend(3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&greeting).await?;
    let _client_flags = s.read_u32().await?;
    let mut structured = false;
    loop {
        assert_eq!(s.read_u64().await?, IHAVEOPT);
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_STRUCTURED_REPLY if bad && how.structured() => {
                structured = true;
                s.write_all(&option_reply(option, REP_ACK, &[])).await?;
            }
            OPT_STRUCTURED_REPLY => {
                s.write_all(&option_reply(option, ERR_UNSUP, &[])).await?;
            }
            OPT_GO if bad && how == Misbehave::EndlessInfo => loop {
                s.write_all(&info_export()).await?;
            },
            OPT_GO if bad && how == Misbehave::EndlessServerReplies => loop {
                let mut d = 4u32.to_be_bytes().to_vec();
                d.extend(b"disk");
                s.write_all(&option_reply(option, REP_SERVER, &d)).await?;
            },
            OPT_GO => {
                let mut out = info_export();
                out.extend(option_reply(option, REP_ACK, &[]));
                s.write_all(&out).await?;
                break;
            }
            other => panic!("the engine sent option {other}"),
        }
    }
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h).await?;
        let command = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        if command == 2 {
            return Ok(()); // DISC: the engine shuts down
        }
        assert_eq!(command, 0, "the tests only READ");
        let mut out = Vec::new();
        match how {
            _ if !bad => {
                out.extend(SIMPLE_MAGIC.to_be_bytes());
                out.extend(0u32.to_be_bytes());
                out.extend(cookie.to_be_bytes());
                out.extend(pattern(offset, len as usize));
            }
            Misbehave::UnknownCookieSimple => {
                out.extend(SIMPLE_MAGIC.to_be_bytes());
                out.extend(0u32.to_be_bytes());
                out.extend((cookie + 1000).to_be_bytes());
                out.extend(pattern(offset, len as usize));
            }
            Misbehave::UnknownCookieChunk | Misbehave::OversizedChunk => {
                assert!(structured);
                let (cookie, payload) = if how == Misbehave::UnknownCookieChunk {
                    (cookie + 1000, 8 + len)
                } else {
                    (cookie, 8 + len + 4096)
                };
                out.extend(CHUNK_MAGIC.to_be_bytes());
                out.extend(FLAG_DONE.to_be_bytes());
                out.extend(CHUNK_OFFSET_DATA.to_be_bytes());
                out.extend(cookie.to_be_bytes());
                out.extend(payload.to_be_bytes());
                out.extend(offset.to_be_bytes());
                if how == Misbehave::UnknownCookieChunk {
                    out.extend(pattern(offset, len as usize));
                }
            }
            Misbehave::EndlessInfo | Misbehave::EndlessServerReplies => unreachable!(),
        }
        s.write_all(&out).await?;
    }
}

/// Starts the fake server; the first connection misbehaves, the others serve. Returns its
/// address and the count of connections accepted.
async fn fake_server(how: Misbehave) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let bad = count.fetch_add(1, Ordering::SeqCst) == 0;
            // The engine closing on us mid-flood is what the tests want.
            tokio::spawn(async move {
                let _ = serve(s, how, bad).await;
            });
        }
    });
    (addr, accepted)
}

fn config(addr: SocketAddr) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr.to_string(), "disk");
    cfg.reconnect_min = Duration::from_millis(20);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg
}

async fn handshake_refused(how: Misbehave, want: &str) {
    let (addr, accepted) = fake_server(how).await;
    let err = match Client::connect(config(addr)).await {
        Ok(_) => panic!("{how:?}: the engine accepted the handshake"),
        Err(e) => e,
    };
    println!("{how:?}: {err}");
    assert!(
        matches!(err, EngineError::Handshake { .. }),
        "{how:?}: not a handshake error: {err:?}"
    );
    assert!(err.to_string().contains(want), "{how:?}: {err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refuses_endless_info_replies() {
    handshake_refused(Misbehave::EndlessInfo, "more than 64 replies").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_refuses_server_replies_to_go() {
    handshake_refused(
        Misbehave::EndlessServerReplies,
        "unexpected reply to NBD_OPT_GO",
    )
    .await;
}

/// The first connection's reply is refused, the channel resets, and the READ is re-issued
/// on the next (well-behaved) connection and returns the right data.
async fn reply_refused(how: Misbehave, want: &str) {
    let (addr, accepted) = fake_server(how).await;
    let client = Client::connect(config(addr)).await.expect("connect");
    let data = tokio::time::timeout(Duration::from_secs(10), client.read(8192, 4096))
        .await
        .unwrap_or_else(|_| panic!("{how:?}: the READ never completed"))
        .expect("read");
    assert_eq!(&data[..], &pattern(8192, 4096)[..], "{how:?}: wrong data");
    let st = client.status();
    let ch = &st.channels[0];
    println!(
        "{how:?}: last_error={:?} connects={}",
        ch.last_error, ch.connects
    );
    let err = ch
        .last_error
        .clone()
        .expect("the channel recorded why it reset");
    assert!(err.contains(want), "{how:?}: {err}");
    assert!(accepted.load(Ordering::SeqCst) >= 2, "no reconnect");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_resets_on_a_simple_reply_for_an_unknown_cookie() {
    reply_refused(Misbehave::UnknownCookieSimple, "reply for unknown cookie").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_resets_on_a_chunk_for_an_unknown_cookie() {
    reply_refused(Misbehave::UnknownCookieChunk, "chunk for unknown cookie").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_resets_on_a_chunk_bigger_than_its_request() {
    reply_refused(Misbehave::OversizedChunk, "more than its request allows").await;
}
