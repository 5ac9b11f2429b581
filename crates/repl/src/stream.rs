//! The byte stream under a replication or job connection: plain TCP, or
//! TLS over TCP (the primary is the TLS client, the mirror the server).
//!
//! One enum rather than a type parameter, so the link code above keeps one
//! shape; a plain stream splits into TCP's own halves (no lock), a TLS one
//! with `tokio::io::split`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A replication connection's stream.
pub enum LinkStream {
    Plain(TcpStream),
    /// The primary's end of a TLS connection.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// The mirror's end.
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The reading half of a [`LinkStream`].
pub enum LinkRead {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<LinkStream>),
}

/// The writing half of a [`LinkStream`].
pub enum LinkWrite {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<LinkStream>),
}

impl LinkStream {
    /// TLS client handshake on `tcp`: the server's certificate must chain
    /// to `config`'s roots and name `name`.
    pub async fn connect_tls(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<LinkStream> {
        let s = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Ok(LinkStream::Client(Box::new(s)))
    }

    /// TLS server handshake on `tcp` (`config` decides on client certificates).
    pub async fn accept_tls(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<LinkStream> {
        let s = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        Ok(LinkStream::Server(Box::new(s)))
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, LinkStream::Plain(_))
    }

    /// The peer's certificate chain, on a TLS stream.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            LinkStream::Plain(_) => None,
            LinkStream::Client(s) => s.get_ref().1.peer_certificates(),
            LinkStream::Server(s) => s.get_ref().1.peer_certificates(),
        }
    }

    /// [`crate::handshake::EXPORTER_LEN`] bytes of the TLS session's
    /// keying material exporter (RFC 5705) under
    /// [`crate::handshake::EXPORTER_LABEL`]; `None` on a plain stream.
    pub fn exporter(
        &self,
    ) -> Result<Option<[u8; crate::handshake::EXPORTER_LEN]>, crate::HandshakeError> {
        let out = [0u8; crate::handshake::EXPORTER_LEN];
        let label = crate::handshake::EXPORTER_LABEL;
        let r = match self {
            LinkStream::Plain(_) => return Ok(None),
            LinkStream::Client(s) => s.get_ref().1.export_keying_material(out, label, None),
            LinkStream::Server(s) => s.get_ref().1.export_keying_material(out, label, None),
        };
        r.map(Some)
            .map_err(|e| crate::HandshakeError::Exporter(e.to_string()))
    }

    /// The handshake key for this stream and `secret` (the node's
    /// `secret_file`, if any): see [`crate::LinkKey::derive`].
    pub fn link_key(&self, secret: Option<&[u8]>) -> Result<crate::LinkKey, crate::HandshakeError> {
        crate::LinkKey::derive(secret, self.exporter()?.as_ref())
    }

    pub fn into_split(self) -> (LinkRead, LinkWrite) {
        match self {
            LinkStream::Plain(s) => {
                let (r, w) = s.into_split();
                (LinkRead::Plain(r), LinkWrite::Plain(w))
            }
            s => {
                let (r, w) = tokio::io::split(s);
                (LinkRead::Tls(r), LinkWrite::Tls(w))
            }
        }
    }
}

impl From<TcpStream> for LinkStream {
    fn from(s: TcpStream) -> Self {
        LinkStream::Plain(s)
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LinkStream::Plain($s) => $e,
            LinkStream::Client($s) => $e,
            LinkStream::Server($s) => $e,
        }
    };
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            LinkStream::Plain(s) => s.is_write_vectored(),
            LinkStream::Client(s) => s.is_write_vectored(),
            LinkStream::Server(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

impl AsyncRead for LinkRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkRead::Plain(s) => Pin::new(s).poll_read(cx, buf),
            LinkRead::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for LinkWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(s) => Pin::new(s).poll_write(cx, buf),
            LinkWrite::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            LinkWrite::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            LinkWrite::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            LinkWrite::Plain(s) => s.is_write_vectored(),
            LinkWrite::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(s) => Pin::new(s).poll_flush(cx),
            LinkWrite::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            LinkWrite::Plain(s) => Pin::new(s).poll_shutdown(cx),
            LinkWrite::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
