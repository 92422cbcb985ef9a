//! Bit-flag newtypes for every flag field on the NBD wire.
//! Invariant: a value keeps every bit it was built or decoded with, known or not, so decoding
//! and re-encoding is lossless; whether unknown bits are an error is decided by the decoder of
//! the message that carries the field, as the protocol document prescribes for that field.

use super::consts::*;
use std::fmt;
use std::ops::{BitAnd, BitOr, BitOrAssign};

macro_rules! wire_flags {
    (
        $(#[$meta:meta])*
        $name:ident: $ty:ty {
            $( $(#[$fmeta:meta])* $flag:ident = $value:expr; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name($ty);

        impl $name {
            $( $(#[$fmeta])* pub const $flag: Self = Self($value); )*

            /// Every bit this codec has a name for.
            pub const KNOWN: Self = Self(0 $(| $value)*);

            /// No bit set.
            pub const fn empty() -> Self {
                Self(0)
            }

            /// Wraps raw bits, keeping unknown ones.
            pub const fn from_bits_retain(bits: $ty) -> Self {
                Self(bits)
            }

            /// The raw bits as sent on the wire.
            pub const fn bits(self) -> $ty {
                self.0
            }

            /// True if every bit of `other` is set.
            pub const fn contains(self, other: Self) -> bool {
                self.0 & other.0 == other.0
            }

            /// True if any bit of `other` is set.
            pub const fn intersects(self, other: Self) -> bool {
                self.0 & other.0 != 0
            }

            /// True if no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }

            /// Bits of `self` or `other`.
            pub const fn union(self, other: Self) -> Self {
                Self(self.0 | other.0)
            }

            /// Bits of `self` that are not in `other`.
            pub const fn difference(self, other: Self) -> Self {
                Self(self.0 & !other.0)
            }

            /// The bits this codec has no name for.
            pub const fn unknown_bits(self) -> $ty {
                self.0 & !Self::KNOWN.0
            }

            /// Sets or clears the bits of `other`.
            pub fn set(&mut self, other: Self, value: bool) {
                if value {
                    self.0 |= other.0;
                } else {
                    self.0 &= !other.0;
                }
            }
        }

        impl BitOr for $name {
            type Output = Self;
            fn bitor(self, rhs: Self) -> Self {
                self.union(rhs)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: Self) {
                self.0 |= rhs.0;
            }
        }

        impl BitAnd for $name {
            type Output = Self;
            fn bitand(self, rhs: Self) -> Self {
                Self(self.0 & rhs.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                let mut first = true;
                $(
                    if self.contains(Self::$flag) {
                        if !first {
                            f.write_str(" | ")?;
                        }
                        f.write_str(stringify!($flag))?;
                        first = false;
                    }
                )*
                let unknown = self.unknown_bits();
                if unknown != 0 {
                    if !first {
                        f.write_str(" | ")?;
                    }
                    write!(f, "{unknown:#x}")?;
                }
                f.write_str(")")
            }
        }
    };
}

wire_flags! {
    /// Handshake flags the server sends in its greeting (16 bits).
    HandshakeFlags: u16 {
        /// `NBD_FLAG_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE;
        /// `NBD_FLAG_NO_ZEROES`.
        NO_ZEROES = NBD_FLAG_NO_ZEROES;
    }
}

wire_flags! {
    /// Client flags the client sends after the greeting (32 bits).
    ClientFlags: u32 {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
        FIXED_NEWSTYLE = NBD_FLAG_C_FIXED_NEWSTYLE;
        /// `NBD_FLAG_C_NO_ZEROES`.
        NO_ZEROES = NBD_FLAG_C_NO_ZEROES;
    }
}

wire_flags! {
    /// Transmission flags of an export (16 bits).
    TransmissionFlags: u16 {
        /// `NBD_FLAG_HAS_FLAGS`; always set on the wire.
        HAS_FLAGS = NBD_FLAG_HAS_FLAGS;
        /// `NBD_FLAG_READ_ONLY`.
        READ_ONLY = NBD_FLAG_READ_ONLY;
        /// `NBD_FLAG_SEND_FLUSH`.
        SEND_FLUSH = NBD_FLAG_SEND_FLUSH;
        /// `NBD_FLAG_SEND_FUA`.
        SEND_FUA = NBD_FLAG_SEND_FUA;
        /// `NBD_FLAG_ROTATIONAL`.
        ROTATIONAL = NBD_FLAG_ROTATIONAL;
        /// `NBD_FLAG_SEND_TRIM`.
        SEND_TRIM = NBD_FLAG_SEND_TRIM;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`.
        SEND_WRITE_ZEROES = NBD_FLAG_SEND_WRITE_ZEROES;
        /// `NBD_FLAG_SEND_DF`.
        SEND_DF = NBD_FLAG_SEND_DF;
        /// `NBD_FLAG_CAN_MULTI_CONN`.
        CAN_MULTI_CONN = NBD_FLAG_CAN_MULTI_CONN;
        /// `NBD_FLAG_SEND_RESIZE` (experimental).
        SEND_RESIZE = NBD_FLAG_SEND_RESIZE;
        /// `NBD_FLAG_SEND_CACHE`.
        SEND_CACHE = NBD_FLAG_SEND_CACHE;
        /// `NBD_FLAG_SEND_FAST_ZERO`.
        SEND_FAST_ZERO = NBD_FLAG_SEND_FAST_ZERO;
        /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (extended headers).
        BLOCK_STATUS_PAYLOAD = NBD_FLAG_BLOCK_STATUS_PAYLOAD;
    }
}

wire_flags! {
    /// Command flags of a request (16 bits).
    CommandFlags: u16 {
        /// `NBD_CMD_FLAG_FUA`.
        FUA = NBD_CMD_FLAG_FUA;
        /// `NBD_CMD_FLAG_NO_HOLE`.
        NO_HOLE = NBD_CMD_FLAG_NO_HOLE;
        /// `NBD_CMD_FLAG_DF`.
        DF = NBD_CMD_FLAG_DF;
        /// `NBD_CMD_FLAG_REQ_ONE`.
        REQ_ONE = NBD_CMD_FLAG_REQ_ONE;
        /// `NBD_CMD_FLAG_FAST_ZERO`.
        FAST_ZERO = NBD_CMD_FLAG_FAST_ZERO;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN` (extended headers only).
        PAYLOAD_LEN = NBD_CMD_FLAG_PAYLOAD_LEN;
    }
}

wire_flags! {
    /// Flags of a structured or extended reply chunk (16 bits).
    ReplyFlags: u16 {
        /// `NBD_REPLY_FLAG_DONE`: last chunk of the reply.
        DONE = NBD_REPLY_FLAG_DONE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_known_and_unknown_bits() {
        let flags = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH;
        assert_eq!(
            format!("{flags:?}"),
            "TransmissionFlags(HAS_FLAGS | SEND_FLUSH)"
        );
        let odd = CommandFlags::from_bits_retain(0x8001);
        assert_eq!(format!("{odd:?}"), "CommandFlags(FUA | 0x8000)");
        assert_eq!(odd.unknown_bits(), 0x8000);
    }

    #[test]
    fn set_and_contains() {
        let mut flags = ClientFlags::empty();
        flags.set(ClientFlags::NO_ZEROES, true);
        assert!(flags.contains(ClientFlags::NO_ZEROES));
        assert!(!flags.contains(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES));
        flags.set(ClientFlags::NO_ZEROES, false);
        assert!(flags.is_empty());
    }
}
