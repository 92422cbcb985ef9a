//! The access token an engine presents to servers in `--access published` mode
//! (ENBD_OPT_ACCESS, right after STARTTLS): the per-attachment secret the controller put in
//! the volume's `publish_context` at ControllerPublishVolume.
//!
//! Invariants: the token is sent only over TLS unless `allow_plaintext` (a lab) says
//! otherwise; it never reaches a log line, an error message or `Debug` output.

use std::fmt;

use enbd_proto::wire::AccessToken;

/// The token and where it may be sent.
#[derive(Clone)]
pub struct AccessCredential {
    token: AccessToken,
    /// Send the token on a connection without TLS (a lab only).
    pub allow_plaintext: bool,
}

impl AccessCredential {
    /// A credential from the token's text (printable ASCII, at most 256 bytes).
    pub fn new(token: &str, allow_plaintext: bool) -> Result<Self, String> {
        let token = AccessToken::new(token.as_bytes().to_vec()).map_err(|_| {
            "the access token is not 1 to 256 printable ASCII characters".to_owned()
        })?;
        Ok(Self {
            token,
            allow_plaintext,
        })
    }

    pub(crate) fn token(&self) -> &AccessToken {
        &self.token
    }
}

impl fmt::Debug for AccessCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessCredential")
            .field("token", &"<redacted>")
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}
