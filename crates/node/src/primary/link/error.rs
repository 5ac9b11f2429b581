//! Why a link's connection failed, or a request did not reach the mirror:
//! typed, so the state machine gets a [`FailCause`] and operators get a
//! message naming the volume, the peer and, for a request, its offset.

use std::net::SocketAddr;
use std::time::Duration;

use blockmirror_core::link::FailCause;

/// Why a connection attempt or a live connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("connect {addr}: {message}")]
    Connect { addr: SocketAddr, message: String },
    #[error("{message}")]
    Tls { addr: SocketAddr, message: String },
    #[error("handshake with {addr}: {message}")]
    Handshake { addr: SocketAddr, message: String },
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("mirror refused the link: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no Divergence report within {0:?}")]
    DivergenceTimeout(Duration),
    #[error("expected the mirror's Divergence report, got {0}")]
    NoDivergence(String),
    #[error("mirror failed request {id} with errno {errno}: {message}")]
    Nack {
        id: u64,
        errno: u32,
        message: String,
    },
    #[error("mirror closed the link: {code}: {message}")]
    PeerError { code: String, message: String },
    #[error("unexpected {0} frame from the mirror")]
    UnexpectedFrame(String),
    #[error("mirror closed the connection")]
    Closed,
    #[error("connection: {0}")]
    Io(String),
    #[error("request {id} unanswered for {waited_ms} ms (mirror_timeout)")]
    Timeout { id: u64, waited_ms: u64 },
    /// A sibling in the consistency group lost its mirror.
    #[error("{0}")]
    Group(String),
    #[error("node shutting down")]
    Shutdown,
    #[error("the volume is a mirror on this node now")]
    Parked,
}

impl LinkError {
    /// What the state machine is told about a live connection that ended so.
    pub fn cause(&self) -> FailCause {
        match self {
            LinkError::Timeout { .. } => FailCause::Timeout,
            LinkError::Group(_) => FailCause::Group,
            _ => FailCause::Peer,
        }
    }

    /// Expected ends (shutdown, parking) are logged at info, not counted.
    pub fn expected(&self) -> bool {
        matches!(self, LinkError::Shutdown | LinkError::Parked)
    }
}

/// Why a mirror did not take a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorFailure {
    #[error("volume {volume}, mirror {peer}, offset {offset}: {error}")]
    Failed {
        volume: String,
        peer: String,
        offset: u64,
        error: LinkError,
    },
    #[error("volume {volume}, mirror {peer}: not connected; change recorded for resync")]
    Marked { volume: String, peer: String },
    #[error("volume {volume}, mirror {peer}: request dropped")]
    Dropped { volume: String, peer: String },
}
