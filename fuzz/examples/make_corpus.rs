//! Writes the seed corpus (fuzz/corpus/<target>/) by encoding valid values
//! with the product's own encoders, and by recording a real link handshake.
//! Run from fuzz/: `cargo run --example make_corpus`.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use blockmirror_core::activity::ActivityRecord;
use blockmirror_core::bitmap::Bitmap;
use blockmirror_core::meta::{MetaRecord, VerifyOutcome, VerifyRecord, VolumeMeta};
use blockmirror_nbd::proto::*;
use blockmirror_repl::{
    accept_with, connect_with, Codec, ConnectOptions, EncodedWrite, Frame, NodeHello, Purpose,
    RawHeader, SyncPhase, VolumeIdentity,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn with(mode: u8, b: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(b);
    v
}

fn option(out: &mut BytesMut, option: u32, payload: &[u8]) {
    OptionHeader {
        option,
        len: payload.len() as u32,
    }
    .encode(out);
    out.extend_from_slice(payload);
}

fn request(out: &mut BytesMut, kind: u16, flags: u16, offset: u64, len: u32) {
    RequestHeader {
        flags,
        kind,
        cookie: u64::from(kind) * 1000 + offset,
        offset,
        len,
    }
    .encode(out);
}

fn nbd() {
    // nbd_connection: chunk byte, client flags, options, requests.
    let meta = MetaContextRequest {
        export: "fuzz".into(),
        queries: vec!["base:allocation".into()],
    };
    let go = InfoRequest {
        export: "fuzz".into(),
        infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
    };
    let mut opts = BytesMut::new();
    opts.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    option(&mut opts, OPT_LIST, b"");
    option(&mut opts, OPT_STRUCTURED_REPLY, b"");
    let mut p = BytesMut::new();
    meta.encode(&mut p);
    option(&mut opts, OPT_LIST_META_CONTEXT, &p);
    option(&mut opts, OPT_SET_META_CONTEXT, &p);
    let mut p = BytesMut::new();
    go.encode(&mut p);
    option(&mut opts, OPT_INFO, &p);
    option(&mut opts, OPT_GO, &p);
    let mut reqs = BytesMut::new();
    request(&mut reqs, CMD_WRITE, 0, 4096, 512);
    reqs.extend_from_slice(&[0xab; 512]);
    request(&mut reqs, CMD_READ, 0, 4096, 512);
    request(&mut reqs, CMD_WRITE, CMD_FLAG_FUA, 0, 16);
    reqs.extend_from_slice(&[1; 16]);
    request(&mut reqs, CMD_FLUSH, 0, 0, 0);
    request(&mut reqs, CMD_TRIM, 0, 8192, 4096);
    request(&mut reqs, CMD_WRITE_ZEROES, 0, 0, 65536);
    request(&mut reqs, CMD_BLOCK_STATUS, 0, 0, 1 << 20);
    request(&mut reqs, CMD_CACHE, 0, 0, 4096);
    request(&mut reqs, CMD_READ, 0, (1 << 20) - 8, 512);
    request(&mut reqs, CMD_DISC, 0, 0, 0);
    let mut all = opts.to_vec();
    all.extend_from_slice(&reqs);
    put("nbd_connection", "go-and-requests", &with(255, &all));
    put("nbd_connection", "go-split-reads", &with(5, &all));
    let mut old = BytesMut::new();
    old.extend_from_slice(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    option(&mut old, OPT_EXPORT_NAME, b"fuzz");
    old.extend_from_slice(&reqs);
    put("nbd_connection", "export-name", &with(64, &old));
    let mut abort = BytesMut::new();
    abort.extend_from_slice(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    option(&mut abort, OPT_STARTTLS, b"");
    option(&mut abort, 0x7777, b"unknown");
    option(&mut abort, OPT_ABORT, b"");
    put("nbd_connection", "abort", &with(1, &abort));

    // nbd_proto: a request header, an option header, option payloads.
    let mut r = BytesMut::new();
    request(&mut r, CMD_READ, 0, 0, 4096);
    put("nbd_proto", "read-header", &r);
    let mut r = BytesMut::new();
    request(&mut r, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 512, 4096);
    put("nbd_proto", "zeroes-header", &r);
    let mut o = BytesMut::new();
    option(&mut o, OPT_GO, b"");
    put("nbd_proto", "option-header", &o);
    let mut p = BytesMut::new();
    go.encode(&mut p);
    put("nbd_proto", "info-request", &p);
    let mut p = BytesMut::new();
    meta.encode(&mut p);
    put("nbd_proto", "meta-request", &p);
}

fn frames() -> Vec<Frame> {
    vec![
        Frame::Write {
            id: 1,
            offset: 4096,
            fua: false,
            data: Bytes::from(vec![0x5a; 4096]),
        },
        Frame::Trim {
            id: 2,
            offset: 0,
            len: 65536,
            fua: true,
        },
        Frame::WriteZeroes {
            id: 3,
            offset: 8192,
            len: 4096,
            fua: false,
            may_trim: true,
        },
        Frame::Flush { id: 4 },
        Frame::Barrier {
            id: 5,
            durable: true,
        },
        Frame::Ack { id: 6 },
        Frame::Nack {
            id: 7,
            errno: 5,
            message: "EIO".into(),
        },
        Frame::Ping { id: 8 },
        Frame::Pong { id: 8 },
        Frame::JobHash {
            id: 9,
            link: 1,
            offset: 0,
            len: 1 << 20,
            block: 65536,
        },
        Frame::JobRead {
            id: 10,
            link: 1,
            offset: 4096,
            len: 4096,
        },
        Frame::JobClose { id: 11, link: 1 },
        Frame::JobHashes {
            id: 12,
            link: 1,
            offset: 0,
            len: 131072,
            block: 65536,
            digests: vec![[1; blockmirror_repl::DIGEST_LEN], [2; blockmirror_repl::DIGEST_LEN]],
        },
        Frame::JobData {
            id: 13,
            link: 1,
            offset: 0,
            data: Bytes::from_static(b"job data"),
        },
        Frame::JobNotReady {
            id: 14,
            link: 1,
            offset: 0,
            len: 4096,
            retry_after_ms: 10,
        },
        Frame::JobClosed { id: 15, link: 1 },
        Frame::SyncState {
            id: 16,
            phase: SyncPhase::Resyncing,
            generation: 42,
            history: [41; blockmirror_repl::SYNC_HISTORY_LEN],
        },
        Frame::HashRequest {
            id: 17,
            offset: 0,
            len: 65536,
        },
    ]
    .into_iter()
    .chain(blockmirror_repl::divergence_frames(true, &[(0, 4096), (65536, 8192)]))
    .collect()
}

fn repl() {
    let mut stream = Vec::new();
    for (i, f) in frames().iter().enumerate() {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        stream.extend_from_slice(&b);
        let h = RawHeader::decode(b[..40].try_into().unwrap()).unwrap();
        // repl_frame: kind u8, flags u16, id u64, offset u64, len u32, payload.
        let mut v = vec![h.kind];
        v.extend_from_slice(&h.flags.to_be_bytes());
        v.extend_from_slice(&h.id.to_be_bytes());
        v.extend_from_slice(&h.offset.to_be_bytes());
        v.extend_from_slice(&h.len.to_be_bytes());
        v.extend_from_slice(&b[40..]);
        if i % 3 == 0 || v.len() < 512 {
            put("repl_frame", &format!("kind-{}-{i}", h.kind), &v);
        }
    }
    for (i, codec) in [Codec::Lz4, Codec::Zstd].into_iter().enumerate() {
        let data: Vec<u8> = (0..8192u32).map(|x| (x / 64) as u8).collect();
        let w = EncodedWrite::new(Bytes::from(data), codec);
        let mut b = BytesMut::new();
        blockmirror_repl::encode_encoded_write_header(20 + i as u64, 0, false, &w, &mut b);
        b.extend_from_slice(&w.payload);
        stream.extend_from_slice(&b);
        // repl_compressed: selector, declared length, compressed payload.
        let mut v = vec![i as u8 | (i as u8) << 1];
        v.extend_from_slice(&w.len.to_be_bytes());
        v.extend_from_slice(&w.payload);
        put("repl_compressed", codec.as_str(), &v);
    }
    put("repl_compressed", "plain-text", b"\x02\x00\x00\x01\x00hello hello hello hello");
    put("repl_stream", "all-frames", &with(255, &stream));
    put("repl_stream", "all-frames-split", &with(3, &stream));
}

/// A stream that records what is read through it.
struct Tap<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let new = buf.filled()[before..].to_vec();
        self.seen.lock().unwrap().extend_from_slice(&new);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `(kind, u16 len, payload)` records of the frames in `raw`.
fn records(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    while rest.len() >= 40 {
        let h = RawHeader::decode(rest[..40].try_into().unwrap()).unwrap();
        let end = 40 + h.payload_len as usize;
        out.push(h.kind);
        out.extend_from_slice(&(h.payload_len as u16).to_be_bytes());
        out.extend_from_slice(&rest[40..end]);
        rest = &rest[end..];
    }
    out
}

fn handshake() {
    let identity = VolumeIdentity {
        name: "vol".into(),
        volume_id: [7; 16],
        size: 1 << 30,
        generation: 42,
        history: [41, 40, 0, 0],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (i, purpose) in [Purpose::Replication, Purpose::Jobs].into_iter().enumerate() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let from_mirror = Arc::new(Mutex::new(Vec::new()));
        let from_primary = Arc::new(Mutex::new(Vec::new()));
        let mut a = Tap {
            inner: a,
            seen: from_mirror.clone(),
        };
        let mut b = Tap {
            inner: b,
            seen: from_primary.clone(),
        };
        let id = identity.clone();
        rt.block_on(async {
            let hello = NodeHello {
                node: "primary".into(),
                volume: identity.clone(),
            };
            let opts = ConnectOptions {
                purpose,
                compression: Codec::Lz4,
                epoch: 3,
            };
            let (c, s) = tokio::join!(
                connect_with(&mut a, b"fuzz-secret", &hello, opts),
                accept_with(&mut b, b"fuzz-secret", "mirror", &Codec::ALL, |n| {
                    (n == "vol").then(|| id.clone())
                })
            );
            c.unwrap();
            s.unwrap();
        });
        let p = from_primary.lock().unwrap().clone();
        let m = from_mirror.lock().unwrap().clone();
        // Byte 0: bit 0 framed records, bit 1 primary side, bit 2 (connect) jobs.
        put("repl_handshake", &format!("accept-raw-{i}"), &with(0xfc, &p));
        put("repl_handshake", &format!("accept-records-{i}"), &with(0xfd, &records(&p)));
        let jobs = if purpose == Purpose::Jobs { 4 } else { 0 };
        put("repl_handshake", &format!("connect-raw-{i}"), &with(0xf2 | jobs, &m));
        put("repl_handshake", &format!("connect-records-{i}"), &with(0xf3 | jobs, &records(&m)));
    }
}

fn files() {
    let meta = VolumeMeta::new([3; 16], 1 << 30, 42);
    put("meta", "v4-plain", &with(0, &MetaRecord::from(meta).encode()));
    put("meta", "mirror", &with(0, &MetaRecord::from(VolumeMeta::new_mirror([4; 16], 1 << 20)).encode()));
    let rec = MetaRecord {
        meta,
        verify: vec![VerifyRecord {
            peer: "127.0.0.1:7701".into(),
            id: 3,
            outcome: VerifyOutcome::Differ,
            full: true,
            mark: false,
            started_unix: 1,
            finished_unix: 2,
            total_bytes: 1 << 30,
            done_bytes: 1 << 30,
            skipped_bytes: 0,
            regions_waited: 1,
            not_ready: 0,
            differing_bytes: 4096,
            marked_bytes: 0,
            differing: vec![(0, 4096)],
            differing_truncated: false,
            error: String::new(),
        }],
    };
    put("meta", "v4-verify", &with(0, &rec.encode()));
    let mut old = meta.encode();
    old[8..12].copy_from_slice(&3u32.to_le_bytes());
    put("meta", "v3-fixcrc", &with(1, &old));

    let mut bm = Bitmap::new(64 << 20, 64 << 10).unwrap();
    put("bitmap", "clear", &with(0, &bm.encode()));
    bm.mark(0, 4096);
    bm.mark(10 << 20, 3 << 20);
    put("bitmap", "marked", &with(0, &bm.encode()));
    let mut odd = Bitmap::new((1 << 20) + 4096, 4096).unwrap();
    odd.mark_all();
    put("bitmap", "odd-size-full", &with(0, &odd.encode()));

    let r = ActivityRecord::new(5, 4 << 20, [0, 3, 7]).unwrap();
    put("activity", "three-extents", &with(0, &r.encode()));
    let c = ActivityRecord::clean(6, 4 << 20).unwrap();
    put("activity", "clean", &with(0, &c.encode()));
    let mut slot = r.encode();
    slot.resize(4096, 0);
    put("activity", "in-slot", &with(0, &slot));

    // oos_store: u16 bitmap length, bitmap file, activity log (two 64 KiB
    // slots; shortened here, a short file is one of the cases).
    let mut bm = Bitmap::new(64 << 20, 64 << 10).unwrap();
    bm.mark(1 << 20, 4096);
    let b = bm.encode();
    for (name, rec, slot) in [("crash", &r, 0usize), ("clean", &c, 1)] {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(&b);
        let mut al = vec![0u8; slot * 65536];
        al.extend_from_slice(&rec.encode());
        v.extend_from_slice(&al);
        put("oos_store", name, &v);
    }
    let mut v = (b.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(&b);
    put("oos_store", "no-log", &v);
}

fn config() {
    let example = r#"
node = "site-a"
listen = "127.0.0.1:7700"
admin = "127.0.0.1:7780"
secret_file = "secret.key"

[[volume]]
name = "db"
path = "data/db.img"
size = "1GiB"
role = "primary"
nbd = "127.0.0.1:10809"
consistency_group = "app"
"#;
    put("config", "primary", example.as_bytes());
    put(
        "config",
        "sync-mirror",
        format!("{example}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\nmode = \"sync\"\ncompression = \"lz4\"\n").as_bytes(),
    );
    put(
        "config",
        "async-mirror",
        format!("{example}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\nmode = \"async\"\nmax_lag_bytes = \"8MiB\"\nmax_lag_seconds = 0.5\nlag_policy = \"bitmap\"\ndurable_barriers = true\n").as_bytes(),
    );
    put(
        "config",
        "mirror-role",
        b"node = \"b\"\nlisten = \"127.0.0.1:7701\"\n[[volume]]\nname = \"db\"\npath = \"db.img\"\nsize = \"1MiB\"\nrole = \"mirror\"\nnbd = \"unix:/tmp/x.sock\"\n",
    );
}

/// Cluster mode: a declaration file and the JSON values etcd holds.
fn cluster() {
    put(
        "cluster",
        "declaration",
        br#"nbd_port_base = 10900
[[volume]]
name = "db"
size = "1GiB"
primary = "a"
mirrors = [{ node = "b" }, { node = "c", mode = "async", options = { compression = "lz4" } }]
consistency_group = "app"
options = { track_size = "128KiB" }
"#,
    );
    put(
        "cluster",
        "node",
        br#"{"v":1,"site":"dc1","admin":"127.0.0.1:7780","listen":"127.0.0.1:7700"}"#,
    );
    put(
        "cluster",
        "record",
        br#"{"v":1,"epoch":3,"primary":"b","generation":"00000000000000aa","sync_mirrors":["c"],"volumes":{"db":"00000000000000aa"},"parents":{"db":"0000000000000001"}}"#,
    );
    put("cluster", "key", br#"{"v":1,"node":"b","epoch":3}"#);
    put(
        "cluster",
        "report",
        br#"{"v":1,"generation":"00000000000000aa","data":"in_sync"}"#,
    );
    put(
        "cluster",
        "spec",
        br#"{"v":1,"name":"db","size":1073741824,"primary":"a","primary_mode":"sync","mirrors":[{"node":"b","mode":"sync","options":{}}],"consistency_group":null,"nbd_port":10900,"options":{"track_size":"128KiB"}}"#,
    );
}

fn main() {
    nbd();
    repl();
    handshake();
    files();
    config();
    cluster();
}
