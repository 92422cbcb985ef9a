//! Interoperability of the wire codec with independent NBD implementations on this machine.
//! Client side: the codec drives whole sessions against `nbdkit` (its `memory` plugin, served
//! over a socketpair with `-s`) and `qemu-nbd` (on a unix socket), so every client-side decoder
//! meets two real servers' bytes. Server side: a minimal in-test server built only from the
//! codec's server-side encoders answers libnbd's `nbdinfo` and `nbdcopy` on 127.0.0.1 (port 0),
//! so libnbd's strict parser checks our option replies and structured chunks. The tools are
//! required: a missing one fails the test (`e2e/setup-host.sh` installs them).

// A failed expectation is a failed test: panicking with context is the point here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use enbd_proto::wire::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command as Process, Stdio};

const MAX: u32 = 1 << 16;
const MAX_PAYLOAD: u64 = 1 << 25;
const MIB: u64 = 1 << 20;

/// One end of an NBD connection plus the bytes received but not yet decoded.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads until `decode` yields a value, then drops exactly the bytes it consumed.
    fn recv<T>(&mut self, decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>) -> T {
        loop {
            if let Some((value, used)) = decode(&self.buf).expect("peer sent malformed bytes") {
                self.buf.drain(..used);
                return value;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "peer closed the connection mid-message");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads exactly `len` raw bytes (payload after a header).
    fn recv_raw(&mut self, len: usize) -> Vec<u8> {
        while self.buf.len() < len {
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "peer closed the connection mid-payload");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..len).collect()
    }

    fn option(&mut self, request: OptionRequest) -> Vec<OptionReplyBody> {
        let code = request.code();
        let mut out = Vec::new();
        request.encode(&mut out).expect("encode option");
        self.send(&out);
        let mut replies = Vec::new();
        loop {
            let reply = self.recv(|b| OptionReply::decode(b, MAX));
            assert_eq!(reply.option, code, "reply names the option it answers");
            let last = matches!(
                reply.body,
                OptionReplyBody::Ack | OptionReplyBody::Error { .. }
            );
            replies.push(reply.body);
            if last {
                return replies;
            }
        }
    }

    fn request(&mut self, request: Request, payload: &[u8]) {
        let mut out = Vec::new();
        request
            .encode(HeaderStyle::Compact, &mut out)
            .expect("encode request");
        out.extend_from_slice(payload);
        self.send(&out);
    }

    /// Collects the chunks of one structured reply (up to the DONE flag), or one simple reply.
    fn reply(&mut self, cookie: Cookie) -> Vec<ChunkBody> {
        match self.recv(|b| ReplyHeader::decode(b, HeaderStyle::Compact, MAX_PAYLOAD)) {
            ReplyHeader::Simple(reply) => {
                assert_eq!(reply.cookie, cookie);
                match reply.error {
                    None => vec![],
                    Some(error) => vec![ChunkBody::Error {
                        error,
                        message: String::new(),
                    }],
                }
            }
            ReplyHeader::Chunk(first) => {
                let mut header = first;
                let mut chunks = Vec::new();
                loop {
                    assert_eq!(header.cookie, cookie);
                    let payload = self.recv_raw(header.length as usize);
                    chunks.push(
                        ChunkBody::decode(header.chunk_type, &payload).expect("chunk payload"),
                    );
                    if header.flags.contains(ReplyFlags::DONE) {
                        return chunks;
                    }
                    header =
                        self.recv(|b| ChunkHeader::decode(b, HeaderStyle::Compact, MAX_PAYLOAD));
                }
            }
        }
    }
}

fn nbdkit_memory() -> (Child, Conn<UnixStream>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let stdin = OwnedFd::from(theirs.try_clone().expect("dup"));
    let child = Process::new("nbdkit")
        .args(["-s", "--exit-with-parent", "memory", "size=1M"])
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(OwnedFd::from(theirs)))
        .spawn()
        .expect("nbdkit must be installed (e2e/setup-host.sh installs it)");
    (child, Conn::new(ours))
}

fn handshake(conn: &mut Conn<UnixStream>, client: ClientFlags) -> Greeting {
    let greeting = conn.recv(Greeting::decode);
    assert!(greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE));
    let mut out = Vec::new();
    client.encode(&mut out);
    conn.send(&out);
    greeting
}

fn req(command: Command, flags: CommandFlags, cookie: u64, offset: u64, length: u64) -> Request {
    Request {
        flags,
        command,
        cookie: Cookie(cookie),
        offset,
        length,
    }
}

#[test]
fn client_side_against_nbdkit_with_structured_replies() {
    let (mut child, mut conn) = nbdkit_memory();
    let greeting = handshake(
        &mut conn,
        ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES,
    );
    assert!(greeting.flags.contains(HandshakeFlags::NO_ZEROES));

    let list = conn.option(OptionRequest::List);
    assert!(
        matches!(list.first(), Some(OptionReplyBody::Server { .. })),
        "{list:?}"
    );
    assert_eq!(list.last(), Some(&OptionReplyBody::Ack));

    let unknown = conn.option(OptionRequest::Unknown {
        option: 0x1234,
        data: vec![1, 2, 3],
    });
    assert!(
        matches!(
            unknown[..],
            [OptionReplyBody::Error {
                error: OptionError::Unsupported,
                ..
            }]
        ),
        "{unknown:?}"
    );

    assert_eq!(
        conn.option(OptionRequest::StructuredReply),
        vec![OptionReplyBody::Ack]
    );

    let contexts = conn.option(OptionRequest::ListMetaContext(MetaContextRequest {
        export: String::new(),
        queries: vec!["base:".into()],
    }));
    assert!(
        contexts.iter().any(
            |r| matches!(r, OptionReplyBody::MetaContext { name, .. } if name == BASE_ALLOCATION)
        ),
        "{contexts:?}"
    );

    let selected = conn.option(OptionRequest::SetMetaContext(MetaContextRequest {
        export: String::new(),
        queries: vec![BASE_ALLOCATION.into()],
    }));
    let context_id = match &selected[..] {
        [
            OptionReplyBody::MetaContext { id, name },
            OptionReplyBody::Ack,
        ] if name == BASE_ALLOCATION => *id,
        other => panic!("unexpected SET_META_CONTEXT replies {other:?}"),
    };

    let info = conn.option(OptionRequest::Info(InfoRequest {
        export: String::new(),
        requests: vec![InfoType::BlockSize, InfoType::Name, InfoType::Description],
    }));
    assert_eq!(info.last(), Some(&OptionReplyBody::Ack));
    let export = info
        .iter()
        .find_map(|r| match r {
            OptionReplyBody::Info(InfoReply::Export(export)) => Some(*export),
            _ => None,
        })
        .expect("NBD_INFO_EXPORT before ACK");
    assert_eq!(export.size, MIB);

    let go = conn.option(OptionRequest::Go(InfoRequest {
        export: String::new(),
        requests: vec![InfoType::BlockSize],
    }));
    assert_eq!(go.last(), Some(&OptionReplyBody::Ack), "{go:?}");
    let flags = go
        .iter()
        .find_map(|r| match r {
            OptionReplyBody::Info(InfoReply::Export(export)) => Some(export.flags),
            _ => None,
        })
        .expect("NBD_INFO_EXPORT");
    for needed in [
        TransmissionFlags::SEND_FLUSH,
        TransmissionFlags::SEND_FUA,
        TransmissionFlags::SEND_TRIM,
        TransmissionFlags::SEND_WRITE_ZEROES,
        TransmissionFlags::SEND_DF,
    ] {
        assert!(
            flags.contains(needed),
            "nbdkit memory should offer {needed:?}, got {flags:?}"
        );
    }

    // Write a pattern at 64 KiB, durable at once.
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    conn.request(
        req(Command::Write, CommandFlags::FUA, 1, 64 * 1024, 4096),
        &pattern,
    );
    assert_eq!(conn.reply(Cookie(1)), vec![]);

    // Read it back with a window around it; reassemble data and hole chunks.
    let (base, len) = (60 * 1024u64, 12 * 1024usize);
    conn.request(
        req(Command::Read, CommandFlags::empty(), 2, base, len as u64),
        &[],
    );
    let mut image = vec![0xffu8; len];
    let mut covered = 0;
    for chunk in conn.reply(Cookie(2)) {
        match chunk {
            ChunkBody::OffsetData { offset, data } => {
                let at = (offset - base) as usize;
                image[at..at + data.len()].copy_from_slice(&data);
                covered += data.len();
            }
            ChunkBody::OffsetHole { offset, length } => {
                let at = (offset - base) as usize;
                image[at..at + length as usize].fill(0);
                covered += length as usize;
            }
            ChunkBody::None => {}
            other => panic!("unexpected read chunk {other:?}"),
        }
    }
    assert_eq!(covered, len, "read chunks cover the request");
    assert!(image[..4096].iter().all(|&b| b == 0));
    assert_eq!(&image[4096..8192], &pattern[..]);
    assert!(image[8192..].iter().all(|&b| b == 0));

    // Block status over the whole export: one chunk for our context, extents summing past 0.
    conn.request(
        req(Command::BlockStatus, CommandFlags::empty(), 3, 0, MIB),
        &[],
    );
    let status = conn.reply(Cookie(3));
    let extents = status
        .iter()
        .find_map(|c| match c {
            ChunkBody::BlockStatus {
                context_id: id,
                extents,
            } if *id == context_id => Some(extents.clone()),
            _ => None,
        })
        .expect("BLOCK_STATUS chunk for the selected context");
    let mut at = 0u64;
    let mut written_is_data = false;
    for extent in &extents {
        let end = at + u64::from(extent.length);
        if (at..end).contains(&(64 * 1024)) {
            written_is_data =
                extent.flags & NBD_STATE_HOLE == 0 && extent.flags & NBD_STATE_ZERO == 0;
        }
        at = end;
    }
    assert!(
        at > 64 * 1024,
        "extents reach the written block: {extents:?}"
    );
    assert!(
        written_is_data,
        "written block reported as data: {extents:?}"
    );

    // One request with REQ_ONE gets exactly one extent.
    conn.request(
        req(Command::BlockStatus, CommandFlags::REQ_ONE, 4, 0, MIB),
        &[],
    );
    let one = conn.reply(Cookie(4));
    assert!(
        one.iter()
            .any(|c| matches!(c, ChunkBody::BlockStatus { extents, .. } if extents.len() == 1)),
        "{one:?}"
    );

    // TRIM, WRITE_ZEROES (NO_HOLE), FLUSH succeed; the zeroed pattern reads back as zeroes.
    conn.request(req(Command::Trim, CommandFlags::empty(), 5, 0, 4096), &[]);
    assert_eq!(conn.reply(Cookie(5)), vec![]);
    conn.request(
        req(
            Command::WriteZeroes,
            CommandFlags::NO_HOLE,
            6,
            64 * 1024,
            4096,
        ),
        &[],
    );
    assert_eq!(conn.reply(Cookie(6)), vec![]);
    conn.request(req(Command::Flush, CommandFlags::empty(), 7, 0, 0), &[]);
    assert_eq!(conn.reply(Cookie(7)), vec![]);
    conn.request(
        req(Command::Read, CommandFlags::DF, 8, 64 * 1024, 4096),
        &[],
    );
    let zeroed = conn.reply(Cookie(8));
    let content: Vec<&ChunkBody> = zeroed.iter().filter(|c| **c != ChunkBody::None).collect();
    assert_eq!(
        content.len(),
        1,
        "DF read gives one content chunk: {zeroed:?}"
    );
    match content[0] {
        ChunkBody::OffsetData { data, .. } => assert!(data.iter().all(|&b| b == 0)),
        ChunkBody::OffsetHole { length, .. } => assert_eq!(*length, 4096),
        other => panic!("unexpected {other:?}"),
    }

    // A read past the end is an error the codec reports with its errno.
    conn.request(req(Command::Read, CommandFlags::empty(), 9, MIB, 512), &[]);
    let past_end = conn.reply(Cookie(9));
    assert!(
        past_end.iter().any(|c| matches!(
            c,
            ChunkBody::Error {
                error: NbdError::Inval,
                ..
            }
        )),
        "{past_end:?}"
    );

    conn.request(req(Command::Disc, CommandFlags::empty(), 10, 0, 0), &[]);
    assert!(child.wait().expect("wait for nbdkit").success());
}

#[test]
fn client_side_against_nbdkit_with_export_name_and_simple_replies() {
    for no_zeroes in [true, false] {
        let (mut child, mut conn) = nbdkit_memory();
        let client = if no_zeroes {
            ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES
        } else {
            ClientFlags::FIXED_NEWSTYLE
        };
        handshake(&mut conn, client);
        let mut out = Vec::new();
        OptionRequest::ExportName(String::new())
            .encode(&mut out)
            .expect("encode");
        conn.send(&out);
        let export = conn.recv(|b| ExportInfo::decode_export_name_reply(b, no_zeroes));
        assert_eq!(export.size, MIB);
        assert!(export.flags.contains(TransmissionFlags::HAS_FLAGS));

        let data = vec![0x5au8; 1024];
        conn.request(
            req(Command::Write, CommandFlags::empty(), 11, 2048, 1024),
            &data,
        );
        let written = conn.recv(SimpleReply::decode);
        assert_eq!(
            written,
            SimpleReply {
                error: None,
                cookie: Cookie(11)
            }
        );

        conn.request(
            req(Command::Read, CommandFlags::empty(), 12, 2048, 1024),
            &[],
        );
        let read = conn.recv(SimpleReply::decode);
        assert_eq!(
            read,
            SimpleReply {
                error: None,
                cookie: Cookie(12)
            }
        );
        assert_eq!(conn.recv_raw(1024), data);

        conn.request(
            req(Command::Read, CommandFlags::empty(), 13, MIB - 512, 1024),
            &[],
        );
        let failed = conn.recv(SimpleReply::decode);
        assert_eq!(failed.cookie, Cookie(13));
        assert!(failed.error.is_some(), "read past the end must fail");

        conn.request(req(Command::Disc, CommandFlags::empty(), 14, 0, 0), &[]);
        assert!(child.wait().expect("wait for nbdkit").success());
        assert!(conn.buf.is_empty(), "no stray bytes after the last reply");
    }
}

/// A qemu-nbd serving a 1 MiB raw file on a unix socket; killed and cleaned up on drop.
struct QemuNbd {
    dir: std::path::PathBuf,
    pid: Option<i32>,
}

impl QemuNbd {
    fn start() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("enbd-wire-qemu-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut guard = Self { dir, pid: None };
        let image = guard.dir.join("disk.raw");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(MIB))
            .expect("image");
        // --fork returns once the socket accepts connections, so no polling is needed.
        let status = Process::new("qemu-nbd")
            .args(["--fork", "--format=raw", "--export-name=disk", "--shared=1"])
            .arg(format!("--socket={}", guard.socket().display()))
            .arg(format!("--pid-file={}", guard.dir.join("pid").display()))
            .arg(&image)
            .status()
            .expect("qemu-nbd must be installed (e2e/setup-host.sh installs qemu-utils)");
        assert!(status.success(), "qemu-nbd failed to start");
        let pid = std::fs::read_to_string(guard.dir.join("pid")).expect("pid file");
        guard.pid = Some(pid.trim().parse().expect("pid"));
        guard
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.join("nbd.sock")
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // qemu-nbd exits by itself after its one client; this only covers a failed test, and
        // checks the pid still names our qemu-nbd before signalling it.
        if let Some(pid) = self.pid {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if std::thread::panicking() && comm.trim() == "qemu-nbd" {
                let _ = Process::new("kill")
                    .arg(pid.to_string())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn client_side_against_qemu_nbd() {
    let server = QemuNbd::start();
    let mut conn = Conn::new(UnixStream::connect(server.socket()).expect("connect to qemu-nbd"));
    handshake(
        &mut conn,
        ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES,
    );

    assert_eq!(
        conn.option(OptionRequest::StructuredReply),
        vec![OptionReplyBody::Ack]
    );
    let selected = conn.option(OptionRequest::SetMetaContext(MetaContextRequest {
        export: "disk".into(),
        queries: vec![BASE_ALLOCATION.into()],
    }));
    let context_id = match &selected[..] {
        [
            OptionReplyBody::MetaContext { id, name },
            OptionReplyBody::Ack,
        ] if name == BASE_ALLOCATION => *id,
        other => panic!("unexpected SET_META_CONTEXT replies {other:?}"),
    };
    let missing = conn.option(OptionRequest::Go(InfoRequest {
        export: "nope".into(),
        requests: vec![],
    }));
    assert!(
        matches!(
            missing[..],
            [OptionReplyBody::Error {
                error: OptionError::UnknownExport,
                ..
            }]
        ),
        "{missing:?}"
    );
    let go = conn.option(OptionRequest::Go(InfoRequest {
        export: "disk".into(),
        requests: vec![InfoType::BlockSize, InfoType::Name, InfoType::Description],
    }));
    assert_eq!(go.last(), Some(&OptionReplyBody::Ack), "{go:?}");
    let mut export = None;
    let mut sizes = None;
    for reply in &go {
        match reply {
            OptionReplyBody::Info(InfoReply::Export(info)) => export = Some(*info),
            OptionReplyBody::Info(InfoReply::BlockSize(block)) => sizes = Some(*block),
            _ => {}
        }
    }
    let export = export.expect("NBD_INFO_EXPORT");
    assert_eq!(export.size, MIB);
    assert!(
        export
            .flags
            .contains(TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_WRITE_ZEROES)
    );
    sizes
        .expect("qemu-nbd answers NBD_INFO_BLOCK_SIZE")
        .validate()
        .expect("sane block sizes");

    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    conn.request(
        req(Command::Write, CommandFlags::FUA, 1, 128 * 1024, 8192),
        &pattern,
    );
    assert_eq!(conn.reply(Cookie(1)), vec![]);

    conn.request(
        req(Command::Read, CommandFlags::empty(), 2, 128 * 1024, 8192),
        &[],
    );
    let mut image = vec![0xffu8; 8192];
    for chunk in conn.reply(Cookie(2)) {
        match chunk {
            ChunkBody::OffsetData { offset, data } => {
                let at = (offset - 128 * 1024) as usize;
                image[at..at + data.len()].copy_from_slice(&data);
            }
            ChunkBody::None => {}
            other => panic!("unexpected read chunk {other:?}"),
        }
    }
    assert_eq!(image, pattern);

    conn.request(
        req(
            Command::BlockStatus,
            CommandFlags::REQ_ONE,
            3,
            128 * 1024,
            4096,
        ),
        &[],
    );
    let status = conn.reply(Cookie(3));
    assert!(
        status.iter().any(
            |c| matches!(c, ChunkBody::BlockStatus { context_id: id, extents }
            if *id == context_id && extents.len() == 1 && extents[0].length <= 4096
                && extents[0].flags & NBD_STATE_HOLE == 0)
        ),
        "{status:?}"
    );

    conn.request(req(Command::Flush, CommandFlags::empty(), 4, 0, 0), &[]);
    assert_eq!(conn.reply(Cookie(4)), vec![]);
    conn.request(req(Command::Disc, CommandFlags::empty(), 5, 0, 0), &[]);
}

// ---- Server side: a codec-only server answering libnbd ---------------------------------------

const EXPORT: &str = "disk";
const EXPORT_SIZE: u64 = MIB;
/// The first 64 KiB hold data, the rest is a hole.
const DATA_END: u64 = 64 * 1024;

fn byte_at(offset: u64) -> u8 {
    if offset < DATA_END {
        (offset % 251) as u8 + 1
    } else {
        0
    }
}

/// Serves one connection with nothing but the codec's server-side encoders.
fn serve(stream: TcpStream) {
    let mut conn = Conn::new(stream);
    let mut out = Vec::new();
    Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    }
    .encode(&mut out);
    conn.send(&out);
    let client = conn.recv(ClientFlags::decode);
    assert!(client.contains(ClientFlags::FIXED_NEWSTYLE));
    let flags =
        TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_DF;
    let mut structured = false;
    loop {
        let request = match conn.recv(|b| match OptionRequest::decode(b, MAX) {
            Err(WireError::MalformedOption {
                option, frame_len, ..
            }) => Ok(Some((Err(option), frame_len))),
            other => other.map(|v| v.map(|(request, used)| (Ok(request), used))),
        }) {
            Ok(request) => request,
            Err(option) => {
                send_replies(
                    &mut conn,
                    &[OptionReply::error(
                        option,
                        OptionError::Invalid,
                        "malformed",
                    )],
                );
                continue;
            }
        };
        let option = request.code();
        let info = |body| OptionReply {
            option,
            body: OptionReplyBody::Info(body),
        };
        let context = |id| OptionReply {
            option,
            body: OptionReplyBody::MetaContext {
                id,
                name: BASE_ALLOCATION.into(),
            },
        };
        match request {
            OptionRequest::Abort => {
                send_replies(&mut conn, &[OptionReply::ack(option)]);
                return;
            }
            OptionRequest::List => send_replies(
                &mut conn,
                &[
                    OptionReply {
                        option,
                        body: OptionReplyBody::Server {
                            name: EXPORT.into(),
                            details: "codec test".into(),
                        },
                    },
                    OptionReply::ack(option),
                ],
            ),
            OptionRequest::StructuredReply => {
                structured = true;
                send_replies(&mut conn, &[OptionReply::ack(option)]);
            }
            OptionRequest::ListMetaContext(_) => {
                send_replies(&mut conn, &[context(0), OptionReply::ack(option)])
            }
            OptionRequest::SetMetaContext(req) => {
                let mut replies = Vec::new();
                if req.queries.iter().any(|q| q == BASE_ALLOCATION) {
                    replies.push(context(1));
                }
                replies.push(OptionReply::ack(option));
                send_replies(&mut conn, &replies);
            }
            OptionRequest::Info(ref req) | OptionRequest::Go(ref req) => {
                if req.export != EXPORT {
                    send_replies(
                        &mut conn,
                        &[OptionReply::error(
                            option,
                            OptionError::UnknownExport,
                            "no such export",
                        )],
                    );
                    continue;
                }
                send_replies(
                    &mut conn,
                    &[
                        info(InfoReply::Export(ExportInfo {
                            size: EXPORT_SIZE,
                            flags,
                        })),
                        info(InfoReply::Name(EXPORT.into())),
                        info(InfoReply::Description("served by the codec test".into())),
                        info(InfoReply::BlockSize(BlockSizeInfo {
                            minimum: 1,
                            preferred: 4096,
                            maximum: 1 << 25,
                        })),
                        OptionReply::ack(option),
                    ],
                );
                if matches!(request, OptionRequest::Go(_)) {
                    break;
                }
            }
            _ => send_replies(
                &mut conn,
                &[OptionReply::error(
                    option,
                    OptionError::Unsupported,
                    "not here",
                )],
            ),
        }
    }
    assert!(structured, "libnbd negotiates structured replies");
    transmit(&mut conn);
}

fn send_replies(conn: &mut Conn<TcpStream>, replies: &[OptionReply]) {
    let mut out = Vec::new();
    for reply in replies {
        reply.encode(&mut out).expect("encode reply");
    }
    conn.send(&out);
}

fn transmit(conn: &mut Conn<TcpStream>) {
    loop {
        let request = conn.recv(|b| Request::decode(b, HeaderStyle::Compact, MAX_PAYLOAD));
        let chunk = |flags, body| ReplyChunk {
            flags,
            cookie: request.cookie,
            request_offset: 0,
            body,
        };
        let mut out = Vec::new();
        let end = request.offset.saturating_add(request.length);
        match request.command {
            Command::Disc => return,
            Command::Read if end <= EXPORT_SIZE => {
                // Data part as one OFFSET_DATA chunk, hole part as one OFFSET_HOLE chunk.
                let data_end = end.min(DATA_END).max(request.offset);
                let mut chunks = Vec::new();
                if data_end > request.offset {
                    let data: Vec<u8> = (request.offset..data_end).map(byte_at).collect();
                    chunks.push(ChunkBody::OffsetData {
                        offset: request.offset,
                        data: data.into(),
                    });
                }
                if end > data_end {
                    chunks.push(ChunkBody::OffsetHole {
                        offset: data_end,
                        length: (end - data_end) as u32,
                    });
                }
                let last = chunks.len() - 1;
                for (i, body) in chunks.into_iter().enumerate() {
                    let flags = if i == last {
                        ReplyFlags::DONE
                    } else {
                        ReplyFlags::empty()
                    };
                    chunk(flags, body)
                        .encode(HeaderStyle::Compact, &mut out)
                        .expect("encode chunk");
                }
            }
            Command::BlockStatus if end <= EXPORT_SIZE => {
                let mut extents = Vec::new();
                if request.offset < DATA_END {
                    extents.push(Extent {
                        length: (DATA_END - request.offset) as u32,
                        flags: 0,
                    });
                }
                let hole_start = request.offset.max(DATA_END);
                // With REQ_ONE the client wants exactly one extent.
                let room = extents.is_empty() || !request.flags.contains(CommandFlags::REQ_ONE);
                if hole_start < EXPORT_SIZE && room {
                    extents.push(Extent {
                        length: (EXPORT_SIZE - hole_start) as u32,
                        flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
                    });
                }
                chunk(
                    ReplyFlags::DONE,
                    ChunkBody::BlockStatus {
                        context_id: 1,
                        extents,
                    },
                )
                .encode(HeaderStyle::Compact, &mut out)
                .expect("encode chunk");
            }
            _ => {
                let message = format!(
                    "{:?} at {} is not served here",
                    request.command, request.offset
                );
                chunk(
                    ReplyFlags::DONE,
                    ChunkBody::Error {
                        error: NbdError::Inval,
                        message,
                    },
                )
                .encode(HeaderStyle::Compact, &mut out)
                .expect("encode chunk");
            }
        }
        conn.send(&out);
    }
}

/// Starts the codec server on 127.0.0.1:0 and returns its NBD URI.
fn start_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let stream = stream.expect("accept");
            std::thread::spawn(move || serve(stream));
        }
    });
    format!("nbd://127.0.0.1:{port}/{EXPORT}")
}

fn run(tool: &str, args: &[&str]) -> Vec<u8> {
    let output = Process::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} must be installed (e2e/setup-host.sh installs it): {e}")
    });
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

#[test]
fn server_side_answers_nbdinfo() {
    let uri = start_server();
    let info = String::from_utf8(run("nbdinfo", &["--json", &uri])).expect("utf-8");
    for needle in [
        "\"export-size\": 1048576",
        "\"export-name\": \"disk\"",
        "\"description\": \"served by the codec test\"",
        "\"is_read_only\": true",
        "\"can_df\": true",
        "\"block_size_preferred\": 4096",
        "\"base:allocation\"",
    ] {
        assert!(
            info.contains(needle),
            "nbdinfo output lacks {needle}:\n{info}"
        );
    }
    let map = String::from_utf8(run("nbdinfo", &["--map", &uri])).expect("utf-8");
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "two extents:\n{map}");
    assert_eq!(rows[0][..3], ["0", "65536", "0"], "{map}");
    assert_eq!(rows[1][..3], ["65536", "983040", "3"], "{map}");
    let list = String::from_utf8(run("nbdinfo", &["--list", "--json", &uri])).expect("utf-8");
    assert!(list.contains("\"export-name\": \"disk\""), "{list}");
}

#[test]
fn server_side_serves_nbdcopy() {
    let uri = start_server();
    let image = run("nbdcopy", &[&uri, "-"]);
    assert_eq!(image.len() as u64, EXPORT_SIZE);
    for (offset, byte) in image.iter().enumerate() {
        assert_eq!(*byte, byte_at(offset as u64), "byte {offset}");
    }
}
