//! Secrets the daemon holds for a volume (the per-attachment access token): kept in the
//! state file, passed from the CSI layer to the engine, never shown by `Debug`. A module of
//! its own so that every layer may name the type without depending on another layer.

use serde::{Deserialize, Serialize};

/// A secret kept in the state file (mode 0600) and handed to the engine; `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for the engine only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
