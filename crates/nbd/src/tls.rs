//! TLS for NBD exports: per-export modes and where the server config comes from.

use std::sync::Arc;

/// How an export takes TLS (NBD_OPT_STARTTLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS is refused (NBD_REP_ERR_POLICY); plaintext only.
    #[default]
    Off,
    /// Plaintext or TLS, as the client chooses.
    Allow,
    /// TLS only: before STARTTLS, options get NBD_REP_ERR_TLS_REQD.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::Allow => "allow",
            TlsMode::Require => "require",
        }
    }

    pub fn from_name(s: &str) -> Option<TlsMode> {
        match s {
            "off" => Some(TlsMode::Off),
            "allow" => Some(TlsMode::Allow),
            "require" => Some(TlsMode::Require),
            _ => None,
        }
    }
}

/// Where the server gets its TLS config at each STARTTLS (so a reload
/// applies to the next connection).
pub trait TlsSource: Send + Sync {
    fn server_config(&self) -> Option<Arc<rustls::ServerConfig>>;
}
