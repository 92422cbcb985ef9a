//! Validated names for volumes and snapshots.
//!
//! Invariant: a [`VolumeName`] is a single, non-hidden path component made of ASCII letters,
//! digits, `.`, `_` and `-`, at most 128 bytes, so joining it onto the data directory can
//! never escape it (no `/`, no `..`, no leading `.`, no NUL).

use std::fmt;

/// Longest accepted name; CSI names from external-provisioner are ~40 bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("name must start with a letter or digit")]
    BadStart,
    #[error("name contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
}

/// A validated volume or snapshot name (see the module invariant).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let first = s.chars().next().ok_or(NameError::Empty)?;
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(c));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_csi_style_names() {
        for ok in [
            "pvc-1b2c3d4e-aaaa-bbbb-cccc-0123456789ab",
            "demo",
            "a",
            "v1.2_x",
            "Snap-1",
        ] {
            assert_eq!(
                VolumeName::parse(ok).map(|n| n.to_string()),
                Ok(ok.to_owned())
            );
        }
    }

    #[test]
    fn refuses_anything_that_could_escape_or_hide() {
        assert_eq!(VolumeName::parse(""), Err(NameError::Empty));
        assert_eq!(VolumeName::parse(".."), Err(NameError::BadStart));
        assert_eq!(VolumeName::parse(".hidden"), Err(NameError::BadStart));
        assert_eq!(
            VolumeName::parse("a/../../etc"),
            Err(NameError::BadChar('/'))
        );
        assert_eq!(VolumeName::parse("a\0b"), Err(NameError::BadChar('\0')));
        assert_eq!(VolumeName::parse("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(VolumeName::parse("é"), Err(NameError::BadStart));
        assert_eq!(VolumeName::parse(&"a".repeat(129)), Err(NameError::TooLong));
        assert!(VolumeName::parse(&"a".repeat(128)).is_ok());
    }
}
