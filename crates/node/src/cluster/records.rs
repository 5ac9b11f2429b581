//! What cluster mode keeps in etcd, and where. Every value is a JSON object
//! with a format version `v`; a value this build cannot read is reported,
//! never guessed at.
//!
//! | key (under `prefix`) | value | lease |
//! |---|---|---|
//! | `/nodes/<node>` | [`NodeEntry`]: site, admin and replication addresses | the node's |
//! | `/volumes/<volume>/record` (a consistency group: `/groups/<group>/...`, one record for all its volumes) | [`RecordEntry`]: epoch, primary, published generation, sync mirrors in step | none: it outlives its primary |
//! | `/volumes/<volume>/primary` | [`KeyEntry`]: the node holding the epoch | the primary's |
//! | `/volumes/<volume>/mirrors/<node>` | [`ReportEntry`]: a mirror's generation and data state | that mirror's |
//! | `/members/<node>` | [`NodeEntry`] again: the address book of declared volumes' peers | none: a node that is down is still a peer |
//! | `/spec/<volume>` | [`super::spec::VolumeSpec`]: a volume declared by `blockmirror cluster apply` | none |

use blockmirror_core::cluster::{DataState, MirrorReport, Record};
use serde::{Deserialize, Serialize};

/// The format version of every value.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub v: u32,
    pub site: String,
    pub admin: String,
    #[serde(default)]
    pub listen: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordEntry {
    pub v: u32,
    pub epoch: u64,
    pub primary: String,
    /// Hex, as /status shows generations.
    pub generation: String,
    #[serde(default)]
    pub sync_mirrors: Vec<String>,
    /// Each volume's own generation (for a group, `generation` is their
    /// digest).
    #[serde(default)]
    pub volumes: std::collections::BTreeMap<String, String>,
    /// Each volume's generation when this epoch began (what its primary
    /// took over from): a node that steps down undoes any generation it
    /// started after that and never published.
    #[serde(default)]
    pub parents: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub v: u32,
    pub node: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    pub v: u32,
    pub generation: String,
    /// `in_sync`, `consistent` or `inconsistent`.
    pub data: String,
}

/// The key names of one deployment (its `prefix`).
#[derive(Debug, Clone)]
pub struct Keys {
    pub prefix: String,
}

impl Keys {
    pub fn node(&self, node: &str) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }
    pub fn nodes(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }
    pub fn member(&self, node: &str) -> String {
        format!("{}/members/{node}", self.prefix)
    }
    pub fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }
    pub fn spec(&self, volume: &str) -> String {
        format!("{}/spec/{volume}", self.prefix)
    }
    pub fn specs(&self) -> String {
        format!("{}/spec/", self.prefix)
    }
    pub fn volumes(&self) -> String {
        format!("{}/volumes/", self.prefix)
    }
    pub fn groups(&self) -> String {
        format!("{}/groups/", self.prefix)
    }
    /// The folder of a unit: `base` is `volumes/NAME` or `groups/NAME`.
    pub fn unit(&self, base: &str) -> String {
        format!("{}/{base}/", self.prefix)
    }
    pub fn record(&self, base: &str) -> String {
        format!("{}/{base}/record", self.prefix)
    }
    pub fn primary(&self, base: &str) -> String {
        format!("{}/{base}/primary", self.prefix)
    }
    pub fn report(&self, base: &str, node: &str) -> String {
        format!("{}/{base}/mirrors/{node}", self.prefix)
    }

    /// Splits a key under `/volumes/` or `/groups/` into (unit name: the
    /// volume, or `group:NAME`; the rest).
    pub fn split_unit_key(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.prefix)?;
        if let Some(r) = rest.strip_prefix("/volumes/") {
            let (n, rest) = r.split_once('/')?;
            return Some((n.to_owned(), rest.to_owned()));
        }
        let r = rest.strip_prefix("/groups/")?;
        let (n, rest) = r.split_once('/')?;
        Some((format!("group:{n}"), rest.to_owned()))
    }
}

pub fn gen_hex(g: u64) -> String {
    format!("{g:016x}")
}

pub fn parse_gen(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Decodes a JSON value of `FORMAT`; `Err` says why not.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    let v: Versioned = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if v.v != FORMAT {
        return Err(format!(
            "format version {} (this build reads {FORMAT})",
            v.v
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain structs serialize")
}

impl RecordEntry {
    pub fn to_core(&self) -> Option<Record> {
        Some(Record {
            epoch: self.epoch,
            primary: self.primary.clone(),
            generation: parse_gen(&self.generation)?,
            sync_mirrors: self.sync_mirrors.clone(),
        })
    }
}

impl ReportEntry {
    pub fn to_core(&self, node: &str) -> Option<MirrorReport> {
        Some(MirrorReport {
            node: node.to_owned(),
            generation: parse_gen(&self.generation)?,
            data: match self.data.as_str() {
                "in_sync" => DataState::InSync,
                "consistent" => DataState::Consistent,
                "inconsistent" => DataState::Inconsistent,
                _ => return None,
            },
        })
    }
}

pub fn data_str(d: DataState) -> &'static str {
    match d {
        DataState::InSync => "in_sync",
        DataState::Consistent => "consistent",
        DataState::Inconsistent => "inconsistent",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_other_versions_are_refused() {
        let r = RecordEntry {
            v: FORMAT,
            epoch: 3,
            primary: "a".into(),
            generation: gen_hex(0xabc),
            sync_mirrors: vec!["b".into()],
            volumes: [("db".to_string(), gen_hex(0xabc))].into(),
            parents: Default::default(),
        };
        let back: RecordEntry = decode(&encode(&r)).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.to_core().unwrap().generation, 0xabc);
        let e = decode::<RecordEntry>(br#"{"v":2,"epoch":1}"#).unwrap_err();
        assert!(e.contains("format version 2"), "{e}");
        assert!(decode::<RecordEntry>(b"\xff").is_err());
        assert!(decode::<KeyEntry>(br#"{"v":1}"#).is_err());
    }

    proptest::proptest! {
        /// Whatever a value in etcd holds (another build's, a hand-edit,
        /// garbage), decoding answers Ok or Err and never panics; a decoded
        /// record round-trips.
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode::<KeyEntry>(&bytes);
            let _ = decode::<ReportEntry>(&bytes);
            if let Ok(r) = decode::<RecordEntry>(&bytes) {
                let _ = r.to_core();
                proptest::prop_assert_eq!(decode::<RecordEntry>(&encode(&r)).unwrap(), r);
            }
        }
    }

    #[test]
    fn keys_split() {
        let k = Keys {
            prefix: "/bm".into(),
        };
        let s = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(k.split_unit_key(&k.record("volumes/db")), s("db", "record"));
        assert_eq!(
            k.split_unit_key(&k.report("groups/g", "n2")),
            s("group:g", "mirrors/n2")
        );
        assert_eq!(k.split_unit_key("/other/volumes/db/record"), None);
    }
}
