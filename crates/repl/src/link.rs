//! Buffered frame I/O over a byte stream, for the life of a link after the
//! handshake.
//!
//! [`FrameReader`] reads into one growing buffer and cuts frames out of it
//! without copying payloads. [`FrameWriter`] coalesces small frames (Acks,
//! Pings, headers) into one buffer and sends large Write data as separate
//! iovecs, so a flush is one vectored write for a whole batch.
//!
//! Both are meant for the two halves of a split stream
//! (`tokio::io::split`, or `into_split` on a TCP stream), each owned by its
//! own task.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::compress::{encode_encoded_write_header, EncodedWrite};
use crate::frame::{encode_job_data_header, encode_write_header, Frame, FrameDecoder};
use crate::wire::WireError;

/// Room the reader asks for before each read.
pub const READ_CHUNK: usize = 64 * 1024;
/// Write data up to this size is copied into the coalescing buffer; larger
/// data goes out as its own iovec. (Copying 4 KiB costs less than another
/// iovec and a reference count.)
pub const INLINE_DATA_MAX: usize = 4096;
/// Most iovecs handed to one vectored write (well under Linux's IOV_MAX).
pub const MAX_IOVECS: usize = 64;

/// Why reading a frame failed. Every variant ends the link.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("replication link I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame on the replication link: {0}")]
    Wire(#[from] WireError),
    #[error(
        "peer closed the replication link mid-frame ({buffered} bytes of a partial frame received)"
    )]
    UnexpectedEof { buffered: usize },
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            decoder: FrameDecoder::new(),
        }
    }

    /// The next frame; `Ok(None)` when the peer closed the stream cleanly
    /// between frames. EOF inside a frame is [`LinkError::UnexpectedEof`].
    ///
    /// Cancel-safe: a partial frame stays buffered, so this can sit in a
    /// `select!` beside a watchdog timer. After an error the stream is out of
    /// step; drop the reader.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() && !self.decoder.is_mid_frame() {
                    return Ok(None);
                }
                let header = if self.decoder.is_mid_frame() {
                    crate::wire::HEADER_LEN
                } else {
                    0
                };
                return Err(LinkError::UnexpectedEof {
                    buffered: header + self.buf.len(),
                });
            }
        }
    }

    /// The next frame if one is already complete in the buffer; never reads.
    /// Lets a caller handle everything one read brought before it replies.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, LinkError> {
        Ok(self.decoder.decode(&mut self.buf)?)
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The stream, and any bytes read but not yet decoded.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

/// Queues frames and writes them in batches.
///
/// `queue*` only buffers; [`FrameWriter::flush`] writes everything queued.
/// The caller decides when to flush (typically when its input channel is
/// momentarily empty, so a burst of Acks becomes one write) and can bound
/// memory with [`FrameWriter::buffered`].
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    /// Small frames and headers, not yet sealed into `chunks`.
    staging: BytesMut,
    /// Sealed pieces in wire order: staging runs and Write data.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks` plus `staging`.
    buffered: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            staging: BytesMut::with_capacity(READ_CHUNK),
            chunks: VecDeque::new(),
            buffered: 0,
        }
    }

    /// Queues a frame. A Write's data is referenced, not copied (beyond
    /// [`INLINE_DATA_MAX`] bytes).
    ///
    /// # Panics
    ///
    /// As [`Frame::encode`]: a Write above [`crate::MAX_DATA`] is a bug in
    /// the sender.
    pub fn queue(&mut self, frame: &Frame) {
        match frame {
            Frame::Write {
                id,
                offset,
                fua,
                data,
            } => self.queue_write(*id, *offset, *fua, data.clone()),
            Frame::JobData {
                id,
                link,
                offset,
                data,
            } => {
                // Like a Write: the data is referenced, not copied.
                encode_job_data_header(*id, *link, *offset, data, &mut self.staging);
                self.buffered += crate::wire::HEADER_LEN + crate::wire::LINK_LEN + data.len();
                if data.len() <= INLINE_DATA_MAX {
                    self.staging.extend_from_slice(data);
                } else {
                    self.seal();
                    self.chunks.push_back(data.clone());
                }
            }
            f => {
                let before = self.staging.len();
                f.encode(&mut self.staging);
                self.buffered += self.staging.len() - before;
            }
        }
    }

    /// Queues a Write frame: its header goes in the coalescing buffer, its
    /// data (when larger than [`INLINE_DATA_MAX`]) as its own iovec.
    ///
    /// # Panics
    ///
    /// If `data` is larger than [`crate::MAX_DATA`].
    pub fn queue_write(&mut self, id: u64, offset: u64, fua: bool, data: Bytes) {
        encode_write_header(id, offset, fua, &data, &mut self.staging);
        self.buffered += crate::wire::HEADER_LEN + data.len();
        if data.len() <= INLINE_DATA_MAX {
            self.staging.extend_from_slice(&data);
        } else {
            self.seal();
            self.chunks.push_back(data);
        }
    }

    /// Queues a Write frame whose data is ready for the wire (compressed or
    /// not, checksummed by [`EncodedWrite::new`]): only the header is built
    /// here.
    pub fn queue_encoded_write(&mut self, id: u64, offset: u64, fua: bool, w: &EncodedWrite) {
        encode_encoded_write_header(id, offset, fua, w, &mut self.staging);
        self.buffered += crate::wire::HEADER_LEN + w.payload.len();
        if w.payload.len() <= INLINE_DATA_MAX {
            self.staging.extend_from_slice(&w.payload);
        } else {
            self.seal();
            self.chunks.push_back(w.payload.clone());
        }
    }

    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Writes everything queued with vectored writes, then flushes the
    /// stream.
    ///
    /// Cancel-safe: what was written is dropped from the queue as it goes,
    /// so calling `flush` again resumes where the cancelled one stopped.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.seal();
        while !self.chunks.is_empty() {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut k = 0;
                for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                    *slot = IoSlice::new(chunk);
                    k += 1;
                }
                self.inner.write_vectored(&slices[..k]).await?
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "replication link accepted no bytes",
                ));
            }
            self.consume(n);
        }
        self.inner.flush().await
    }

    /// Queues a frame and flushes.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.queue(frame);
        self.flush().await
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The stream; anything still queued is dropped.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// Moves the staging buffer's bytes to the end of the chunk queue.
    fn seal(&mut self) {
        if !self.staging.is_empty() {
            let run = self.staging.split().freeze();
            self.chunks.push_back(run);
        }
    }

    /// Drops `n` written bytes from the front of the queue.
    fn consume(&mut self, mut n: usize) {
        self.buffered -= n;
        while n > 0 {
            let front = self.chunks.front_mut().expect("wrote more than queued");
            if n < front.len() {
                front.advance(n);
                return;
            }
            n -= front.len();
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ErrorCode;
    use crate::wire::HEADER_LEN;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// A writer that records every write call and what it was given, taking
    /// at most `limit` bytes per call.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<usize>>,
        bytes: Arc<Mutex<Vec<u8>>>,
        limit: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored_inner(&[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored_inner(bufs)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Recorder {
        fn poll_write_vectored_inner(&self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
            *self.calls.lock().unwrap() += 1;
            let mut left = self.limit.unwrap_or(usize::MAX);
            let mut out = self.bytes.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                out.extend_from_slice(&b[..take]);
                n += take;
                left -= take;
            }
            Poll::Ready(Ok(n))
        }
    }

    fn some_frames() -> Vec<Frame> {
        vec![
            Frame::Ack { id: 1 },
            Frame::Write {
                id: 2,
                offset: 4096,
                fua: true,
                data: Bytes::from(vec![0x5a; 3 * INLINE_DATA_MAX]),
            },
            Frame::Nack {
                id: 3,
                errno: 5,
                message: "EIO at offset 8192".into(),
            },
            Frame::Write {
                id: 4,
                offset: 0,
                fua: false,
                data: Bytes::from_static(b"small"),
            },
            Frame::Flush { id: 5 },
            Frame::JobData {
                id: 6,
                link: 7,
                offset: 8192,
                data: Bytes::from(vec![0x6b; 2 * INLINE_DATA_MAX]),
            },
            Frame::JobData {
                id: 8,
                link: 9,
                offset: 0,
                data: Bytes::from_static(b"tiny"),
            },
            Frame::Error {
                id: 0,
                code: ErrorCode::ShuttingDown,
                message: "bye".into(),
            },
        ]
    }

    #[tokio::test]
    async fn many_acks_coalesce_into_one_write() {
        let rec = Recorder::default();
        let mut w = FrameWriter::new(rec.clone());
        for id in 0..1000 {
            w.queue(&Frame::Ack { id });
        }
        assert_eq!(w.buffered(), 1000 * HEADER_LEN);
        w.flush().await.unwrap();
        assert_eq!(*rec.calls.lock().unwrap(), 1);
        assert_eq!(w.buffered(), 0);

        let bytes = rec.bytes.lock().unwrap().clone();
        let mut r = FrameReader::new(&bytes[..]);
        for id in 0..1000 {
            assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { id }));
        }
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn write_data_is_sent_as_its_own_iovec_and_survives_short_writes() {
        for limit in [None, Some(1), Some(7), Some(HEADER_LEN + 1)] {
            let rec = Recorder {
                limit,
                ..Recorder::default()
            };
            let mut w = FrameWriter::new(rec.clone());
            for f in some_frames() {
                w.queue(&f);
            }
            // Big write data is a separate chunk, not copied into staging.
            assert!(w
                .chunks
                .iter()
                .any(|c| c.len() == 3 * INLINE_DATA_MAX && c[0] == 0x5a));
            w.flush().await.unwrap();
            if limit.is_none() {
                assert_eq!(*rec.calls.lock().unwrap(), 1);
            }
            let bytes = rec.bytes.lock().unwrap().clone();
            let mut r = FrameReader::new(&bytes[..]);
            for f in some_frames() {
                assert_eq!(r.next().await.unwrap(), Some(f));
            }
            assert!(r.next().await.unwrap().is_none());
        }
    }

    /// Writes made ready by the pipeline (compressed or not) come out of
    /// the reader as the plain Writes they stand for.
    #[tokio::test]
    async fn encoded_writes_read_back_as_plain_writes() {
        use crate::compress::EncodedWrite;
        use crate::wire::Codec;
        let rec = Recorder::default();
        let mut w = FrameWriter::new(rec.clone());
        let data = Bytes::from(vec![0x11; 64 * 1024]);
        let small = Bytes::from_static(b"0123456789");
        let mut want = Vec::new();
        for (id, codec) in Codec::ALL.into_iter().enumerate() {
            for d in [&data, &small] {
                let e = EncodedWrite::new(d.clone(), codec);
                w.queue_encoded_write(id as u64, 4096, true, &e);
                want.push(Frame::Write {
                    id: id as u64,
                    offset: 4096,
                    fua: true,
                    data: d.clone(),
                });
            }
        }
        w.flush().await.unwrap();
        let bytes = rec.bytes.lock().unwrap().clone();
        assert!(bytes.len() < 2 * data.len(), "compressed on the wire");
        let mut r = FrameReader::new(&bytes[..]);
        for f in want {
            assert_eq!(r.next().await.unwrap(), Some(f));
        }
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_across_a_duplex_in_small_pieces() {
        let (a, mut b) = tokio::io::duplex(16);
        let writer = tokio::spawn(async move {
            let mut all = BytesMut::new();
            for f in some_frames() {
                f.encode(&mut all);
            }
            b.write_all(&all).await.unwrap();
        });
        let mut r = FrameReader::new(a);
        for f in some_frames() {
            assert_eq!(r.next().await.unwrap(), Some(f));
        }
        writer.await.unwrap();
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn next_buffered_decodes_what_one_read_brought_and_never_reads() {
        let frames = some_frames();
        let mut all = BytesMut::new();
        for f in &frames {
            f.encode(&mut all);
        }
        // Everything arrives at once; the peer stays open.
        let (a, mut b) = tokio::io::duplex(all.len() * 2);
        b.write_all(&all).await.unwrap();
        let mut r = FrameReader::new(a);
        assert!(r.next_buffered().unwrap().is_none(), "nothing read yet");
        let mut got = vec![r.next().await.unwrap().unwrap()];
        while let Some(f) = r.next_buffered().unwrap() {
            got.push(f);
        }
        assert_eq!(got, frames);
        // Nothing more buffered, and it returned without waiting on the open peer.
        assert!(r.next_buffered().unwrap().is_none());
        drop(b);
    }

    #[tokio::test]
    async fn eof_mid_frame_is_not_a_clean_close() {
        let mut all = BytesMut::new();
        Frame::Ack { id: 1 }.encode(&mut all);
        Frame::Write {
            id: 2,
            offset: 0,
            fua: false,
            data: Bytes::from(vec![1; 100]),
        }
        .encode(&mut all);
        let whole = all.len();
        // Cut inside the second header, and inside its payload.
        for cut in [HEADER_LEN + 10, whole - 1] {
            let mut r = FrameReader::new(&all[..cut]);
            assert_eq!(r.next().await.unwrap(), Some(Frame::Ack { id: 1 }));
            match r.next().await {
                Err(LinkError::UnexpectedEof { buffered }) => {
                    assert_eq!(buffered, cut - HEADER_LEN)
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // An empty stream is a clean close.
        let mut r = FrameReader::new(&[][..]);
        assert!(r.next().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_bad_frame_is_an_error() {
        let mut all = BytesMut::new();
        Frame::Ack { id: 1 }.encode(&mut all);
        all[HEADER_LEN - 1] ^= 1;
        let mut r = FrameReader::new(&all[..]);
        assert!(matches!(
            r.next().await,
            Err(LinkError::Wire(WireError::HeaderChecksum { .. }))
        ));
    }
}
