//! Golden-byte tests for the NBD wire codec: every expected byte string below is written out
//! field by field from the layouts in the NBD protocol document (doc/proto.md, and its
//! `extension-ext-header` branch for extended headers), not produced by the codec.
//! Each case checks the encoder's exact bytes, the decoder's value and consumed length, and
//! that every strict prefix of the message decodes as "need more bytes".

// A failed expectation is a failed test: panicking with context is the point here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use enbd_proto::wire::*;

/// Parses hex digits, ignoring whitespace and `_`, and `"..."` runs as ASCII text.
fn hex(spec: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut in_text = false;
    let mut nibble: Option<u8> = None;
    for c in spec.chars() {
        if c == '"' {
            in_text = !in_text;
            continue;
        }
        if in_text {
            out.push(c as u8);
            continue;
        }
        if c.is_whitespace() || c == '_' {
            continue;
        }
        let value = c
            .to_digit(16)
            .unwrap_or_else(|| panic!("bad hex digit {c:?}")) as u8;
        match nibble.take() {
            Some(high) => out.push(high << 4 | value),
            None => nibble = Some(value),
        }
    }
    assert!(nibble.is_none(), "odd number of hex digits");
    out
}

/// Asserts that `decode` returns `expected` with every byte consumed, needs more bytes for
/// every strict prefix, and leaves trailing bytes alone.
fn check_decode<T, F>(bytes: &[u8], expected: &T, decode: F)
where
    T: PartialEq + std::fmt::Debug,
    F: Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>,
{
    for cut in 0..bytes.len() {
        assert_eq!(
            decode(&bytes[..cut]),
            Ok(None),
            "prefix of {cut} bytes must need more input"
        );
    }
    let mut longer = bytes.to_vec();
    longer.extend_from_slice(&[0xee; 7]);
    for input in [bytes, &longer[..]] {
        let (value, used) = decode(input).expect("decode").expect("complete message");
        assert_eq!(&value, expected);
        assert_eq!(used, bytes.len());
    }
}

const COOKIE: Cookie = Cookie(0x0102_0304_0506_0708);
const MAX: u32 = 64 * 1024;
const MAX_PAYLOAD: u64 = 32 << 20;

// ---- Handshake -----------------------------------------------------------------------------

#[test]
fn greeting() {
    // S: "NBDMAGIC", "IHAVEOPT", 16 bits handshake flags (FIXED_NEWSTYLE | NO_ZEROES).
    let bytes = hex(r#" "NBDMAGIC" "IHAVEOPT" 0003 "#);
    assert_eq!(bytes[..16], hex("4e42444d41474943 49484156454F5054")[..]);
    let greeting = Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    };
    let mut out = Vec::new();
    greeting.encode(&mut out);
    assert_eq!(out, bytes);
    check_decode(&bytes, &greeting, Greeting::decode);
}

#[test]
fn client_flags() {
    // C: 32 bits client flags (C_FIXED_NEWSTYLE | C_NO_ZEROES).
    let bytes = hex("00000003");
    let flags = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
    let mut out = Vec::new();
    flags.encode(&mut out);
    assert_eq!(out, bytes);
    check_decode(&bytes, &flags, ClientFlags::decode);
}

fn check_option(request: OptionRequest, bytes: Vec<u8>) {
    let mut out = Vec::new();
    request.encode(&mut out).expect("encode option");
    assert_eq!(out, bytes, "{request:?}");
    check_decode(&bytes, &request, |b| OptionRequest::decode(b, MAX));
}

#[test]
fn option_export_name() {
    // C: "IHAVEOPT", 32 bits option (1), 32 bits length, name.
    check_option(
        OptionRequest::ExportName("disk".into()),
        hex(r#" "IHAVEOPT" 00000001 00000004 "disk" "#),
    );
    // The empty name selects the default export.
    check_option(
        OptionRequest::ExportName(String::new()),
        hex(r#" "IHAVEOPT" 00000001 00000000 "#),
    );
}

#[test]
fn options_without_data() {
    check_option(
        OptionRequest::Abort,
        hex(r#" "IHAVEOPT" 00000002 00000000 "#),
    );
    check_option(
        OptionRequest::List,
        hex(r#" "IHAVEOPT" 00000003 00000000 "#),
    );
    check_option(
        OptionRequest::StartTls,
        hex(r#" "IHAVEOPT" 00000005 00000000 "#),
    );
    check_option(
        OptionRequest::StructuredReply,
        hex(r#" "IHAVEOPT" 00000008 00000000 "#),
    );
    check_option(
        OptionRequest::ExtendedHeaders,
        hex(r#" "IHAVEOPT" 0000000b 00000000 "#),
    );
}

#[test]
fn option_go_and_info() {
    // Data: 32 bits name length, name, 16 bits number of requests, 16 bits each.
    let go = OptionRequest::Go(InfoRequest {
        export: "disk".into(),
        requests: vec![InfoType::BlockSize, InfoType::Name],
    });
    check_option(
        go,
        hex(r#" "IHAVEOPT" 00000007 0000000e  00000004 "disk" 0002 0003 0001 "#),
    );
    let info = OptionRequest::Info(InfoRequest {
        export: String::new(),
        requests: vec![],
    });
    check_option(
        info,
        hex(r#" "IHAVEOPT" 00000006 00000006  00000000 0000 "#),
    );
}

#[test]
fn option_meta_context() {
    // Data: 32 bits export name length, name, 32 bits number of queries, each 32 bits length + query.
    let set = OptionRequest::SetMetaContext(MetaContextRequest {
        export: "e".into(),
        queries: vec![BASE_ALLOCATION.into()],
    });
    check_option(
        set,
        hex(r#" "IHAVEOPT" 0000000a 0000001c  00000001 "e" 00000001 0000000f "base:allocation" "#),
    );
    let list = OptionRequest::ListMetaContext(MetaContextRequest {
        export: "e".into(),
        queries: vec![],
    });
    check_option(
        list,
        hex(r#" "IHAVEOPT" 00000009 00000009  00000001 "e" 00000000 "#),
    );
}

#[test]
fn option_unknown_is_kept() {
    // NBD_OPT_PEEK_EXPORT (4) was withdrawn: a server must answer NBD_REP_ERR_UNSUP.
    check_option(
        OptionRequest::Unknown {
            option: 4,
            data: vec![0xab],
        },
        hex(r#" "IHAVEOPT" 00000004 00000001 ab "#),
    );
}

fn check_reply(reply: OptionReply, bytes: Vec<u8>) {
    let mut out = Vec::new();
    reply.encode(&mut out).expect("encode option reply");
    assert_eq!(out, bytes, "{reply:?}");
    check_decode(&bytes, &reply, |b| OptionReply::decode(b, MAX));
}

// S: 64 bits 0x3e889045565a9, 32 bits option, 32 bits reply type, 32 bits length, data.
const REP: &str = "0003e889045565a9";

#[test]
fn option_reply_ack() {
    check_reply(
        OptionReply::ack(OptionCode::Go),
        hex(&format!("{REP} 00000007 00000001 00000000")),
    );
}

#[test]
fn option_reply_server() {
    let reply = OptionReply {
        option: OptionCode::List,
        body: OptionReplyBody::Server {
            name: "disk".into(),
            details: String::new(),
        },
    };
    check_reply(
        reply,
        hex(&format!(
            r#"{REP} 00000003 00000002 00000008 00000004 "disk" "#
        )),
    );
    let described = OptionReply {
        option: OptionCode::List,
        body: OptionReplyBody::Server {
            name: "a".into(),
            details: "db".into(),
        },
    };
    check_reply(
        described,
        hex(&format!(
            r#"{REP} 00000003 00000002 00000007 00000001 "a" "db" "#
        )),
    );
}

#[test]
fn option_reply_info_items() {
    // NBD_INFO_EXPORT: length 12 = 16 bits type 0, 64 bits size, 16 bits transmission flags.
    let flags =
        TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA;
    let export = OptionReply {
        option: OptionCode::Go,
        body: OptionReplyBody::Info(InfoReply::Export(ExportInfo {
            size: 1 << 30,
            flags,
        })),
    };
    check_reply(
        export,
        hex(&format!(
            "{REP} 00000007 00000003 0000000c 0000 0000000040000000 000d"
        )),
    );
    // NBD_INFO_NAME: type 1 + name.
    let name = OptionReply {
        option: OptionCode::Info,
        body: OptionReplyBody::Info(InfoReply::Name("vol".into())),
    };
    check_reply(
        name,
        hex(&format!(r#"{REP} 00000006 00000003 00000005 0001 "vol" "#)),
    );
    // NBD_INFO_DESCRIPTION: type 2 + text.
    let text = OptionReply {
        option: OptionCode::Info,
        body: OptionReplyBody::Info(InfoReply::Description("d".into())),
    };
    check_reply(
        text,
        hex(&format!(r#"{REP} 00000006 00000003 00000003 0002 "d" "#)),
    );
    // NBD_INFO_BLOCK_SIZE: length 14 = type 3, minimum, preferred, maximum.
    let sizes = BlockSizeInfo {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20,
    };
    let block = OptionReply {
        option: OptionCode::Go,
        body: OptionReplyBody::Info(InfoReply::BlockSize(sizes)),
    };
    check_reply(
        block,
        hex(&format!(
            "{REP} 00000007 00000003 0000000e 0003 00000001 00001000 02000000"
        )),
    );
}

#[test]
fn option_reply_meta_context() {
    // 32 bits context id, then the name.
    let reply = OptionReply {
        option: OptionCode::SetMetaContext,
        body: OptionReplyBody::MetaContext {
            id: 1,
            name: BASE_ALLOCATION.into(),
        },
    };
    check_reply(
        reply,
        hex(&format!(
            r#"{REP} 0000000a 00000004 00000013 00000001 "base:allocation" "#
        )),
    );
}

#[test]
fn option_reply_errors() {
    // Error types have bit 31 set; the data is an optional message.
    check_reply(
        OptionReply::error(OptionCode::Go, OptionError::UnknownExport, "no"),
        hex(&format!(r#"{REP} 00000007 80000006 00000002 "no" "#)),
    );
    check_reply(
        OptionReply::error(OptionCode::Unknown(4), OptionError::Unsupported, ""),
        hex(&format!("{REP} 00000004 80000001 00000000")),
    );
    for (error, code) in [
        (OptionError::Policy, "80000002"),
        (OptionError::Invalid, "80000003"),
        (OptionError::Platform, "80000004"),
        (OptionError::TlsRequired, "80000005"),
        (OptionError::Shutdown, "80000007"),
        (OptionError::BlockSizeRequired, "80000008"),
        (OptionError::TooBig, "80000009"),
        (OptionError::ExtendedHeadersRequired, "8000000a"),
    ] {
        check_reply(
            OptionReply::error(OptionCode::Go, error, ""),
            hex(&format!("{REP} 00000007 {code} 00000000")),
        );
    }
}

#[test]
fn export_name_reply() {
    // S: 64 bits size, 16 bits transmission flags, 124 bytes of zeroes unless NO_ZEROES.
    let info = ExportInfo {
        size: 0x10_0000,
        flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY,
    };
    let short = hex("0000000000100000 0003");
    let mut long = short.clone();
    long.extend_from_slice(&[0u8; 124]);
    for (no_zeroes, bytes) in [(true, short), (false, long)] {
        let mut out = Vec::new();
        info.encode_export_name_reply(no_zeroes, &mut out);
        assert_eq!(out, bytes);
        check_decode(&bytes, &info, |b| {
            ExportInfo::decode_export_name_reply(b, no_zeroes)
        });
    }
}

// ---- Transmission --------------------------------------------------------------------------

fn check_request(request: Request, style: HeaderStyle, bytes: Vec<u8>) {
    let mut out = Vec::new();
    request.encode(style, &mut out).expect("encode request");
    assert_eq!(out, bytes, "{request:?}");
    check_decode(&bytes, &request, |b| Request::decode(b, style, MAX_PAYLOAD));
}

#[test]
fn compact_requests() {
    // C: 0x25609513, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits offset, 32 bits length.
    let read = Request {
        flags: CommandFlags::empty(),
        command: Command::Read,
        cookie: COOKIE,
        offset: 0x1000,
        length: 0x200,
    };
    check_request(
        read,
        HeaderStyle::Compact,
        hex("25609513 0000 0000 0102030405060708 0000000000001000 00000200"),
    );
    let write = Request {
        flags: CommandFlags::FUA,
        command: Command::Write,
        cookie: COOKIE,
        offset: 0,
        length: 4096,
    };
    check_request(
        write,
        HeaderStyle::Compact,
        hex("25609513 0001 0001 0102030405060708 0000000000000000 00001000"),
    );
    assert_eq!(write.payload_len(HeaderStyle::Compact), 4096);
    assert_eq!(read.payload_len(HeaderStyle::Compact), 0);
    let disc = Request {
        flags: CommandFlags::empty(),
        command: Command::Disc,
        cookie: Cookie(0),
        offset: 0,
        length: 0,
    };
    check_request(
        disc,
        HeaderStyle::Compact,
        hex("25609513 0000 0002 0000000000000000 0000000000000000 00000000"),
    );
    let flush = Request {
        command: Command::Flush,
        ..disc
    };
    check_request(
        flush,
        HeaderStyle::Compact,
        hex("25609513 0000 0003 0000000000000000 0000000000000000 00000000"),
    );
    let trim = Request {
        command: Command::Trim,
        length: 1,
        ..disc
    };
    check_request(
        trim,
        HeaderStyle::Compact,
        hex("25609513 0000 0004 0000000000000000 0000000000000000 00000001"),
    );
    let cache = Request {
        command: Command::Cache,
        ..trim
    };
    check_request(
        cache,
        HeaderStyle::Compact,
        hex("25609513 0000 0005 0000000000000000 0000000000000000 00000001"),
    );
    let zeroes = Request {
        flags: CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
        command: Command::WriteZeroes,
        ..trim
    };
    check_request(
        zeroes,
        HeaderStyle::Compact,
        hex("25609513 0012 0006 0000000000000000 0000000000000000 00000001"),
    );
    let status = Request {
        flags: CommandFlags::REQ_ONE,
        command: Command::BlockStatus,
        ..trim
    };
    check_request(
        status,
        HeaderStyle::Compact,
        hex("25609513 0008 0007 0000000000000000 0000000000000000 00000001"),
    );
    let df_read = Request {
        flags: CommandFlags::DF,
        ..read
    };
    check_request(
        df_read,
        HeaderStyle::Compact,
        hex("25609513 0004 0000 0102030405060708 0000000000001000 00000200"),
    );
}

#[test]
fn extended_requests() {
    // C: 0x21e41c71, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits offset, 64 bits length.
    let zeroes = Request {
        flags: CommandFlags::NO_HOLE,
        command: Command::WriteZeroes,
        cookie: COOKIE,
        offset: 0x2_0000_0000,
        length: 1 << 33,
    };
    check_request(
        zeroes,
        HeaderStyle::Extended,
        hex("21e41c71 0002 0006 0102030405060708 0000000200000000 0000000200000000"),
    );
    assert_eq!(zeroes.payload_len(HeaderStyle::Extended), 0);
    // WRITE must carry PAYLOAD_LEN (bit 5) with extended headers.
    let write = Request {
        flags: CommandFlags::PAYLOAD_LEN,
        command: Command::Write,
        cookie: COOKIE,
        offset: 0,
        length: 512,
    };
    check_request(
        write,
        HeaderStyle::Extended,
        hex("21e41c71 0020 0001 0102030405060708 0000000000000000 0000000000000200"),
    );
    assert_eq!(write.payload_len(HeaderStyle::Extended), 512);
}

#[test]
fn block_status_payload() {
    // C: 64 bits effect length, n * 32 bits context ids.
    let payload = BlockStatusPayload {
        effect_length: 1 << 20,
        context_ids: vec![1, 7],
    };
    let bytes = hex("0000000000100000 00000001 00000007");
    let mut out = Vec::new();
    payload.encode(&mut out);
    assert_eq!(out, bytes);
    assert_eq!(payload.encoded_len(), bytes.len());
    assert_eq!(BlockStatusPayload::decode(&bytes), Ok(payload));
}

#[test]
fn simple_replies() {
    // S: 0x67446698, 32 bits error, 64 bits cookie.
    for (error, bytes) in [
        (None, hex("67446698 00000000 0102030405060708")),
        (
            Some(NbdError::Perm),
            hex("67446698 00000001 0102030405060708"),
        ),
        (
            Some(NbdError::Io),
            hex("67446698 00000005 0102030405060708"),
        ),
        (
            Some(NbdError::NoMem),
            hex("67446698 0000000c 0102030405060708"),
        ),
        (
            Some(NbdError::Inval),
            hex("67446698 00000016 0102030405060708"),
        ),
        (
            Some(NbdError::NoSpc),
            hex("67446698 0000001c 0102030405060708"),
        ),
        (
            Some(NbdError::Overflow),
            hex("67446698 0000004b 0102030405060708"),
        ),
        (
            Some(NbdError::NotSup),
            hex("67446698 0000005f 0102030405060708"),
        ),
        (
            Some(NbdError::Shutdown),
            hex("67446698 0000006c 0102030405060708"),
        ),
    ] {
        let reply = SimpleReply {
            error,
            cookie: COOKIE,
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(out, bytes);
        check_decode(&bytes, &reply, SimpleReply::decode);
        check_decode(&bytes, &ReplyHeader::Simple(reply), |b| {
            ReplyHeader::decode(b, HeaderStyle::Compact, MAX_PAYLOAD)
        });
    }
}

fn check_chunk(chunk: ReplyChunk, style: HeaderStyle, bytes: Vec<u8>) {
    let mut out = Vec::new();
    chunk.encode(style, &mut out).expect("encode chunk");
    assert_eq!(out, bytes, "{chunk:?}");
    check_decode(&bytes, &chunk, |b| {
        ReplyChunk::decode(b, style, MAX_PAYLOAD)
    });
    let header_len = ChunkHeader::header_len(style);
    check_decode(
        &bytes[..header_len],
        &ReplyHeader::Chunk(chunk.header()),
        |b| ReplyHeader::decode(b, style, MAX_PAYLOAD),
    );
}

fn chunk(flags: ReplyFlags, body: ChunkBody) -> ReplyChunk {
    ReplyChunk {
        flags,
        cookie: COOKIE,
        request_offset: 0,
        body,
    }
}

#[test]
fn structured_chunks() {
    // S: 0x668e33ef, 16 bits flags, 16 bits type, 64 bits cookie, 32 bits length, payload.
    let done = ReplyFlags::DONE;
    check_chunk(
        chunk(done, ChunkBody::None),
        HeaderStyle::Compact,
        hex("668e33ef 0001 0000 0102030405060708 00000000"),
    );
    check_chunk(
        chunk(
            ReplyFlags::empty(),
            ChunkBody::OffsetData {
                offset: 0x1000,
                data: b"abcd".to_vec().into(),
            },
        ),
        HeaderStyle::Compact,
        hex(r#"668e33ef 0000 0001 0102030405060708 0000000c 0000000000001000 "abcd" "#),
    );
    check_chunk(
        chunk(
            done,
            ChunkBody::OffsetHole {
                offset: 0x1000,
                length: 0x200,
            },
        ),
        HeaderStyle::Compact,
        hex("668e33ef 0001 0002 0102030405060708 0000000c 0000000000001000 00000200"),
    );
    check_chunk(
        chunk(
            done,
            ChunkBody::BlockStatus {
                context_id: 1,
                extents: vec![
                    Extent {
                        length: 4096,
                        flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
                    },
                    Extent {
                        length: 8192,
                        flags: 0,
                    },
                ],
            },
        ),
        HeaderStyle::Compact,
        hex(
            "668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000003 00002000 00000000",
        ),
    );
    // Error chunks: 32 bits error, 16 bits message length, message [, 64 bits offset].
    check_chunk(
        chunk(
            done,
            ChunkBody::Error {
                error: NbdError::Inval,
                message: "bad".into(),
            },
        ),
        HeaderStyle::Compact,
        hex(r#"668e33ef 0001 8001 0102030405060708 00000009 00000016 0003 "bad" "#),
    );
    check_chunk(
        chunk(
            ReplyFlags::empty(),
            ChunkBody::ErrorOffset {
                error: NbdError::Io,
                message: "x".into(),
                offset: 0x200,
            },
        ),
        HeaderStyle::Compact,
        hex(r#"668e33ef 0000 8002 0102030405060708 0000000f 00000005 0001 "x" 0000000000000200 "#),
    );
    check_chunk(
        chunk(
            done,
            ChunkBody::UnknownError {
                chunk_type: 0x8123,
                error: NbdError::Io,
                message: String::new(),
                tail: vec![9],
            },
        ),
        HeaderStyle::Compact,
        hex("668e33ef 0001 8123 0102030405060708 00000007 00000005 0000 09"),
    );
}

#[test]
fn extended_chunks() {
    // S: 0x6e8a278c, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits request offset,
    //    64 bits length, payload.
    let with_offset = |flags, body| ReplyChunk {
        flags,
        cookie: COOKIE,
        request_offset: 0x4000,
        body,
    };
    check_chunk(
        with_offset(ReplyFlags::DONE, ChunkBody::None),
        HeaderStyle::Extended,
        hex("6e8a278c 0001 0000 0102030405060708 0000000000004000 0000000000000000"),
    );
    check_chunk(
        with_offset(
            ReplyFlags::empty(),
            ChunkBody::OffsetData {
                offset: 0x4200,
                data: vec![0x55].into(),
            },
        ),
        HeaderStyle::Extended,
        hex(
            "6e8a278c 0000 0001 0102030405060708 0000000000004000 0000000000000009 0000000000004200 55",
        ),
    );
    // BLOCK_STATUS_EXT: 32 bits context id, 32 bits count, n * (64 bits length, 64 bits flags).
    check_chunk(
        with_offset(
            ReplyFlags::DONE,
            ChunkBody::BlockStatusExt {
                context_id: 2,
                extents: vec![ExtendedExtent {
                    length: 1 << 32,
                    flags: u64::from(NBD_STATE_ZERO),
                }],
            },
        ),
        HeaderStyle::Extended,
        hex(
            "6e8a278c 0001 0006 0102030405060708 0000000000004000 0000000000000018 00000002 00000001 0000000100000000 0000000000000002",
        ),
    );
}

#[test]
fn offset_data_prefix_leaves_data_to_the_caller() {
    let reply = chunk(
        ReplyFlags::DONE,
        ChunkBody::OffsetData {
            offset: 8,
            data: vec![1, 2, 3].into(),
        },
    );
    let mut out = Vec::new();
    reply
        .encode_without_data(HeaderStyle::Compact, &mut out)
        .expect("encode");
    assert_eq!(
        out,
        hex("668e33ef 0001 0001 0102030405060708 0000000b 0000000000000008")
    );
}

#[test]
fn transmission_flag_bits() {
    // Bit numbers from the "Transmission flags" list.
    let expected = [
        (TransmissionFlags::HAS_FLAGS, 0),
        (TransmissionFlags::READ_ONLY, 1),
        (TransmissionFlags::SEND_FLUSH, 2),
        (TransmissionFlags::SEND_FUA, 3),
        (TransmissionFlags::ROTATIONAL, 4),
        (TransmissionFlags::SEND_TRIM, 5),
        (TransmissionFlags::SEND_WRITE_ZEROES, 6),
        (TransmissionFlags::SEND_DF, 7),
        (TransmissionFlags::CAN_MULTI_CONN, 8),
        (TransmissionFlags::SEND_RESIZE, 9),
        (TransmissionFlags::SEND_CACHE, 10),
        (TransmissionFlags::SEND_FAST_ZERO, 11),
        (TransmissionFlags::BLOCK_STATUS_PAYLOAD, 12),
    ];
    for (flag, bit) in expected {
        assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
    }
    let commands = [
        (CommandFlags::FUA, 0),
        (CommandFlags::NO_HOLE, 1),
        (CommandFlags::DF, 2),
        (CommandFlags::REQ_ONE, 3),
        (CommandFlags::FAST_ZERO, 4),
        (CommandFlags::PAYLOAD_LEN, 5),
    ];
    for (flag, bit) in commands {
        assert_eq!(flag.bits(), 1 << bit, "{flag:?}");
    }
}
