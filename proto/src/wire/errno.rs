//! The one mapping between NBD error values and Linux errno numbers, used by the server (a
//! backend's errno → the value it puts in a reply) and by the client (a reply's value → the
//! errno it reports upward).
//!
//! Invariant: both directions follow the "Error values" section of the NBD protocol
//! document; where it leaves a choice the choice is made here once:
//! - `EDQUOT` and `EFBIG` are `NBD_ENOSPC` (the document says a server SHOULD map them so);
//!   a *request* past the end of the export is refused by the server's session before any
//!   backend sees it: `NBD_ENOSPC` for writes, `NBD_EINVAL` for reads and trims;
//! - `EROFS` and `EACCES` are `NBD_EPERM` (the document's value for writing a read-only
//!   export);
//! - a backend's `EOVERFLOW` is `NBD_EINVAL`: the document reserves `NBD_EOVERFLOW` for a
//!   READ with `NBD_CMD_FLAG_DF` that cannot be sent unfragmented, which the session decides
//!   itself;
//! - every other errno without an NBD value is `NBD_EIO`;
//! - a client reads an NBD value it has no name for as `EINVAL`, as the document requires.

use super::types::NbdError;

/// Linux errno numbers the mapping mentions (the NBD values equal the Linux ones).
mod linux {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    /// `ENOTSUP` and `EOPNOTSUPP` are the same number on Linux.
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

impl NbdError {
    /// The NBD error a server sends for a (positive) Linux errno from its backend.
    pub const fn from_errno(errno: i32) -> Self {
        use linux::*;
        match errno {
            EPERM | EACCES | EROFS => Self::Perm,
            ENOMEM => Self::NoMem,
            EINVAL | EOVERFLOW => Self::Inval,
            ENOSPC | EDQUOT | EFBIG => Self::NoSpc,
            EOPNOTSUPP => Self::NotSup,
            ESHUTDOWN => Self::Shutdown,
            _ => Self::Io,
        }
    }

    /// The Linux errno a client reports for this NBD error: the same number for every value
    /// the document defines, `EINVAL` for one it does not.
    pub const fn to_errno(self) -> i32 {
        match self {
            Self::Perm => linux::EPERM,
            Self::Io => linux::EIO,
            Self::NoMem => linux::ENOMEM,
            Self::Inval | Self::Unknown(_) => linux::EINVAL,
            Self::NoSpc => linux::ENOSPC,
            Self::Overflow => linux::EOVERFLOW,
            Self::NotSup => linux::EOPNOTSUPP,
            Self::Shutdown => linux::ESHUTDOWN,
        }
    }

    /// The document's name for this value (`NBD_ENOSPC`), or `None` for one it does not
    /// define.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::Perm => "NBD_EPERM",
            Self::Io => "NBD_EIO",
            Self::NoMem => "NBD_ENOMEM",
            Self::Inval => "NBD_EINVAL",
            Self::NoSpc => "NBD_ENOSPC",
            Self::Overflow => "NBD_EOVERFLOW",
            Self::NotSup => "NBD_ENOTSUP",
            Self::Shutdown => "NBD_ESHUTDOWN",
            Self::Unknown(_) => return None,
        })
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.raw()),
            None => write!(f, "unknown NBD error {}", self.raw()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every named value reads back as the errno of the same number, as the document's
    /// numbering promises; the server maps that errno back to the same value.
    #[test]
    fn named_values_are_their_own_errno() {
        for e in [
            NbdError::Perm,
            NbdError::Io,
            NbdError::NoMem,
            NbdError::Inval,
            NbdError::NoSpc,
            NbdError::NotSup,
            NbdError::Shutdown,
        ] {
            assert_eq!(e.to_errno() as u32, e.raw(), "{e}");
            assert_eq!(NbdError::from_errno(e.to_errno()), e, "{e}");
        }
        // The one exception: a backend's EOVERFLOW is not the DF-read overflow.
        assert_eq!(NbdError::Overflow.to_errno(), 75);
        assert_eq!(NbdError::from_errno(75), NbdError::Inval);
    }

    #[test]
    fn display_names_the_value() {
        assert_eq!(NbdError::NoSpc.to_string(), "NBD_ENOSPC (28)");
        assert_eq!(
            NbdError::Unknown(9999).to_string(),
            "unknown NBD error 9999"
        );
    }
}
