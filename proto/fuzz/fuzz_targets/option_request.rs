//! Fuzzes the option request decoders (whole frame, and header-then-data parsing).
#![no_main]

use enbd_proto::wire::{OptionHeader, OptionRequest};
use enbd_proto_fuzz::{check, try_encoded};
use libfuzzer_sys::fuzz_target;

const MAX_DATA: u32 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    check(
        data,
        |b| OptionRequest::decode(b, MAX_DATA),
        |v| try_encoded(|o| v.encode(o)),
    );
    // The split path a server may use: header first, then `parse` on the data.
    if let Ok(Some((header, used))) = OptionHeader::decode(data, MAX_DATA) {
        assert!(header.length <= MAX_DATA);
        if let Some(body) = data.get(used..used + header.length as usize) {
            let _ = OptionRequest::parse(header.option, body);
        }
    }
});
