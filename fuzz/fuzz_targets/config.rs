//! The node config file (node/src/daemon/config): any text `NodeConfig::parse`
//! is given must yield a config or a typed error, never a panic.
#![no_main]
use std::path::Path;

use blockmirror_node::daemon::config::NodeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = NodeConfig::parse(text, Path::new("/etc/blockmirror/node.toml"));
    }
});
