//! Round-trip and robustness tests for the NBD wire codec, driven by a seeded generator so
//! every run checks the same thousands of cases and a failure names its seed.
//! Properties: decode(encode(v)) == v with every byte consumed; and for mutated encodings
//! (bit flips, truncation, junk appended) decoding never panics and anything it accepts
//! re-encodes to bytes that decode to the same value.

// A failed expectation is a failed test: panicking with context is the point here.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use bytes::Bytes;
use enbd_proto::wire::*;

const CASES: u64 = 3000;
const MAX: u32 = 1 << 20;
const MAX_PAYLOAD: u64 = 1 << 24;

/// SplitMix64: tiny, deterministic, good enough to spread test inputs.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn u16(&mut self) -> u16 {
        self.next() as u16
    }
    fn u32(&mut self) -> u32 {
        self.next() as u32
    }
    fn bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// Strings with multi-byte UTF-8, never NUL.
    fn string(&mut self, max: u64) -> String {
        const PIECES: [&str; 8] = ["a", "Z", "9", ":", "-", "é", "ü", "字"];
        let len = self.below(max + 1);
        (0..len)
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }
    fn nbd_error(&mut self) -> NbdError {
        const KNOWN: [u32; 8] = [1, 5, 12, 22, 28, 75, 95, 108];
        if self.below(4) == 0 {
            NbdError::from_raw(1 + self.below(u64::from(u32::MAX - 1)) as u32)
        } else {
            NbdError::from_raw(KNOWN[self.below(8) as usize])
        }
    }
}

fn info_types(g: &mut Gen) -> Vec<InfoType> {
    let mut all: Vec<u16> = (0..8).collect();
    all.extend([100, 0xffff]);
    let mut picked = Vec::new();
    for raw in all {
        if g.bool() {
            picked.push(InfoType::from_raw(raw));
        }
    }
    picked
}

fn option_request(g: &mut Gen) -> OptionRequest {
    let info = |g: &mut Gen| InfoRequest {
        export: g.string(20),
        requests: info_types(g),
    };
    let meta = |g: &mut Gen| MetaContextRequest {
        export: g.string(20),
        queries: (0..g.below(4)).map(|_| g.string(30)).collect(),
    };
    match g.below(11) {
        0 => OptionRequest::ExportName(g.string(40)),
        1 => OptionRequest::Abort,
        2 => OptionRequest::List,
        3 => OptionRequest::StartTls,
        4 => OptionRequest::Info(info(g)),
        5 => OptionRequest::Go(info(g)),
        6 => OptionRequest::StructuredReply,
        7 => OptionRequest::ListMetaContext(meta(g)),
        8 => OptionRequest::SetMetaContext(meta(g)),
        9 => OptionRequest::ExtendedHeaders,
        _ => {
            let option = match g.below(3) {
                0 => 4,
                1 => 12 + g.below(1000) as u32,
                _ => 0x8000_0000 | g.u32(),
            };
            OptionRequest::Unknown {
                option,
                data: g.bytes(50),
            }
        }
    }
}

fn option_reply(g: &mut Gen) -> OptionReply {
    let option = OptionCode::from_raw(g.below(14) as u32);
    let body = match g.below(6) {
        0 => OptionReplyBody::Ack,
        1 => OptionReplyBody::Server {
            name: g.string(20),
            details: g.string(20),
        },
        2 => OptionReplyBody::Info(match g.below(5) {
            0 => InfoReply::Export(ExportInfo {
                size: g.next(),
                flags: TransmissionFlags::from_bits_retain(g.u16()) | TransmissionFlags::HAS_FLAGS,
            }),
            1 => InfoReply::Name(g.string(30)),
            2 => InfoReply::Description(g.string(30)),
            3 => InfoReply::BlockSize(BlockSizeInfo {
                minimum: g.u32(),
                preferred: g.u32(),
                maximum: g.u32(),
            }),
            _ => InfoReply::Unknown {
                info_type: 4 + g.below(0xfff0) as u16,
                data: g.bytes(20),
            },
        }),
        3 => OptionReplyBody::MetaContext {
            id: g.u32(),
            name: g.string(30),
        },
        4 => OptionReplyBody::Error {
            error: OptionError::from_raw(0x8000_0000 | (1 + g.below(20) as u32)),
            message: g.string(30),
        },
        _ => OptionReplyBody::Unknown {
            reply_type: 5 + g.below(0x7fff_fff0) as u32,
            data: g.bytes(20),
        },
    };
    OptionReply { option, body }
}

fn request(g: &mut Gen, style: HeaderStyle) -> Request {
    let mut flags = CommandFlags::from_bits_retain(g.u16());
    let length = match style {
        HeaderStyle::Compact => {
            flags.set(CommandFlags::PAYLOAD_LEN, false);
            u64::from(g.u32())
        }
        HeaderStyle::Extended => g.next(),
    };
    let mut request = Request {
        flags,
        command: Command::from_raw(g.below(12) as u16),
        cookie: Cookie(g.next()),
        offset: g.next(),
        length,
    };
    // Keep payloads within the limit the decoder is given.
    if request.payload_len(style) > MAX_PAYLOAD {
        request.length %= MAX_PAYLOAD;
    }
    request
}

fn chunk(g: &mut Gen, style: HeaderStyle) -> ReplyChunk {
    let body = match g.below(8) {
        0 => ChunkBody::None,
        1 => ChunkBody::OffsetData {
            offset: g.next(),
            data: Bytes::from({
                let mut data = g.bytes(100);
                data.push(7);
                data
            }),
        },
        2 => ChunkBody::OffsetHole {
            offset: g.next(),
            length: 1 + g.below(u64::from(u32::MAX) - 1) as u32,
        },
        3 if style == HeaderStyle::Compact => ChunkBody::BlockStatus {
            context_id: g.u32(),
            extents: (0..1 + g.below(5))
                .map(|_| Extent {
                    length: 1 + g.below(1 << 31) as u32,
                    flags: g.u32(),
                })
                .collect(),
        },
        3 => ChunkBody::BlockStatusExt {
            context_id: g.u32(),
            extents: (0..1 + g.below(5))
                .map(|_| ExtendedExtent {
                    length: 1 + g.below(u64::MAX - 1),
                    flags: g.next(),
                })
                .collect(),
        },
        4 => ChunkBody::Error {
            error: g.nbd_error(),
            message: g.string(40),
        },
        5 => ChunkBody::ErrorOffset {
            error: g.nbd_error(),
            message: g.string(40),
            offset: g.next(),
        },
        6 => ChunkBody::UnknownError {
            chunk_type: 0x8003 + g.below(0x7ff0) as u16,
            error: g.nbd_error(),
            message: g.string(10),
            tail: g.bytes(10),
        },
        _ => ChunkBody::Error {
            error: g.nbd_error(),
            message: String::new(),
        },
    };
    let mut flags = ReplyFlags::from_bits_retain(g.u16());
    if body == ChunkBody::None {
        flags |= ReplyFlags::DONE;
    }
    let request_offset = if style == HeaderStyle::Extended {
        g.next()
    } else {
        0
    };
    ReplyChunk {
        flags,
        cookie: Cookie(g.next()),
        request_offset,
        body,
    }
}

/// Encodes with `encode`, checks the decode matches, then mutates the bytes and checks that
/// decoding never panics and that whatever is accepted survives a second round trip.
fn check<T, E, D>(g: &mut Gen, value: &T, encode: E, decode: D)
where
    T: PartialEq + std::fmt::Debug,
    E: Fn(&T) -> Vec<u8>,
    D: Fn(&[u8]) -> Result<Option<(T, usize)>, WireError>,
{
    let bytes = encode(value);
    let (decoded, used) = decode(&bytes)
        .unwrap_or_else(|e| panic!("{value:?}: {e}"))
        .expect("complete");
    assert_eq!(&decoded, value);
    assert_eq!(used, bytes.len());

    for _ in 0..8 {
        let mut mutated = bytes.clone();
        match g.below(3) {
            0 if !mutated.is_empty() => {
                let at = g.below(mutated.len() as u64) as usize;
                mutated[at] ^= 1 << g.below(8);
            }
            1 => mutated.truncate(g.below(mutated.len() as u64 + 1) as usize),
            _ => mutated.extend(g.bytes(16)),
        }
        if let Ok(Some((value, used))) = decode(&mutated) {
            assert!(used <= mutated.len());
            let again = encode(&value);
            let (second, _) = decode(&again).expect("re-decode").expect("complete");
            assert_eq!(second, value);
        }
    }
}

#[test]
fn handshake_round_trips() {
    let mut g = Gen(1);
    for _ in 0..CASES {
        let greeting = Greeting {
            flags: HandshakeFlags::from_bits_retain(g.u16()),
        };
        check(
            &mut g,
            &greeting,
            |v| {
                let mut o = Vec::new();
                v.encode(&mut o);
                o
            },
            Greeting::decode,
        );

        let flags = ClientFlags::from_bits_retain(g.u32()) & ClientFlags::KNOWN;
        check(
            &mut g,
            &flags,
            |v| {
                let mut o = Vec::new();
                v.encode(&mut o);
                o
            },
            ClientFlags::decode,
        );

        let info = ExportInfo {
            size: g.next(),
            flags: TransmissionFlags::from_bits_retain(g.u16()) | TransmissionFlags::HAS_FLAGS,
        };
        let no_zeroes = g.bool();
        check(
            &mut g,
            &info,
            |v| {
                let mut o = Vec::new();
                v.encode_export_name_reply(no_zeroes, &mut o);
                o
            },
            |b| ExportInfo::decode_export_name_reply(b, no_zeroes),
        );
    }
}

#[test]
fn option_request_round_trips() {
    let mut g = Gen(2);
    for _ in 0..CASES {
        let request = option_request(&mut g);
        check(
            &mut g,
            &request,
            |v| {
                let mut o = Vec::new();
                v.encode(&mut o).expect("encode");
                o
            },
            |b| OptionRequest::decode(b, MAX),
        );
    }
}

#[test]
fn option_reply_round_trips() {
    let mut g = Gen(3);
    for _ in 0..CASES {
        let reply = option_reply(&mut g);
        check(
            &mut g,
            &reply,
            |v| {
                let mut o = Vec::new();
                v.encode(&mut o).expect("encode");
                o
            },
            |b| OptionReply::decode(b, MAX),
        );
    }
}

#[test]
fn request_round_trips() {
    let mut g = Gen(4);
    for _ in 0..CASES {
        for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
            let request = request(&mut g, style);
            check(
                &mut g,
                &request,
                |v| {
                    let mut o = Vec::new();
                    v.encode(style, &mut o).expect("encode");
                    o
                },
                |b| Request::decode(b, style, MAX_PAYLOAD),
            );
        }
        let payload = BlockStatusPayload {
            effect_length: g.next(),
            context_ids: (0..g.below(6)).map(|_| g.u32()).collect(),
        };
        let mut bytes = Vec::new();
        payload.encode(&mut bytes);
        assert_eq!(BlockStatusPayload::decode(&bytes), Ok(payload));
    }
}

#[test]
fn reply_round_trips() {
    let mut g = Gen(5);
    for _ in 0..CASES {
        let simple = SimpleReply {
            error: if g.bool() { None } else { Some(g.nbd_error()) },
            cookie: Cookie(g.next()),
        };
        check(
            &mut g,
            &simple,
            |v| {
                let mut o = Vec::new();
                v.encode(&mut o);
                o
            },
            SimpleReply::decode,
        );

        for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
            let chunk = chunk(&mut g, style);
            check(
                &mut g,
                &chunk,
                |v| {
                    let mut o = Vec::new();
                    v.encode(style, &mut o).expect("encode");
                    o
                },
                |b| ReplyChunk::decode(b, style, MAX_PAYLOAD),
            );
            let header = ReplyHeader::Chunk(chunk.header());
            check(
                &mut g,
                &header,
                |v| {
                    let mut o = Vec::new();
                    v.encode(style, &mut o).expect("encode");
                    o
                },
                |b| ReplyHeader::decode(b, style, MAX_PAYLOAD),
            );
        }
    }
}
