//! Why the receiver refused a link or one of its requests, typed, with the
//! NBD errno each one is answered with.

use blockmirror_core::Relation;
use blockmirror_nbd::Errno;
use blockmirror_repl::Frame;
use blockmirror_storage::StorageError;

use crate::volume::meta_file::MetaFileError;

/// Why the receiver refused a link or one of its requests. Each names the
/// volume and the primary node (`peer`), and the offset where there is one;
/// the message goes to the primary in an Error or Nack frame, and to the log.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("volume {volume} is a primary on this node (promoted); it takes no replication")]
    Promoted { volume: String, peer: String },
    #[error(
        "volume {volume}: generation check refused the primary ({}: ours {ours}, primary {theirs}){}",
        .relation.as_str(),
        if *.relation == Relation::SplitBrain {
            "; split brain: resolve with `blockmirror resync --discard-local` on one side"
        } else {
            ""
        }
    )]
    Generations {
        volume: String,
        peer: String,
        relation: Relation,
        ours: String,
        theirs: String,
    },
    #[error(
        "volume {volume}: primary {peer} comes with fencing epoch {epoch}, older than epoch \
         {newest} known here (a newer primary was elected): refused"
    )]
    StaleEpoch {
        volume: String,
        peer: String,
        epoch: u64,
        newest: u64,
    },
    #[error(
        "volume {volume}: cluster mode, and this node has not read the cluster's epoch yet; \
         primary {peer} is refused until it has"
    )]
    EpochUnknown { volume: String, peer: String },
    /// TLS alone authenticates links here, and the primary's certificate
    /// does not name the node its Hello claims.
    #[error(
        "primary {peer:?} (TLS alone authenticates links here): {reason}; its certificate \
         must name its node"
    )]
    CertificateName { peer: String, reason: String },
    #[error("volume {volume} is already fed by primary {current}")]
    AlreadyFed {
        volume: String,
        peer: String,
        current: String,
    },
    #[error("volume {volume}, primary {peer}: range {offset}+{len} past the end ({size})")]
    OutOfRange {
        volume: String,
        peer: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// Reading for a checksum-resync hash, or applying an operation.
    #[error("primary {peer}: {source}")]
    Storage {
        peer: String,
        #[source]
        source: StorageError,
    },
    #[error("volume {volume}, primary {peer}: storing the mirror state: {source}")]
    StoreState {
        volume: String,
        peer: String,
        #[source]
        source: MetaFileError,
    },
    #[error("volume {volume}, primary {peer}: unexpected {kind} frame on an established link")]
    UnexpectedFrame {
        volume: String,
        peer: String,
        kind: String,
    },
}

impl ReceiveError {
    /// The NBD error number a Nack of this error carries.
    pub fn errno(&self) -> Errno {
        match self {
            ReceiveError::OutOfRange { .. } => Errno::Inval,
            ReceiveError::Storage { source, .. } if source.is_no_space() => Errno::NoSpc,
            ReceiveError::Promoted { .. }
            | ReceiveError::Generations { .. }
            | ReceiveError::AlreadyFed { .. }
            | ReceiveError::StaleEpoch { .. }
            | ReceiveError::EpochUnknown { .. }
            | ReceiveError::CertificateName { .. } => Errno::Perm,
            ReceiveError::UnexpectedFrame { .. } => Errno::Inval,
            ReceiveError::Storage { .. } | ReceiveError::StoreState { .. } => Errno::Io,
        }
    }

    /// The Nack that answers request `id` with this error.
    pub(super) fn nack(&self, id: u64) -> Frame {
        Frame::Nack {
            id,
            errno: self.errno().code(),
            message: self.to_string(),
        }
    }
}
