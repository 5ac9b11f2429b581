//! blockmirror's replication link: what a primary and its mirrors say to each
//! other, byte for byte.
//!
//! - [`wire`]: the byte layout. A 40-byte header (magic `BMRP`, version,
//!   kind, flags, request id, offset, length, payload length, payload crc32c,
//!   header crc32c) and a payload. [`RawHeader`] decodes bytes and judges
//!   magic, version and header checksum, then the kind's fields and payload
//!   bound; [`Kind`], [`Codec`] (a Write's compression flags) and
//!   [`WireError`] live here too. Depends on nothing else in the crate.
//! - [`frame`]: validated messages on top of [`wire`]. [`Frame`] is a parsed
//!   message; [`FrameDecoder`] cuts frames out of a byte buffer, checking each
//!   header before it waits for (or allocates) the payload.
//! - [`handshake`]: the start of a link. The primary says which volume it
//!   serves; the mirror checks it has a big enough volume of that name; each
//!   side proves knowledge of the shared secret with an HMAC over both nonces
//!   and both hellos ([`connect`] on the primary, [`accept`] on the mirror).
//! - [`compress`]: optional LZ4 or zstd compression of Write data (flags on
//!   the Write frame; the decoder yields the decompressed data), on top of
//!   [`wire`]; [`frame`] uses it to decode Writes.
//!
//! Module graph (an arrow points at what a module uses):
//! `handshake -> frame`, `link -> frame`, `frame -> compress -> wire`, and
//! every module `-> wire`; nothing points back up.
//! - [`link`]: buffered frame I/O for the rest of the link's life:
//!   [`FrameReader`] (clean EOF between frames is `None`; EOF inside a frame
//!   is an error) and [`FrameWriter`] (small frames coalesce into one buffer,
//!   write data goes out as its own iovec without a copy).
//! - [`stream`]: the stream under it all, [`LinkStream`]: plain TCP or TLS
//!   (rustls; the primary is the client). The HMAC handshake runs inside
//!   TLS when both are configured.
//!
//! After the handshake the link carries `Write`, `Trim`, `WriteZeroes` and
//! `Flush` requests from the primary, each with a request id that the mirror
//! echoes in an `Ack` or a `Nack`; `Ping`/`Pong` measure liveness; `Error` is
//! fatal and is the last frame its sender writes. Right after the handshake
//! the mirror may list, in `Divergence` frames, the regions where its data may
//! differ from the primary's (a demoted primary's out-of-sync regions), which
//! the primary then copies too.

#![forbid(unsafe_code)]

pub mod compress;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod stream;
pub mod wire;

pub use compress::{encode_encoded_write_header, EncodedWrite};
pub use frame::{
    divergence_frames, encode_write_header, hash_count, ErrorCode, Frame, FrameDecoder,
    JobErrorCode, SyncPhase,
};
pub use handshake::{
    accept, accept_any, accept_with, connect, connect_for, connect_with, AuthFailure,
    ConnectOptions, HandshakeError, KeyMode, LinkKey, Malformation, NodeHello, PeerInfo, Purpose,
    VolumeIdentity, EXPORTER_LABEL, EXPORTER_LEN, HANDSHAKE_VERSION, HISTORY_LEN,
};
pub use link::{FrameReader, FrameWriter, LinkError};
pub use stream::{LinkRead, LinkStream, LinkWrite};
pub use wire::{
    Codec, DecompressError, Kind, PayloadError, RangeError, RawHeader, WireError, DIGEST_LEN,
    FLAG_FUA, FLAG_LZ4, FLAG_NO_TRIM, FLAG_ZSTD, HASH_LEN, HEADER_LEN, MAGIC, MAX_CONTROL_PAYLOAD,
    MAX_DATA, MAX_DIVERGENCE_RANGES, MAX_HASH_BLOCK, MAX_JOB_HASHES, MIN_HASH_BLOCK,
    SYNC_HISTORY_LEN, SYNC_STATE_LEN, VERSION,
};
