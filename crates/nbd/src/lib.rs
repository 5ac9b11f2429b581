//! blockmirror's NBD server.
//!
//! - [`proto`]: the wire format (constants, raw headers, validated commands, encoders).
//! - [`handshake`]: fixed-newstyle option haggling up to NBD_OPT_GO / EXPORT_NAME.
//! - [`server`]: listeners, connections, and the concurrent transmission phase.
//! - [`export`]: the [`Export`] trait a volume implements to be served.
//! - [`tls`]: per-export TLS modes ([`TlsMode`]) and the [`TlsSource`] STARTTLS uses.

pub mod export;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;

pub use export::{CmdKind, Export, StatusExtent};
pub use handshake::Exports;
pub use proto::Errno;
pub use server::{serve, serve_connection, ListenAddr, Listener};
pub use tls::{TlsMode, TlsSource};
