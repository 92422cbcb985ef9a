//! Fuzzes the simple reply, reply header, whole chunk and chunk payload decoders, in both
//! header styles.
#![no_main]

use enbd_proto::wire::{
    ChunkBody, ChunkType, HeaderStyle, ReplyChunk, ReplyFlags, ReplyHeader, SimpleReply,
};
use enbd_proto_fuzz::{check, encoded, try_encoded};
use libfuzzer_sys::fuzz_target;

const MAX_PAYLOAD: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    check(data, SimpleReply::decode, |v| encoded(|o| v.encode(o)));
    for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
        check(
            data,
            |b| ReplyHeader::decode(b, style, MAX_PAYLOAD),
            |v| try_encoded(|o| v.encode(style, o)),
        );
        check(
            data,
            |b| ReplyChunk::decode(b, style, MAX_PAYLOAD),
            |v| try_encoded(|o| v.encode(style, o)),
        );
    }
    // Payload decoding on its own, as a client does after reading a header: the first two
    // bytes pick the chunk type. Whatever is accepted must encode in some header style.
    if let [high, low, payload @ ..] = data {
        let chunk_type = ChunkType::from_raw(u16::from_be_bytes([*high, *low]));
        if let Ok(body) = ChunkBody::decode(chunk_type, payload) {
            let style = if chunk_type == ChunkType::BlockStatusExt {
                HeaderStyle::Extended
            } else {
                HeaderStyle::Compact
            };
            let chunk = ReplyChunk {
                flags: ReplyFlags::DONE,
                cookie: Default::default(),
                request_offset: 0,
                body,
            };
            let bytes = try_encoded(|o| chunk.encode(style, o))
                .unwrap_or_else(|e| panic!("{chunk:?}: {e}"));
            assert_eq!(
                ReplyChunk::decode(&bytes, style, u64::MAX),
                Ok(Some((chunk, bytes.len())))
            );
        }
    }
});
