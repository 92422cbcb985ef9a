//! Fuzzes the compact and extended request header decoders and the BLOCK_STATUS payload.
#![no_main]

use enbd_proto::wire::{BlockStatusPayload, HeaderStyle, Request};
use enbd_proto_fuzz::{check, encoded, try_encoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for style in [HeaderStyle::Compact, HeaderStyle::Extended] {
        check(
            data,
            |b| Request::decode(b, style, 1 << 25),
            |v| try_encoded(|o| v.encode(style, o)),
        );
    }
    check(
        data,
        |b| BlockStatusPayload::decode(b).map(|v| Some((v, b.len()))),
        |v| encoded(|o| v.encode(o)),
    );
});
