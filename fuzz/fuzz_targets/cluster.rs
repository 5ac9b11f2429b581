//! Cluster mode's decoders (node/src/cluster): a declaration file
//! (`cluster apply FILE`) and every value read from etcd (nodes, records,
//! primary keys, mirror reports, stored declarations). Any bytes must be
//! read or refused with a reason, never a panic; a declaration that reads
//! is also given ports, checked as its nodes would check it, and turned
//! into each node's `[[volume]]` table.
#![no_main]
use std::path::Path;

use blockmirror_node::cluster::records::{decode, KeyEntry, NodeEntry, RecordEntry, ReportEntry};
use blockmirror_node::cluster::spec::{self, VolumeSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode::<NodeEntry>(data);
    let _ = decode::<KeyEntry>(data);
    let _ = decode::<ReportEntry>(data).map(|r| r.to_core("n"));
    let _ = decode::<RecordEntry>(data).map(|r| r.to_core());
    if let Ok(s) = decode::<VolumeSpec>(data) {
        let peer = |n: &str| Some(format!("127.0.0.1:{}", 7000 + n.len()));
        let _ = s.volume_table("a", &peer, Path::new("/v"), [127, 0, 0, 1].into());
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mut d) = spec::parse_file(text) {
        if spec::assign_ports(&mut d, &[]).is_ok() {
            let _ = spec::check_on_nodes(&d);
        }
    }
});
