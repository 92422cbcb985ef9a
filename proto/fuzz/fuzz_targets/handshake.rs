//! Fuzzes the greeting, client flags and NBD_OPT_EXPORT_NAME reply decoders.
#![no_main]

use enbd_proto::wire::{ClientFlags, ExportInfo, Greeting};
use enbd_proto_fuzz::{check, encoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data, Greeting::decode, |v| encoded(|o| v.encode(o)));
    check(data, ClientFlags::decode, |v| encoded(|o| v.encode(o)));
    for no_zeroes in [false, true] {
        check(
            data,
            |b| ExportInfo::decode_export_name_reply(b, no_zeroes),
            |v| encoded(|o| v.encode_export_name_reply(no_zeroes, o)),
        );
    }
});
