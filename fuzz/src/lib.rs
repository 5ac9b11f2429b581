//! Helpers shared by the fuzz targets: a runtime to drive async decoders, a
//! stream fed from a byte slice, and framing with good checksums (so the
//! fuzzer reaches the parsers behind the CRCs instead of stopping at them).

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use blockmirror_repl::wire::RawHeader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::runtime::Runtime;

/// One current-thread runtime per fuzzing process.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A peer that sends `input` (in pieces of `chunk` bytes, so partial reads
/// are exercised), then EOF, and swallows whatever is written to it.
pub struct SliceStream<'a> {
    input: &'a [u8],
    chunk: usize,
}

impl<'a> SliceStream<'a> {
    pub fn new(input: &'a [u8], chunk: usize) -> Self {
        Self {
            input,
            chunk: chunk.max(1),
        }
    }
}

impl AsyncRead for SliceStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.input.len().min(self.chunk).min(buf.remaining());
        let (head, rest) = self.input.split_at(n);
        buf.put_slice(head);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SliceStream<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Reads big-endian integers off the front of the input, zero when it runs out.
pub struct Take<'a>(pub &'a [u8]);

impl<'a> Take<'a> {
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        h
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_be_bytes(b)
    }
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_be_bytes(b)
    }
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let s = self.bytes(8);
        b[..s.len()].copy_from_slice(s);
        u64::from_be_bytes(b)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.0;
        self.0 = &[];
        r
    }
}

/// A replication frame with the given header fields and payload, with good
/// header and payload checksums.
#[allow(clippy::too_many_arguments)]
pub fn framed(kind: u8, flags: u16, id: u64, offset: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let h = RawHeader {
        kind,
        flags,
        id,
        offset,
        len,
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
    };
    let mut out = h.to_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Rewrites the trailing 4-byte little-endian CRC32C of a file format whose
/// checksum covers everything before it (bitmap, activity record).
pub fn fix_trailing_crc(b: &mut [u8]) {
    if b.len() >= 4 {
        let body = b.len() - 4;
        let crc = crc32c::crc32c(&b[..body]);
        b[body..].copy_from_slice(&crc.to_le_bytes());
    }
}
