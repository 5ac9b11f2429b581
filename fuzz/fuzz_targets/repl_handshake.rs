//! The link handshake (repl handshake.rs) from a hostile peer, on both
//! sides: the mirror's `accept_with` reading a primary's Hello and Auth, and
//! the primary's `connect_with` reading a mirror's Challenge and Welcome.
//! Byte 0 picks the side and whether the rest is a raw stream or a list of
//! (kind u8, payload length u16, payload) records sent as frames with good
//! checksums, so the message parsers behind the CRCs are reached.
#![no_main]
use blockmirror_fuzz::{framed, runtime, SliceStream, Take};
use blockmirror_repl::{
    accept_with, connect_with, Codec, ConnectOptions, NodeHello, Purpose, VolumeIdentity,
};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";

fn identity() -> VolumeIdentity {
    VolumeIdentity {
        name: "vol".into(),
        volume_id: [7; 16],
        size: 1 << 30,
        generation: 42,
        history: [41, 40, 0, 0],
    }
}

fuzz_target!(|data: &[u8]| {
    let mut t = Take(data);
    let mode = t.u8();
    let input: Vec<u8> = if mode & 1 == 0 {
        t.rest().to_vec()
    } else {
        let mut out = Vec::new();
        while !t.0.is_empty() {
            let kind = t.u8();
            let n = usize::from(t.u16());
            out.extend(framed(kind, 0, 0, 0, 0, t.bytes(n)));
        }
        out
    };
    let chunk = usize::from(mode >> 2).max(1) * 3;
    let mut s = SliceStream::new(&input, chunk);
    runtime().block_on(async {
        if mode & 2 == 0 {
            let _ = accept_with(&mut s, SECRET, "mirror", &Codec::ALL, |name| {
                (name == "vol").then(identity)
            })
            .await;
        } else {
            let hello = NodeHello {
                node: "primary".into(),
                volume: identity(),
            };
            let opts = ConnectOptions {
                purpose: if mode & 4 == 0 { Purpose::Replication } else { Purpose::Jobs },
                compression: Codec::Lz4,
                epoch: u64::from(mode >> 3),
            };
            let _ = connect_with(&mut s, SECRET, &hello, opts).await;
        }
    });
});
