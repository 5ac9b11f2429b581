//! The NBD server driven over raw bytes: handshake haggling, transmission,
//! malformed input, concurrency and out-of-order replies.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockmirror_nbd::proto::*;
use blockmirror_nbd::{serve_connection, Errno, Export, Exports, StatusExtent};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

/// An in-memory export. FLUSH waits until `release_flush` is notified, so
/// tests can hold a request in flight.
struct MemExport {
    name: String,
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flush_gate: tokio::sync::Notify,
    gate_flush: bool,
    flushes: AtomicU64,
}

impl MemExport {
    fn new(name: &str, size: usize) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            data: Mutex::new(vec![0; size]),
            read_only: false,
            flush_gate: tokio::sync::Notify::new(),
            gate_flush: false,
            flushes: AtomicU64::new(0),
        })
    }
}

impl Export for MemExport {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let d = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..offset as usize + len as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), Errno> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), Errno> {
        if self.gate_flush {
            self.flush_gate.notified().await;
        }
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), Errno> {
        self.write_zeroes(offset, len, true, false).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _t: bool, _f: bool) -> Result<(), Errno> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    async fn block_status(&self, _offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        Ok(vec![
            StatusExtent {
                len: len / 2,
                flags: 0,
            },
            StatusExtent {
                len: len - len / 2,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ])
    }
}

/// A minimal raw client.
struct Client {
    s: DuplexStream,
}

struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

impl Client {
    async fn connect(export: Arc<MemExport>) -> (Client, tokio::task::JoinHandle<()>) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let exports = Exports::new([export]);
        let server = tokio::spawn(async move {
            let _ = serve_connection(b, &exports, CancellationToken::new()).await;
        });
        let mut c = Client { s: a };
        assert_eq!(c.s.read_u64().await.unwrap(), NBD_MAGIC);
        assert_eq!(c.s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = c.s.read_u16().await.unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.s.write_u32(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .await
            .unwrap();
        (c, server)
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode(&mut b);
        b.put_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    async fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.s.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
        let option = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply { option, kind, data }
    }

    /// STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, then GO.
    async fn go_structured(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(self.opt_reply().await.kind, REP_ACK);
        let mut m = BytesMut::new();
        MetaContextRequest {
            export: name.into(),
            queries: vec![BASE_ALLOCATION.into()],
        }
        .encode(&mut m);
        self.option(OPT_SET_META_CONTEXT, &m).await;
        let r = self.opt_reply().await;
        assert_eq!(r.kind, REP_META_CONTEXT);
        assert_eq!(&r.data[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(self.opt_reply().await.kind, REP_ACK);
        self.go(name).await
    }

    async fn go(&mut self, name: &str) -> (u64, u16) {
        let mut b = BytesMut::new();
        InfoRequest {
            export: name.into(),
            infos: vec![INFO_BLOCK_SIZE],
        }
        .encode(&mut b);
        self.option(OPT_GO, &b).await;
        let mut size_flags = None;
        let mut block = None;
        loop {
            let r = self.opt_reply().await;
            assert_eq!(r.option, OPT_GO);
            match r.kind {
                REP_INFO => {
                    let t = u16::from_be_bytes([r.data[0], r.data[1]]);
                    if t == INFO_EXPORT {
                        let size = u64::from_be_bytes(r.data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                        size_flags = Some((size, flags));
                    } else if t == INFO_BLOCK_SIZE {
                        block = Some(r.data.clone());
                    }
                }
                REP_ACK => break,
                k => panic!("unexpected reply {k:#x}"),
            }
        }
        let block = block.expect("block size info");
        let min = u32::from_be_bytes(block[2..6].try_into().unwrap());
        let pref = u32::from_be_bytes(block[6..10].try_into().unwrap());
        let max = u32::from_be_bytes(block[10..14].try_into().unwrap());
        assert_eq!((min, pref, max), (512, 4096, 32 << 20));
        size_flags.expect("export info")
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut b = BytesMut::new();
        RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode(&mut b);
        b.put_slice(data);
        self.s.write_all(&b).await.unwrap();
    }

    /// A simple reply: (cookie, error).
    async fn simple(&mut self) -> (u64, u32) {
        assert_eq!(self.s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let err = self.s.read_u32().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        (cookie, err)
    }

    /// A structured chunk: (flags, type, cookie, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.s.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
        let flags = self.s.read_u16().await.unwrap();
        let kind = self.s.read_u16().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut d = vec![0; len as usize];
        self.s.read_exact(&mut d).await.unwrap();
        (flags, kind, cookie, d)
    }
}

#[tokio::test]
async fn handshake_haggling_and_bad_options() {
    let (mut c, _srv) = Client::connect(MemExport::new("db", 1 << 20)).await;
    // Unknown option: ERR_UNSUP, payload skipped, the session carries on.
    c.option(0x4242, b"junk payload").await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_UNSUP);
    // Extended headers and STARTTLS are not offered.
    c.option(OPT_EXTENDED_HEADERS, &[]).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_UNSUP);
    // SET_META_CONTEXT before STRUCTURED_REPLY is out of order.
    let mut m = BytesMut::new();
    MetaContextRequest {
        export: "db".into(),
        queries: vec![BASE_ALLOCATION.into()],
    }
    .encode(&mut m);
    c.option(OPT_SET_META_CONTEXT, &m).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_INVALID);
    // LIST names the export.
    c.option(OPT_LIST, &[]).await;
    let r = c.opt_reply().await;
    assert_eq!(r.kind, REP_SERVER);
    assert_eq!(&r.data[4..], b"db");
    assert_eq!(c.opt_reply().await.kind, REP_ACK);
    // INFO on an unknown export, then a truncated INFO payload.
    let mut b = BytesMut::new();
    InfoRequest {
        export: "nope".into(),
        infos: vec![],
    }
    .encode(&mut b);
    c.option(OPT_INFO, &b).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_UNKNOWN);
    c.option(OPT_INFO, &[0, 0, 0, 9, b'd']).await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_INVALID);
    // A huge option is refused without being buffered.
    c.option(OPT_GO, &vec![0u8; (MAX_OPTION_LEN + 1) as usize])
        .await;
    assert_eq!(c.opt_reply().await.kind, REP_ERR_TOO_BIG);
    // And GO still works afterwards.
    let (size, flags) = c.go("db").await;
    assert_eq!(size, 1 << 20);
    for f in [
        TF_HAS_FLAGS,
        TF_SEND_FLUSH,
        TF_SEND_FUA,
        TF_SEND_TRIM,
        TF_SEND_WRITE_ZEROES,
        TF_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing");
    }
    assert_eq!(flags & TF_READ_ONLY, 0);
}

#[tokio::test]
async fn export_name_with_no_zeroes() {
    let (mut c, _srv) = Client::connect(MemExport::new("db", 8192)).await;
    c.option(OPT_EXPORT_NAME, b"db").await;
    assert_eq!(c.s.read_u64().await.unwrap(), 8192);
    let _flags = c.s.read_u16().await.unwrap();
    // No 124 zero bytes: the next thing on the wire is our reply.
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (1, 0));
    let mut d = [1u8; 512];
    c.s.read_exact(&mut d).await.unwrap();
    assert!(d.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn unknown_export_name_closes() {
    let (mut c, srv) = Client::connect(MemExport::new("db", 8192)).await;
    c.option(OPT_EXPORT_NAME, b"other").await;
    srv.await.unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap(), 0);
}

#[tokio::test]
async fn io_and_range_errors_keep_the_stream_in_step() {
    let (mut c, _srv) = Client::connect(MemExport::new("db", 1 << 20)).await;
    c.go_structured("db").await;
    let pattern = vec![0xabu8; 4096];
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 8192, 4096, &pattern)
        .await;
    assert_eq!(c.simple().await, (1, 0));
    // Structured read: one OFFSET_DATA chunk with DONE.
    c.request(CMD_READ, 0, 2, 8192, 4096, &[]).await;
    let (flags, kind, cookie, d) = c.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 8192);
    assert_eq!(&d[8..], &pattern[..]);
    // Write past the end: ENOSPC, payload skipped.
    c.request(CMD_WRITE, 0, 3, (1 << 20) - 512, 4096, &pattern)
        .await;
    assert_eq!(c.simple().await, (3, Errno::NoSpc.code()));
    // Oversized write length: EINVAL, payload skipped, no huge allocation.
    let big = vec![0x11u8; (32 << 20) + 4096];
    c.request(CMD_WRITE, 0, 4, 0, big.len() as u32, &big).await;
    assert_eq!(c.simple().await, (4, Errno::Inval.code()));
    // Read past the end and zero-length read: structured EINVAL.
    c.request(CMD_READ, 0, 5, 1 << 20, 512, &[]).await;
    let (flags, kind, cookie, d) = c.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 5)
    );
    assert_eq!(
        u32::from_be_bytes(d[..4].try_into().unwrap()),
        Errno::Inval.code()
    );
    c.request(CMD_READ, 0, 6, 0, 0, &[]).await;
    assert_eq!(c.chunk().await.1, REPLY_TYPE_ERROR);
    // Unknown command and a bad flag: EINVAL.
    c.request(77, 0, 7, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (7, Errno::Inval.code()));
    c.request(CMD_FLUSH, CMD_FLAG_FUA, 8, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (8, Errno::Inval.code()));
    // Zeroes past the end: ENOSPC; trim past the end: EINVAL.
    c.request(CMD_WRITE_ZEROES, 0, 9, 1 << 20, 512, &[]).await;
    assert_eq!(c.simple().await, (9, Errno::NoSpc.code()));
    c.request(CMD_TRIM, 0, 10, 1 << 20, 512, &[]).await;
    assert_eq!(c.simple().await, (10, Errno::Inval.code()));
    // Write zeroes, then read back zeroes.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 11, 8192, 4096, &[])
        .await;
    assert_eq!(c.simple().await, (11, 0));
    c.request(CMD_READ, 0, 12, 8192, 4096, &[]).await;
    let d = c.chunk().await.3;
    assert!(d[8..].iter().all(|&b| b == 0));
    // Block status with REQ_ONE: exactly one extent.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 13, 0, 65536, &[])
        .await;
    let (flags, kind, cookie, d) = c.chunk().await;
    assert_eq!(
        (flags, kind, cookie),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 13)
    );
    assert_eq!(d.len(), 4 + 8);
    c.request(CMD_BLOCK_STATUS, 0, 14, 0, 65536, &[]).await;
    assert_eq!(c.chunk().await.3.len(), 4 + 16);
    // TRIM is a hint that this export honours.
    c.request(CMD_TRIM, 0, 15, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (15, 0));
    c.request(CMD_DISC, 0, 16, 0, 0, &[]).await;
    let mut b = [0u8; 1];
    assert_eq!(
        c.s.read(&mut b).await.unwrap(),
        0,
        "server closes after DISC"
    );
}

#[tokio::test]
async fn block_status_needs_a_context_and_read_only_refuses_writes() {
    let export = Arc::new(MemExport {
        read_only: true,
        ..Arc::into_inner(MemExport::new("ro", 65536)).unwrap()
    });
    let (mut c, _srv) = Client::connect(export).await;
    let (_, flags) = c.go("ro").await;
    assert_ne!(flags & TF_READ_ONLY, 0);
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (1, Errno::Inval.code()));
    c.request(CMD_WRITE, 0, 2, 0, 512, &[7; 512]).await;
    assert_eq!(c.simple().await, (2, Errno::Perm.code()));
    c.request(CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (3, Errno::Perm.code()));
    // Reads still work.
    c.request(CMD_READ, 0, 4, 0, 512, &[]).await;
    assert_eq!(c.simple().await, (4, 0));
}

#[tokio::test]
async fn replies_go_out_of_order() {
    let export = Arc::new(MemExport {
        gate_flush: true,
        ..Arc::into_inner(MemExport::new("db", 65536)).unwrap()
    });
    let (mut c, _srv) = Client::connect(export.clone()).await;
    c.go("db").await;
    // The flush is held; a later write completes and is answered first.
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    c.request(CMD_WRITE, 0, 2, 0, 512, &[1; 512]).await;
    assert_eq!(c.simple().await, (2, 0));
    export.flush_gate.notify_one();
    assert_eq!(c.simple().await, (1, 0));
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_magic_closes_the_connection() {
    let (mut c, srv) = Client::connect(MemExport::new("db", 65536)).await;
    c.go("db").await;
    c.s.write_all(&[0xde; REQUEST_HEADER_LEN]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv)
        .await
        .expect("server task ends")
        .unwrap();
}

#[tokio::test]
async fn client_vanishing_mid_request_does_not_wedge_the_server() {
    let export = MemExport::new("db", 1 << 20);
    for cut in [10usize, REQUEST_HEADER_LEN + 100] {
        let (mut c, srv) = Client::connect(export.clone()).await;
        c.go("db").await;
        let mut b = BytesMut::new();
        RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 1,
            offset: 0,
            len: 4096,
        }
        .encode(&mut b);
        b.put_slice(&[5u8; 4096]);
        c.s.write_all(&b[..cut]).await.unwrap();
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), srv)
            .await
            .expect("server task ends")
            .unwrap();
    }
    // The export is still served to others, and the half-sent write never landed.
    let (mut c, _srv) = Client::connect(export).await;
    c.go("db").await;
    c.request(CMD_READ, 0, 9, 0, 4096, &[]).await;
    assert_eq!(c.simple().await, (9, 0));
    let mut d = vec![0u8; 4096];
    c.s.read_exact(&mut d).await.unwrap();
    assert!(d.iter().all(|&x| x == 0));
}

#[tokio::test]
async fn many_requests_in_flight_pipelined() {
    let export = MemExport::new("db", 4 << 20);
    let (mut c, _srv) = Client::connect(export.clone()).await;
    c.go("db").await;
    // 1000 pipelined writes of distinct blocks, then read them all back.
    let mut b = BytesMut::new();
    for i in 0..1000u64 {
        RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            len: 4096,
        }
        .encode(&mut b);
        b.put_bytes(i as u8, 4096);
    }
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let writer = tokio::spawn(async move {
        wr.write_all(&b).await.unwrap();
        wr
    });
    let mut seen = vec![false; 1000];
    for _ in 0..1000 {
        assert_eq!(rd.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!(rd.read_u32().await.unwrap(), 0);
        let cookie = rd.read_u64().await.unwrap() as usize;
        assert!(!seen[cookie], "cookie {cookie} answered twice");
        seen[cookie] = true;
    }
    writer.await.unwrap();
    let d = export.data.lock().unwrap();
    for i in 0..1000usize {
        assert!(d[i * 4096..(i + 1) * 4096].iter().all(|&x| x == i as u8));
    }
}

#[tokio::test]
async fn a_pending_request_still_finishes_when_its_client_vanishes() {
    // A request that is not done on its first poll is finished by the
    // connection's writer; if the client goes away meanwhile, it must still
    // run to its end (a mirrored write has links to settle), not be dropped.
    let export = Arc::new(MemExport {
        gate_flush: true,
        ..Arc::into_inner(MemExport::new("db", 65536)).unwrap()
    });
    let (mut c, srv) = Client::connect(export.clone()).await;
    c.go("db").await;
    c.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    c.request(CMD_WRITE, 0, 2, 0, 512, &[1; 512]).await;
    assert_eq!(c.simple().await, (2, 0));
    drop(c);
    export.flush_gate.notify_one();
    tokio::time::timeout(Duration::from_secs(5), srv)
        .await
        .expect("server task ends once the pending flush finished")
        .unwrap();
    assert_eq!(export.flushes.load(Ordering::SeqCst), 1);
}
