//! Support for tests and fuzzing: an [`ExportProvider`] over in-memory backends, and a driver
//! that feeds raw client bytes through a whole session without sockets.
//!
//! Invariant: [`run_session_on_bytes`] always terminates: the client side is closed after the
//! input, so the session ends at EOF (or earlier on a protocol error).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::export::{Backend, Export, ExportEntry, ExportProvider, MemoryBackend, OpenError};
use crate::metrics::Metrics;
use crate::session::{self, IoEngine, SessionConfig};

/// Named in-memory exports: `(backend, size, read_only)`.
#[derive(Default)]
pub struct MemoryProvider {
    exports: BTreeMap<String, (Arc<MemoryBackend>, u64, bool)>,
}

impl MemoryProvider {
    pub fn with_export(mut self, name: &str, size: u64, read_only: bool) -> Self {
        self.exports.insert(
            name.to_owned(),
            (Arc::new(MemoryBackend::new(read_only)), size, read_only),
        );
        self
    }
}

impl ExportProvider for MemoryProvider {
    fn list(&self) -> Vec<ExportEntry> {
        self.exports
            .keys()
            .map(|n| ExportEntry {
                name: n.clone(),
                description: format!("memory {n}"),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Export, OpenError> {
        let (backend, size, read_only) = self
            .exports
            .get(name)
            .ok_or_else(|| OpenError::NotFound(name.to_owned()))?;
        Ok(Export {
            name: name.to_owned(),
            size: *size,
            read_only: *read_only,
            backend: backend.clone() as Arc<dyn Backend>,
            closed: CancellationToken::new(),
            lease: None,
        })
    }
}

/// Runs one session on a current-thread runtime: `input` is everything the client sends,
/// then the client closes its side. Returns what the server sent.
pub fn run_session_on_bytes(
    runtime: &tokio::runtime::Runtime,
    input: &[u8],
    max_request_bytes: u32,
) -> Vec<u8> {
    let provider: Arc<dyn ExportProvider> = Arc::new(
        MemoryProvider::default()
            .with_export("demo", 1 << 20, false)
            .with_export("ro", 64 << 10, true),
    );
    let cfg = Arc::new(SessionConfig {
        max_request_bytes,
        io: IoEngine::Blocking,
        metrics: Arc::new(Metrics::default()),
        budget: Arc::new(session::budget::GlobalBudget::new(
            session::budget::DEFAULT_GLOBAL_BYTES,
        )),
        handshake_timeout: session::HANDSHAKE_TIMEOUT,
        tls: None,
        grants: None,
    });
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let session = tokio::spawn(session::serve(
            server,
            provider,
            cfg,
            CancellationToken::new(),
        ));
        let (mut crd, mut cwr) = tokio::io::split(client);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            // The server may stop reading early (protocol error): that is fine.
            let _ = cwr.write_all(&input).await;
            let _ = cwr.shutdown().await;
        });
        let mut out = Vec::new();
        let _ = crd.read_to_end(&mut out).await;
        let _ = writer.await;
        let _ = session.await;
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn go(name: &str) -> Vec<u8> {
        let mut b = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
        b.extend(0x4948_4156_454f_5054u64.to_be_bytes());
        b.extend(7u32.to_be_bytes());
        b.extend((4 + name.len() as u32 + 2).to_be_bytes());
        b.extend((name.len() as u32).to_be_bytes());
        b.extend(name.as_bytes());
        b.extend(0u16.to_be_bytes());
        b
    }

    #[test]
    fn writes_and_read_only_reads_are_answered() {
        let mut input = go("demo");
        let req = |cmd: u16, cookie: u64, off: u64, len: u32| {
            let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
            r.extend(0u16.to_be_bytes());
            r.extend(cmd.to_be_bytes());
            r.extend(cookie.to_be_bytes());
            r.extend(off.to_be_bytes());
            r.extend(len.to_be_bytes());
            r
        };
        input.extend(req(1, 1, 100, 3));
        input.extend(b"abc");
        // Not pipelined behind the write: a READ could otherwise overtake it.
        let out1 = run_session_on_bytes(&rt(), &input, 1 << 20);
        assert!(
            out1.ends_with(&[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            "{out1:x?}"
        );
        let mut input = go("ro");
        input.extend(req(0, 9, 0, 4));
        let out = run_session_on_bytes(&rt(), &input, 1 << 20);
        assert!(out.ends_with(&[0, 0, 0, 9, 0, 0, 0, 0]), "{out:x?}");
    }

    #[test]
    fn extended_headers_carry_writes_and_reads() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(0x4948_4156_454f_5054u64.to_be_bytes());
        input.extend(11u32.to_be_bytes()); // NBD_OPT_EXTENDED_HEADERS
        input.extend(0u32.to_be_bytes());
        input.extend(&go("demo")[4..]);
        let ext = |flags: u16, cmd: u16, cookie: u64, off: u64, len: u64| {
            let mut r = 0x21e4_1c71u32.to_be_bytes().to_vec();
            r.extend(flags.to_be_bytes());
            r.extend(cmd.to_be_bytes());
            r.extend(cookie.to_be_bytes());
            r.extend(off.to_be_bytes());
            r.extend(len.to_be_bytes());
            r
        };
        input.extend(ext(1 << 5, 1, 5, 512, 4)); // WRITE with PAYLOAD_LEN
        input.extend(b"wxyz");
        input.extend(ext(0, 1, 6, 512, 4)); // WRITE without it: refused, no payload follows
        let out = run_session_on_bytes(&rt(), &input, 1 << 20);
        // Two extended replies (32-byte headers, magic 0x6e8a278c): NONE for cookie 5, an
        // ERROR chunk for cookie 6.
        let magic = 0x6e8a_278cu32.to_be_bytes();
        let replies: Vec<usize> = out
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == magic)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(replies.len(), 2, "{out:x?}");
        let cookies: Vec<u64> = replies
            .iter()
            .map(|&i| u64::from_be_bytes(out[i + 8..i + 16].try_into().unwrap()))
            .collect();
        assert!(cookies.contains(&5) && cookies.contains(&6), "{cookies:?}");
        for &i in &replies {
            let ty = u16::from_be_bytes([out[i + 6], out[i + 7]]);
            let cookie = u64::from_be_bytes(out[i + 8..i + 16].try_into().unwrap());
            assert_eq!(
                ty == 0,
                cookie == 5,
                "cookie {cookie} got chunk type {ty:#x}"
            );
        }
    }

    #[test]
    fn garbage_ends_the_session_without_panicking() {
        let rt = rt();
        for input in [
            &b""[..],
            b"\x00\x00\x00\x03garbage",
            &[0xff; 64],
            &go("nope"),
        ] {
            run_session_on_bytes(&rt, input, 1 << 20);
        }
    }
}
