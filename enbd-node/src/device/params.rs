//! Translation of what the server reports about a volume into ublk device parameters.
//! Pure functions: the kernel rejects inconsistent parameters, so every value is derived
//! (and clamped) here, where it can be unit-tested without a kernel.

use libublk::sys;

/// What the block device must look like: filled from the engine's geometry by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGeometry {
    pub size_bytes: u64,
    /// Smallest addressable unit the server accepts (NBD minimum block size).
    pub logical_block: u32,
    /// Preferred IO unit (NBD preferred block size): physical block and discard granularity.
    pub physical_block: u32,
    /// Largest single request the server accepts (NBD maximum block size).
    pub max_io_bytes: u32,
    /// Largest discard / write-zeroes request the target accepts; the block layer splits
    /// bigger ones (mkfs and fstrim discard whole devices). 0 turns both off.
    pub max_discard_bytes: u32,
    pub read_only: bool,
    /// The server has a volatile cache: FLUSH must reach it.
    pub flush: bool,
    pub fua: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// Largest IO buffer per tag. Bigger requests are split by the block layer.
pub const MAX_IO_BUF_BYTES: u32 = 512 * 1024;

/// log2 of a block size, clamped to what the block layer accepts (512 B ..= 64 KiB) and
/// rounded down to a power of two.
fn block_shift(bytes: u32, min_shift: u8) -> u8 {
    let shift = if bytes == 0 {
        0
    } else {
        (31 - bytes.leading_zeros()) as u8
    };
    shift.clamp(min_shift, 16)
}

/// The per-tag IO buffer size: the server's limit, rounded down to whole 4 KiB pages.
pub fn io_buf_bytes(geo: &DeviceGeometry) -> u32 {
    let limit = if geo.max_io_bytes == 0 {
        MAX_IO_BUF_BYTES
    } else {
        geo.max_io_bytes
    };
    (limit.min(MAX_IO_BUF_BYTES) & !4095).max(4096)
}

/// The full parameter set for SET_PARAMS.
pub fn ublk_params(geo: &DeviceGeometry, io_buf_bytes: u32) -> sys::ublk_params {
    let logical_shift = block_shift(geo.logical_block, 9);
    let physical_shift = block_shift(geo.physical_block, 12).max(logical_shift);
    let mut attrs = 0;
    if geo.flush {
        attrs |= sys::UBLK_ATTR_VOLATILE_CACHE;
    }
    if geo.fua {
        attrs |= sys::UBLK_ATTR_FUA;
    }
    if geo.read_only {
        attrs |= sys::UBLK_ATTR_READ_ONLY;
    }
    // No UBLK_ATTR_ROTATIONAL: a network volume has no seek penalty worth scheduling for.
    let logical_bytes = 1u64 << logical_shift;
    let mut params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: logical_shift,
            physical_bs_shift: physical_shift,
            io_opt_shift: physical_shift,
            io_min_shift: physical_shift,
            max_sectors: io_buf_bytes >> 9,
            // A partial trailing logical block cannot be addressed: leave it out.
            dev_sectors: (geo.size_bytes / logical_bytes * logical_bytes) >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
    if (geo.discard || geo.write_zeroes) && !geo.read_only {
        params.types |= sys::UBLK_PARAM_TYPE_DISCARD;
        params.discard = sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 1 << physical_shift,
            max_discard_sectors: if geo.discard {
                geo.max_discard_bytes >> 9
            } else {
                0
            },
            max_write_zeroes_sectors: if geo.write_zeroes {
                geo.max_discard_bytes >> 9
            } else {
                0
            },
            max_discard_segments: 1,
            reserved0: 0,
        };
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> DeviceGeometry {
        DeviceGeometry {
            size_bytes: 64 << 20,
            logical_block: 512,
            physical_block: 4096,
            max_io_bytes: 32 << 20,
            max_discard_bytes: 16 << 20,
            read_only: false,
            flush: true,
            fua: true,
            discard: true,
            write_zeroes: true,
        }
    }

    #[test]
    fn full_featured_volume() {
        let p = ublk_params(&geo(), io_buf_bytes(&geo()));
        assert_eq!(
            p.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(
            p.basic.attrs,
            sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA
        );
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, (64 << 20) >> 9);
        assert_eq!(p.basic.max_sectors, MAX_IO_BUF_BYTES >> 9);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_segments, 1);
        assert_eq!(p.discard.max_discard_sectors, (16 << 20) >> 9);
        assert_eq!(p.discard.max_write_zeroes_sectors, (16 << 20) >> 9);
    }

    #[test]
    fn discard_limit_comes_from_the_geometry() {
        let g = DeviceGeometry {
            max_discard_bytes: 1 << 20,
            write_zeroes: false,
            ..geo()
        };
        let p = ublk_params(&g, io_buf_bytes(&g));
        assert_eq!(p.discard.max_discard_sectors, 2048);
        assert_eq!(p.discard.max_write_zeroes_sectors, 0);
    }

    #[test]
    fn read_only_without_discard_or_cache() {
        let g = DeviceGeometry {
            read_only: true,
            flush: false,
            fua: false,
            ..geo()
        };
        let p = ublk_params(&g, 4096);
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC);
        assert_eq!(p.basic.attrs, sys::UBLK_ATTR_READ_ONLY);
    }

    #[test]
    fn odd_block_sizes_are_clamped() {
        let g = DeviceGeometry {
            logical_block: 1,
            physical_block: 1,
            size_bytes: 4097,
            ..geo()
        };
        let p = ublk_params(&g, io_buf_bytes(&g));
        assert_eq!(p.basic.logical_bs_shift, 9);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.dev_sectors, 8, "trailing partial block dropped");
        let g = DeviceGeometry {
            logical_block: 4096,
            physical_block: 512,
            ..geo()
        };
        let p = ublk_params(&g, 4096);
        assert_eq!(
            p.basic.physical_bs_shift, 12,
            "physical never below logical"
        );
    }

    #[test]
    fn io_buffer_follows_server_limit() {
        assert_eq!(
            io_buf_bytes(&DeviceGeometry {
                max_io_bytes: 65536 + 100,
                ..geo()
            }),
            65536
        );
        assert_eq!(
            io_buf_bytes(&DeviceGeometry {
                max_io_bytes: 0,
                ..geo()
            }),
            MAX_IO_BUF_BYTES
        );
        assert_eq!(
            io_buf_bytes(&DeviceGeometry {
                max_io_bytes: 10,
                ..geo()
            }),
            4096
        );
    }
}
