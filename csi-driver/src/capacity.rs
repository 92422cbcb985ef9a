//! Sizes from CSI capacity ranges. Volumes are whole 4 KiB blocks (the server
//! rounds up the same way), so every size here is a multiple of [`BLOCK`]; a
//! range that no such size satisfies is `OutOfRange`, as the spec says.

use enbd_proto::csi::CapacityRange;

use crate::error::CsiError;

/// Allocation unit of an enbd-server volume.
pub const BLOCK: u64 = 4096;
/// Size of a volume whose request names no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// `(required, limit)` as non-negative numbers; 0 means unset.
fn bounds(range: Option<&CapacityRange>) -> Result<(u64, u64), CsiError> {
    let Some(r) = range else { return Ok((0, 0)) };
    let required = u64::try_from(r.required_bytes).map_err(|_| {
        CsiError::InvalidArgument("capacity_range.required_bytes is negative".into())
    })?;
    let limit = u64::try_from(r.limit_bytes)
        .map_err(|_| CsiError::InvalidArgument("capacity_range.limit_bytes is negative".into()))?;
    if limit > 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "capacity_range.required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    Ok((required, limit))
}

fn round_up(n: u64) -> Result<u64, CsiError> {
    n.checked_next_multiple_of(BLOCK)
        .ok_or_else(|| CsiError::OutOfRange(format!("{n} bytes is too large")))
}

fn within_limit(size: u64, limit: u64, what: &str) -> Result<u64, CsiError> {
    if limit > 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "{what} needs {size} bytes (whole 4 KiB blocks), more than limit_bytes {limit}"
        )));
    }
    Ok(size)
}

/// The size to create: at least `required` (and at least `minimum`, the size of
/// a content source), the default when nothing is asked, never above `limit`.
pub fn for_create(range: Option<&CapacityRange>, minimum: u64) -> Result<u64, CsiError> {
    let (required, limit) = bounds(range)?;
    let wanted = if required > 0 {
        required.max(minimum)
    } else if minimum > 0 {
        minimum
    } else if limit > 0 {
        // Largest whole-block size within the limit, capped at the default.
        DEFAULT_SIZE.min(limit - limit % BLOCK)
    } else {
        DEFAULT_SIZE
    };
    if wanted == 0 {
        return Err(CsiError::OutOfRange(format!(
            "limit_bytes {limit} is below one 4 KiB block"
        )));
    }
    let what = if minimum > required {
        "the content source"
    } else {
        "the volume"
    };
    within_limit(round_up(wanted)?, limit, what)
}

/// `size` raised to `floor` (the filesystem's smallest device, [`crate::capability::fs_floor`])
/// in whole blocks, never above the range's limit: a claim smaller than its filesystem can
/// be made on gets a volume it can be formatted on (CSI lets capacity exceed required_bytes).
pub fn with_floor(
    size: u64,
    floor: Option<(enbd_proto::params::FsType, u64)>,
    range: Option<&CapacityRange>,
) -> Result<u64, CsiError> {
    let Some((fs, min)) = floor.filter(|&(_, min)| size < min) else {
        return Ok(size);
    };
    let (_, limit) = bounds(range)?;
    within_limit(
        round_up(min)?,
        limit,
        &format!("an {fs} filesystem (its mkfs needs at least {min} bytes)"),
    )
}

/// The size to grow to. The spec makes the range REQUIRED here.
pub fn for_expand(range: Option<&CapacityRange>) -> Result<u64, CsiError> {
    let Some(r) = range else {
        return Err(CsiError::InvalidArgument(
            "capacity_range is required".into(),
        ));
    };
    let (required, limit) = bounds(Some(r))?;
    let wanted = if required > 0 {
        required
    } else {
        limit - limit % BLOCK
    };
    if wanted == 0 {
        return Err(CsiError::InvalidArgument(
            "capacity_range needs required_bytes or limit_bytes of at least 4 KiB".into(),
        ));
    }
    within_limit(round_up(wanted)?, limit, "the volume")
}

/// Whether an existing volume of `size` satisfies a repeated CreateVolume.
pub fn satisfies(size: u64, range: Option<&CapacityRange>) -> bool {
    match bounds(range) {
        Ok((required, limit)) => size >= required && (limit == 0 || size <= limit),
        Err(_) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn r(required: i64, limit: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn create_sizes() {
        assert_eq!(for_create(None, 0).unwrap(), DEFAULT_SIZE);
        assert_eq!(for_create(r(1, 0).as_ref(), 0).unwrap(), 4096);
        assert_eq!(for_create(r(4097, 0).as_ref(), 0).unwrap(), 8192);
        assert_eq!(for_create(r(0, 10_000).as_ref(), 0).unwrap(), 8192);
        assert_eq!(for_create(r(0, 0).as_ref(), 5000).unwrap(), 8192);
        assert_eq!(for_create(r(100, 0).as_ref(), 8192).unwrap(), 8192);
    }

    #[test]
    fn create_refusals() {
        assert!(matches!(
            for_create(r(-1, 0).as_ref(), 0),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            for_create(r(10, 5).as_ref(), 0),
            Err(CsiError::OutOfRange(_))
        ));
        // 4097 rounds to 8192, above the 5000 limit.
        assert!(matches!(
            for_create(r(4097, 5000).as_ref(), 0),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            for_create(r(0, 100).as_ref(), 0),
            Err(CsiError::OutOfRange(_))
        ));
        // The source needs 8192 bytes but the limit is 4096.
        assert!(matches!(
            for_create(r(0, 4096).as_ref(), 8192),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            for_create(r(i64::MAX, 0).as_ref(), 0),
            Err(CsiError::OutOfRange(_)) | Ok(_)
        ));
    }

    #[test]
    fn expand_sizes() {
        assert!(matches!(
            for_expand(None),
            Err(CsiError::InvalidArgument(_))
        ));
        assert!(matches!(
            for_expand(r(0, 0).as_ref()),
            Err(CsiError::InvalidArgument(_))
        ));
        assert_eq!(for_expand(r(5000, 0).as_ref()).unwrap(), 8192);
        assert_eq!(for_expand(r(0, 9000).as_ref()).unwrap(), 8192);
        assert!(matches!(
            for_expand(r(5000, 6000).as_ref()),
            Err(CsiError::OutOfRange(_))
        ));
    }

    #[test]
    fn repeated_create_compatibility() {
        assert!(satisfies(8192, r(8192, 0).as_ref()));
        assert!(satisfies(8192, None));
        assert!(!satisfies(8192, r(8193, 0).as_ref()));
        assert!(!satisfies(8192, r(0, 4096).as_ref()));
    }

    #[test]
    fn a_volume_is_raised_to_its_filesystems_floor_within_the_limit() {
        use enbd_proto::params::FsType;
        let xfs = Some((FsType::Xfs, 300_000_000));
        // 300 MB in whole 4 KiB blocks.
        assert_eq!(
            with_floor(1 << 20, xfs, r(1 << 20, 0).as_ref()).unwrap(),
            300_003_328
        );
        assert_eq!(
            with_floor(1 << 30, xfs, None).unwrap(),
            1 << 30,
            "above it: unchanged"
        );
        assert_eq!(
            with_floor(1 << 20, None, None).unwrap(),
            1 << 20,
            "no floor"
        );
        let err = with_floor(1 << 20, xfs, r(1 << 20, 100 << 20).as_ref()).unwrap_err();
        assert!(
            matches!(err, CsiError::OutOfRange(ref m) if m.contains("xfs") && m.contains("300000000")),
            "{err:?}"
        );
    }
}
