//! A whole NBD connection from a hostile client: option haggling
//! (handshake.rs) and then requests in the transmission phase, fed from the
//! fuzz input through an in-memory duplex on a current-thread runtime. The
//! first byte picks the read-chunk size, so requests split across reads too.
#![no_main]
use std::sync::{Arc, Mutex};

use blockmirror_fuzz::runtime;
use blockmirror_nbd::{serve_connection, Errno, Export, Exports, StatusExtent};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 1 << 20;

struct Mem {
    data: Mutex<Vec<u8>>,
}

impl Export for Mem {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let d = self.data.lock().unwrap();
        let (o, l) = (offset as usize, len as usize);
        // The server range-checks before it calls the export: a panic here
        // is a finding.
        Ok(Bytes::copy_from_slice(&d[o..o + l]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), Errno> {
        let mut d = self.data.lock().unwrap();
        let o = offset as usize;
        d[o..o + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), Errno> {
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
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<StatusExtent>, Errno> {
        assert!(offset + u64::from(len) <= SIZE as u64);
        Ok(vec![StatusExtent { len, flags: 0 }])
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let export = Arc::new(Mem {
        data: Mutex::new(vec![0; SIZE]),
    });
    let exports = Exports::new([export]);
    runtime().block_on(async {
        let (client, server) = tokio::io::duplex(64 << 10);
        let (mut rx, mut tx) = tokio::io::split(client);
        let feed = async {
            for piece in input.chunks(chunk) {
                if tx.write_all(piece).await.is_err() {
                    return;
                }
            }
            let _ = tx.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(rx.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let serve = async {
            let _ = serve_connection(server, &exports, CancellationToken::new()).await;
        };
        tokio::join!(feed, drain, serve);
    });
});
