//! Malformed-input tests for the NBD wire codec: every rule the protocol document states as
//! MUST (and every limit the caller sets) is checked to produce the matching `WireError`,
//! never a panic or an allocation sized by the peer; encoders refuse invalid values and
//! write nothing when they do.

// A failed expectation is a failed test: panicking with context is the point here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use enbd_proto::wire::*;

const MAX: u32 = 4096;
const MAX_PAYLOAD: u64 = 1 << 20;
const REP_MAGIC: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];

fn option_frame(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = b"IHAVEOPT".to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn reply_frame(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = REP_MAGIC.to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn structured(flags: u16, chunk_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = 0x668e_33efu32.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&7u64.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn malformed_reason(
    result: Result<Option<(OptionRequest, usize)>, WireError>,
    frame_len: usize,
) -> WireError {
    match result {
        Err(WireError::MalformedOption {
            frame_len: len,
            reason,
            ..
        }) => {
            assert_eq!(
                len, frame_len,
                "frame length lets the server skip the option"
            );
            *reason
        }
        other => panic!("expected MalformedOption, got {other:?}"),
    }
}

#[test]
fn greeting_rejects_bad_magic_early_and_oldstyle() {
    assert!(matches!(
        Greeting::decode(b"NBDMAGIX"),
        Err(WireError::BadMagic { .. })
    ));
    let mut oldstyle = b"NBDMAGIC".to_vec();
    oldstyle.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    assert_eq!(Greeting::decode(&oldstyle), Err(WireError::Oldstyle));
    let mut wrong = b"NBDMAGIC".to_vec();
    wrong.extend_from_slice(b"IHAVEOPX");
    assert!(matches!(
        Greeting::decode(&wrong),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn client_flags_reject_unknown_bits() {
    assert_eq!(
        ClientFlags::decode(&[0, 0, 0, 4]),
        Err(WireError::ReservedBits {
            what: "client flags",
            bits: 4
        })
    );
}

#[test]
fn option_framing_errors_are_fatal() {
    let mut bad = option_frame(7, &[]);
    bad[7] = b'X';
    assert!(matches!(
        OptionRequest::decode(&bad, MAX),
        Err(WireError::BadMagic { .. })
    ));
    // A length over the limit is refused from the header alone, before any data arrives.
    let huge = option_frame(1, &[]);
    let mut header = huge[..12].to_vec();
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        OptionRequest::decode(&header, MAX),
        Err(WireError::TooLong { .. })
    ));
    assert!(matches!(
        OptionHeader::decode(&header, MAX),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn options_that_take_no_data_refuse_it_but_abort_ignores_it() {
    for code in [3, 5, 8, 11] {
        let frame = option_frame(code, b"x");
        let reason = malformed_reason(OptionRequest::decode(&frame, MAX), frame.len());
        assert!(
            matches!(reason, WireError::BadLength { .. }),
            "{code}: {reason:?}"
        );
    }
    let abort = option_frame(2, b"ignored");
    assert_eq!(
        OptionRequest::decode(&abort, MAX),
        Ok(Some((OptionRequest::Abort, abort.len())))
    );
}

#[test]
fn export_names_follow_string_rules() {
    let nul = option_frame(1, b"a\0b");
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&nul, MAX), nul.len()),
        WireError::NulInString { .. }
    ));
    let utf8 = option_frame(1, &[0xff, 0xfe]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&utf8, MAX), utf8.len()),
        WireError::InvalidUtf8 { .. }
    ));
    let long = option_frame(1, &[b'a'; 4097]);
    assert!(matches!(
        OptionRequest::decode(&long, 8192),
        Err(WireError::MalformedOption { .. })
    ));
    assert!(matches!(
        OptionRequest::ExportName("x".repeat(4097)).encode(&mut Vec::new()),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn go_request_layout_is_checked() {
    // Name length beyond the data.
    let overrun = option_frame(7, &[0, 0, 0, 9, b'a', 0, 0]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&overrun, MAX), overrun.len()),
        WireError::BadLength { .. }
    ));
    // Request count disagrees with the remaining bytes.
    let count = option_frame(7, &[0, 0, 0, 0, 0, 2, 0, 3]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&count, MAX), count.len()),
        WireError::BadLength { .. }
    ));
    // The same information type twice.
    let dup = option_frame(7, &[0, 0, 0, 0, 0, 2, 0, 3, 0, 3]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&dup, MAX), dup.len()),
        WireError::Duplicate { .. }
    ));
    // Too short for even the name length.
    let short = option_frame(6, &[0, 0]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&short, MAX), short.len()),
        WireError::Truncated { .. }
    ));
}

#[test]
fn meta_context_counts_cannot_drive_allocation() {
    // Four billion queries announced in a 9-byte option: refused without reserving memory.
    let frame = option_frame(10, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&frame, MAX), frame.len()),
        WireError::BadLength { .. }
    ));
    // Trailing junk after the last query.
    let junk = option_frame(9, &[0, 0, 0, 0, 0, 0, 0, 0, 0xaa]);
    assert!(matches!(
        malformed_reason(OptionRequest::decode(&junk, MAX), junk.len()),
        WireError::BadLength { .. }
    ));
}

#[test]
fn option_reply_layouts_are_checked() {
    assert!(matches!(
        OptionReply::decode(&reply_frame(7, 1, b"x"), MAX),
        Err(WireError::BadLength { .. })
    ));
    // NBD_INFO_EXPORT must be exactly 12 bytes and carry HAS_FLAGS.
    let short = reply_frame(7, 3, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert!(matches!(
        OptionReply::decode(&short, MAX),
        Err(WireError::BadLength { .. })
    ));
    let no_has_flags = reply_frame(7, 3, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
    assert!(matches!(
        OptionReply::decode(&no_has_flags, MAX),
        Err(WireError::InvalidValue { .. })
    ));
    // NBD_INFO_BLOCK_SIZE must be exactly 14 bytes.
    let block = reply_frame(7, 3, &[0, 3, 0, 0, 0, 1]);
    assert!(matches!(
        OptionReply::decode(&block, MAX),
        Err(WireError::BadLength { .. })
    ));
    // An info reply without even its type.
    assert!(matches!(
        OptionReply::decode(&reply_frame(7, 3, &[0]), MAX),
        Err(WireError::Truncated { .. })
    ));
    // NBD_REP_SERVER whose name length runs past the data.
    let server = reply_frame(3, 2, &[0, 0, 0, 5, b'a']);
    assert!(matches!(
        OptionReply::decode(&server, MAX),
        Err(WireError::BadLength { .. })
    ));
    // Over the caller's limit, from the header alone.
    let mut big = reply_frame(3, 2, &[]);
    big[16..20].copy_from_slice(&(MAX + 1).to_be_bytes());
    assert!(matches!(
        OptionReply::decode(&big, MAX),
        Err(WireError::TooLong { .. })
    ));
    let mut magic = reply_frame(3, 1, &[]);
    magic[0] = 1;
    assert!(matches!(
        OptionReply::decode(&magic, MAX),
        Err(WireError::BadMagic { .. })
    ));
}

#[test]
fn option_reply_encoder_refuses_error_without_bit_31() {
    let mut out = vec![0xaa];
    let reply = OptionReply::error(OptionCode::Go, OptionError::Unknown(5), "x");
    assert!(reply.encode(&mut out).is_err());
    assert_eq!(out, [0xaa], "nothing written on error");
}

#[test]
fn export_name_reply_padding_must_be_zero() {
    let mut bytes = vec![0, 0, 0, 0, 0, 0, 0x10, 0, 0, 1];
    bytes.extend_from_slice(&[0; 124]);
    bytes[100] = 1;
    assert!(matches!(
        ExportInfo::decode_export_name_reply(&bytes, false),
        Err(WireError::InvalidValue { .. })
    ));
}

#[test]
fn request_headers_are_strict() {
    let request = Request {
        flags: CommandFlags::PAYLOAD_LEN,
        command: Command::Write,
        cookie: Cookie(1),
        offset: 0,
        length: 8,
    };
    let mut out = Vec::new();
    assert!(matches!(
        request.encode(HeaderStyle::Compact, &mut out),
        Err(WireError::ReservedBits { .. })
    ));
    assert!(out.is_empty());
    let long = Request {
        flags: CommandFlags::empty(),
        length: 1 << 32,
        ..request
    };
    assert!(matches!(
        long.encode(HeaderStyle::Compact, &mut out),
        Err(WireError::TooLong { .. })
    ));

    // PAYLOAD_LEN in a compact header.
    let mut bytes = Vec::new();
    Request {
        flags: CommandFlags::empty(),
        ..request
    }
    .encode(HeaderStyle::Compact, &mut bytes)
    .expect("encode");
    bytes[5] |= 0x20;
    assert!(matches!(
        Request::decode(&bytes, HeaderStyle::Compact, MAX_PAYLOAD),
        Err(WireError::ReservedBits { .. })
    ));
    // An extended header where a compact one is expected, and the other way round.
    let mut extended = Vec::new();
    request
        .encode(HeaderStyle::Extended, &mut extended)
        .expect("encode");
    assert!(matches!(
        Request::decode(&extended, HeaderStyle::Compact, MAX_PAYLOAD),
        Err(WireError::BadMagic { .. })
    ));
    assert!(matches!(
        Request::decode(&bytes[..4], HeaderStyle::Extended, MAX_PAYLOAD),
        Err(WireError::BadMagic { .. })
    ));
    // A write payload over the limit.
    let big = Request {
        flags: CommandFlags::empty(),
        length: MAX_PAYLOAD + 1,
        ..request
    };
    let mut big_bytes = Vec::new();
    big.encode(HeaderStyle::Compact, &mut big_bytes)
        .expect("encode");
    assert!(matches!(
        Request::decode(&big_bytes, HeaderStyle::Compact, MAX_PAYLOAD),
        Err(WireError::TooLong { .. })
    ));
    // ...but a large effect length without payload is the server's business, not the codec's.
    let trim = Request {
        command: Command::Trim,
        ..big
    };
    let mut trim_bytes = Vec::new();
    trim.encode(HeaderStyle::Compact, &mut trim_bytes)
        .expect("encode");
    assert!(matches!(
        Request::decode(&trim_bytes, HeaderStyle::Compact, MAX_PAYLOAD),
        Ok(Some(_))
    ));
}

#[test]
fn block_status_payload_length_is_checked() {
    assert!(BlockStatusPayload::decode(&[0; 7]).is_err());
    assert!(BlockStatusPayload::decode(&[0; 10]).is_err());
}

#[test]
fn reply_magic_must_match_the_style() {
    let mut simple = Vec::new();
    SimpleReply {
        error: None,
        cookie: Cookie(1),
    }
    .encode(&mut simple);
    assert!(matches!(
        ReplyHeader::decode(&simple, HeaderStyle::Extended, MAX_PAYLOAD),
        Err(WireError::BadMagic { .. })
    ));
    assert!(matches!(
        ReplyHeader::decode(&[1, 2, 3, 4], HeaderStyle::Compact, MAX_PAYLOAD),
        Err(WireError::BadMagic { .. })
    ));
    assert!(matches!(
        SimpleReply::decode(&structured(1, 0, &[])),
        Err(WireError::BadMagic { .. })
    ));
    let simple_in_extended = ReplyHeader::Simple(SimpleReply {
        error: None,
        cookie: Cookie(1),
    });
    assert!(
        simple_in_extended
            .encode(HeaderStyle::Extended, &mut Vec::new())
            .is_err()
    );
}

#[test]
fn chunk_header_rules() {
    let decode = |bytes: &[u8]| ReplyChunk::decode(bytes, HeaderStyle::Compact, MAX_PAYLOAD);
    // NONE must be empty and carry DONE.
    assert!(matches!(
        decode(&structured(0, 0, &[])),
        Err(WireError::InvalidValue { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 0, &[0])),
        Err(WireError::BadLength { .. })
    ));
    // OFFSET_DATA needs at least one data byte; OFFSET_HOLE is exactly 12 bytes, size nonzero.
    assert!(matches!(
        decode(&structured(1, 1, &[0; 8])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 2, &[0; 13])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 2, &[0; 12])),
        Err(WireError::InvalidValue { .. })
    ));
    // BLOCK_STATUS is 4 + 8n, n > 0, with nonzero extent lengths.
    assert!(matches!(
        decode(&structured(1, 5, &[0; 4])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 5, &[0; 13])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 5, &[0; 12])),
        Err(WireError::InvalidValue { .. })
    ));
    // BLOCK_STATUS_EXT is not allowed without extended headers.
    assert!(matches!(
        decode(&structured(1, 6, &[0; 24])),
        Err(WireError::InvalidValue { .. })
    ));
    // Unknown non-error types force a disconnect; unknown error types are fine.
    assert!(matches!(
        decode(&structured(1, 3, &[])),
        Err(WireError::InvalidValue { .. })
    ));
    assert!(matches!(
        decode(&structured(1, 0x8100, &[0, 0, 0, 5, 0, 0])),
        Ok(Some(_))
    ));
    // Over the caller's limit, from the header alone.
    let mut header = structured(0, 1, &[]);
    header[16..20].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
    assert!(matches!(
        ChunkHeader::decode(&header, HeaderStyle::Compact, MAX_PAYLOAD),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn error_chunk_rules() {
    let decode = |bytes: &[u8]| ReplyChunk::decode(bytes, HeaderStyle::Compact, MAX_PAYLOAD);
    // Error value zero is not an error.
    assert!(matches!(
        decode(&structured(1, 0x8001, &[0, 0, 0, 0, 0, 0])),
        Err(WireError::InvalidValue { .. })
    ));
    // Message length past the chunk.
    assert!(matches!(
        decode(&structured(1, 0x8001, &[0, 0, 0, 5, 0, 9, b'a'])),
        Err(WireError::BadLength { .. })
    ));
    // ERROR must end with its message; ERROR_OFFSET with the offset.
    assert!(matches!(
        decode(&structured(1, 0x8001, &[0, 0, 0, 5, 0, 0, 1])),
        Err(WireError::BadLength { .. })
    ));
    assert!(matches!(
        decode(&structured(
            1,
            0x8002,
            &[0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        )),
        Err(WireError::BadLength { .. })
    ));
    // Encoders refuse what decoders refuse.
    let zero = ReplyChunk {
        flags: ReplyFlags::DONE,
        cookie: Cookie(1),
        request_offset: 0,
        body: ChunkBody::Error {
            error: NbdError::Unknown(0),
            message: String::new(),
        },
    };
    let mut out = Vec::new();
    assert!(zero.encode(HeaderStyle::Compact, &mut out).is_err());
    let not_done = ReplyChunk {
        flags: ReplyFlags::empty(),
        body: ChunkBody::None,
        ..zero.clone()
    };
    assert!(not_done.encode(HeaderStyle::Compact, &mut out).is_err());
    let offset_in_compact = ReplyChunk {
        request_offset: 1,
        body: ChunkBody::None,
        ..zero
    };
    assert!(
        offset_in_compact
            .encode(HeaderStyle::Compact, &mut out)
            .is_err()
    );
    assert!(out.is_empty(), "nothing written on error");
}

#[test]
fn extended_chunk_rules() {
    let ext = |chunk_type: u16, payload: &[u8]| {
        let mut out = 0x6e8a_278cu32.to_be_bytes().to_vec();
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&chunk_type.to_be_bytes());
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        out.extend_from_slice(payload);
        out
    };
    let decode = |bytes: &[u8]| ReplyChunk::decode(bytes, HeaderStyle::Extended, MAX_PAYLOAD);
    // BLOCK_STATUS (32-bit) is not allowed with extended headers.
    assert!(matches!(
        decode(&ext(5, &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1])),
        Err(WireError::InvalidValue { .. })
    ));
    // Descriptor count must match the payload.
    let mut payload = vec![0, 0, 0, 1, 0, 0, 0, 2];
    payload.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert!(matches!(
        decode(&ext(6, &payload)),
        Err(WireError::BadLength { .. })
    ));
    payload[7] = 1;
    assert!(matches!(decode(&ext(6, &payload)), Ok(Some(_))));
    // A 64-bit length over the limit is refused from the header alone.
    let mut huge = ext(1, &[]);
    huge[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(matches!(
        ChunkHeader::decode(&huge, HeaderStyle::Extended, MAX_PAYLOAD),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn block_size_validation() {
    assert!(
        BlockSizeInfo {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25
        }
        .validate()
        .is_ok()
    );
    assert!(
        BlockSizeInfo {
            minimum: 3,
            preferred: 4096,
            maximum: 1 << 25
        }
        .validate()
        .is_err()
    );
    assert!(
        BlockSizeInfo {
            minimum: 1 << 17,
            preferred: 1 << 17,
            maximum: 1 << 25
        }
        .validate()
        .is_err()
    );
    assert!(
        BlockSizeInfo {
            minimum: 1,
            preferred: 256,
            maximum: 1 << 25
        }
        .validate()
        .is_err()
    );
    assert!(
        BlockSizeInfo {
            minimum: 512,
            preferred: 4096,
            maximum: 1024
        }
        .validate()
        .is_err()
    );
}
