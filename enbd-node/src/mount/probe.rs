//! Content probe of a block device before formatting: recognises filesystem,
//! partition-table and volume-manager signatures in the first and last bytes.
//!
//! Invariant: a device is reported `Blank` only when no signature is found AND every
//! probed byte is zero. Anything else that is unrecognised is `UnknownData`, so the
//! node never formats over data it does not understand.

pub use enbd_proto::params::FsType;

/// Bytes read from the start of the device (covers btrfs at 64 KiB and ISO 9660 at 32 KiB).
pub const HEAD_BYTES: usize = 128 * 1024;
/// Bytes read from the end of the device (md 0.90/1.0 superblocks, the GPT backup header).
pub const TAIL_BYTES: usize = 128 * 1024;

/// What a device holds, judged from its head and tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Only zeros where signatures live: safe to format.
    Blank,
    /// A filesystem this node can mount. ext2/ext3 count as ext4: the ext4 driver mounts them.
    Filesystem(FsType),
    /// A recognised signature of something else (another filesystem, a partition table, ...).
    Foreign(&'static str),
    /// Non-zero bytes with no recognised signature.
    UnknownData,
}

struct Signature {
    offset: usize,
    magic: &'static [u8],
    name: &'static str,
    mountable: Option<FsType>,
}

/// Signatures checked in the head, most specific first. Offsets are from the start of the
/// device; the MBR boot signature comes last because FAT and NTFS boot sectors carry it too.
const HEAD_SIGNATURES: &[Signature] = &[
    Signature {
        offset: 0,
        magic: b"XFSB",
        name: "xfs",
        mountable: Some(FsType::Xfs),
    },
    Signature {
        offset: 0x438,
        magic: &[0x53, 0xef],
        name: "ext",
        mountable: Some(FsType::Ext4),
    },
    Signature {
        offset: 0x10040,
        magic: b"_BHRfS_M",
        name: "btrfs",
        mountable: None,
    },
    Signature {
        offset: 0x400,
        magic: &[0x10, 0x20, 0xf5, 0xf2],
        name: "f2fs",
        mountable: None,
    },
    Signature {
        offset: 0,
        magic: b"LUKS\xba\xbe",
        name: "crypto_LUKS",
        mountable: None,
    },
    Signature {
        offset: 0,
        magic: b"hsqs",
        name: "squashfs",
        mountable: None,
    },
    Signature {
        offset: 0x8001,
        magic: b"CD001",
        name: "iso9660",
        mountable: None,
    },
    Signature {
        offset: 4086,
        magic: b"SWAPSPACE2",
        name: "swap",
        mountable: None,
    },
    Signature {
        offset: 4086,
        magic: b"SWAP-SPACE",
        name: "swap",
        mountable: None,
    },
    Signature {
        offset: 0,
        magic: b"LABELONE",
        name: "LVM2_member",
        mountable: None,
    },
    Signature {
        offset: 512,
        magic: b"LABELONE",
        name: "LVM2_member",
        mountable: None,
    },
    // md superblock 1.1 (start) and 1.2 (4 KiB in); magic 0xa92b4efc little-endian.
    Signature {
        offset: 0,
        magic: &[0xfc, 0x4e, 0x2b, 0xa9],
        name: "linux_raid_member",
        mountable: None,
    },
    Signature {
        offset: 4096,
        magic: &[0xfc, 0x4e, 0x2b, 0xa9],
        name: "linux_raid_member",
        mountable: None,
    },
    Signature {
        offset: 3,
        magic: b"NTFS    ",
        name: "ntfs",
        mountable: None,
    },
    Signature {
        offset: 512,
        magic: b"EFI PART",
        name: "gpt",
        mountable: None,
    },
    Signature {
        offset: 510,
        magic: &[0x55, 0xaa],
        name: "dos partition table or boot sector",
        mountable: None,
    },
];

fn matches(buf: &[u8], sig: &Signature) -> bool {
    buf.get(sig.offset..sig.offset + sig.magic.len()) == Some(sig.magic)
}

/// Classifies a device from its first bytes (`head`, up to [`HEAD_BYTES`]) and last bytes
/// (`tail`, up to [`TAIL_BYTES`]; may overlap `head` on small devices).
pub fn classify(head: &[u8], tail: &[u8]) -> Content {
    for sig in HEAD_SIGNATURES {
        if matches(head, sig) {
            return match sig.mountable {
                Some(fs) => Content::Filesystem(fs),
                None => Content::Foreign(sig.name),
            };
        }
    }
    if tail.len() >= 512 && tail[tail.len() - 512..].starts_with(b"EFI PART") {
        return Content::Foreign("gpt (backup header)");
    }
    if head.iter().chain(tail).all(|b| *b == 0) {
        Content::Blank
    } else {
        Content::UnknownData
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn zeros() -> Vec<u8> {
        vec![0; HEAD_BYTES]
    }

    #[test]
    fn all_zero_is_blank() {
        assert_eq!(classify(&zeros(), &zeros()), Content::Blank);
    }

    #[test]
    fn short_device_all_zero_is_blank() {
        assert_eq!(classify(&[0; 4096], &[0; 4096]), Content::Blank);
    }

    #[test]
    fn ext_magic_is_ext4() {
        let mut head = zeros();
        head[0x438] = 0x53;
        head[0x439] = 0xef;
        assert_eq!(classify(&head, &zeros()), Content::Filesystem(FsType::Ext4));
    }

    #[test]
    fn xfs_magic_is_xfs() {
        let mut head = zeros();
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(classify(&head, &zeros()), Content::Filesystem(FsType::Xfs));
    }

    #[test]
    fn btrfs_is_foreign() {
        let mut head = zeros();
        head[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(classify(&head, &zeros()), Content::Foreign("btrfs"));
    }

    #[test]
    fn gpt_backup_in_tail_is_foreign() {
        let mut tail = zeros();
        let at = tail.len() - 512;
        tail[at..at + 8].copy_from_slice(b"EFI PART");
        assert_eq!(
            classify(&zeros(), &tail),
            Content::Foreign("gpt (backup header)")
        );
    }

    #[test]
    fn mbr_signature_is_foreign() {
        let mut head = zeros();
        head[510] = 0x55;
        head[511] = 0xaa;
        assert!(matches!(classify(&head, &zeros()), Content::Foreign(_)));
    }

    #[test]
    fn stray_bytes_are_unknown_data_not_blank() {
        let mut head = zeros();
        head[12345] = 1;
        assert_eq!(classify(&head, &zeros()), Content::UnknownData);
        let mut tail = zeros();
        tail[7] = 0xff;
        assert_eq!(classify(&zeros(), &tail), Content::UnknownData);
    }
}
