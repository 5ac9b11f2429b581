//! Volumes declared in etcd: `blockmirror cluster apply FILE` stores one
//! [`VolumeSpec`] per volume at `<prefix>/spec/<volume>`, and every node
//! named in one serves it ([`VolumeSpec::volume_table`] is the `[[volume]]`
//! table it adds to its own config; the node validates the result exactly
//! as a config file it was given).
//!
//! The declaration file (TOML):
//!
//! ```toml
//! nbd_port_base = 10900          # optional: ports given to volumes without one
//!
//! [[volume]]
//! name = "db"
//! size = "1GiB"
//! primary = "a"                  # where it starts as primary
//! mirrors = [{ node = "b" }, { node = "c", mode = "async" }]
//! consistency_group = "app"      # optional: fails over with its group
//! nbd_port = 10901               # optional: the NBD port on every node
//! options = { track_size = "64KiB" }   # other [[volume]] keys of a node config
//! ```
//!
//! A node's address for its peers is the `listen` it registered under
//! `<prefix>/members/<node>` (without a lease, so that a node that is down
//! can still be named as a peer).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::records::FORMAT;

/// First NBD port `cluster apply` gives a volume declared without one.
pub const DEFAULT_NBD_PORT_BASE: u16 = 10900;

/// Keys of a node config's `[[volume]]` table that a declaration sets
/// itself, so `options` may not.
const RESERVED: &[&str] = &[
    "name",
    "path",
    "size",
    "role",
    "nbd",
    "consistency_group",
    "mirror",
];
/// The same for a `[[volume.mirror]]` table.
const RESERVED_MIRROR: &[&str] = &["peer", "peer_name", "mode"];

/// One declared volume, as stored in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub v: u32,
    pub name: String,
    pub size: u64,
    /// The node it starts on as primary (afterwards etcd's record decides).
    pub primary: String,
    /// How the primary's node is mirrored once another node is primary.
    pub primary_mode: String,
    pub mirrors: Vec<Placement>,
    #[serde(default)]
    pub consistency_group: Option<String>,
    /// The NBD port of its export on every node.
    pub nbd_port: u16,
    /// Further keys of the node config's `[[volume]]` table.
    #[serde(default)]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// A mirror of a declared volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub node: String,
    /// `sync` or `async`.
    pub mode: String,
    /// Further keys of the `[[volume.mirror]]` table that mirrors to it.
    #[serde(default)]
    pub options: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    nbd_port_base: Option<u16>,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    size: toml::Value,
    primary: String,
    primary_mode: Option<String>,
    #[serde(default)]
    mirrors: Vec<RawPlacement>,
    consistency_group: Option<String>,
    nbd_port: Option<u16>,
    #[serde(default)]
    options: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlacement {
    node: String,
    mode: Option<String>,
    #[serde(default)]
    options: toml::Table,
}

/// A declaration file, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    pub nbd_port_base: u16,
    /// In file order; `nbd_port` 0 where the file gave none.
    pub volumes: Vec<VolumeSpec>,
}

fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?}: expected 1-64 characters of A-Z a-z 0-9 _ . -"
        ))
    }
}

fn check_mode(what: &str, m: Option<String>) -> Result<String, String> {
    match m.as_deref() {
        None => Ok("sync".into()),
        Some("sync" | "async") => Ok(m.expect("matched")),
        Some(other) => Err(format!(
            "{what}: mode {other:?} (expected \"sync\" or \"async\")"
        )),
    }
}

fn to_json(
    what: &str,
    table: toml::Table,
    reserved: &[&str],
) -> Result<BTreeMap<String, serde_json::Value>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        if reserved.contains(&k.as_str()) {
            return Err(format!(
                "{what}: options.{k} is set by the declaration itself"
            ));
        }
        let j = serde_json::to_value(&v).map_err(|e| format!("{what}: options.{k}: {e}"))?;
        out.insert(k, j);
    }
    Ok(out)
}

fn toml_value(j: &serde_json::Value) -> Option<toml::Value> {
    Some(match j {
        serde_json::Value::Bool(b) => toml::Value::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        serde_json::Value::String(s) => toml::Value::String(s.clone()),
        serde_json::Value::Array(a) => {
            toml::Value::Array(a.iter().map(toml_value).collect::<Option<_>>()?)
        }
        serde_json::Value::Object(o) => toml::Value::Table(
            o.iter()
                .map(|(k, v)| Some((k.clone(), toml_value(v)?)))
                .collect::<Option<_>>()?,
        ),
        serde_json::Value::Null => return None,
    })
}

/// Reads a declaration file: names, nodes and modes checked here; each
/// volume's table is checked as a node would check it by
/// [`check_on_nodes`].
pub fn parse_file(text: &str) -> Result<Declaration, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())?;
    let mut volumes: Vec<VolumeSpec> = Vec::new();
    for (i, rv) in raw.volume.into_iter().enumerate() {
        let what = format!("volume[{i}]");
        check_name(&format!("{what}.name"), &rv.name)?;
        let what = format!("volume {:?}", rv.name);
        if volumes.iter().any(|v| v.name == rv.name) {
            return Err(format!("{what} is declared twice"));
        }
        let size = match &rv.size {
            toml::Value::Integer(i) if *i > 0 => *i as u64,
            toml::Value::String(s) => crate::daemon::config::parse_size(s)
                .map_err(|e| format!("{what}: size {s:?}: {e}"))?,
            other => return Err(format!("{what}: size {other}: expected e.g. \"1GiB\"")),
        };
        if size == 0 || size % 4096 != 0 {
            return Err(format!(
                "{what}: size {size}: a non-zero multiple of 4096 bytes"
            ));
        }
        check_name(&format!("{what}: primary"), &rv.primary)?;
        let mut mirrors: Vec<Placement> = Vec::new();
        for rp in rv.mirrors {
            check_name(&format!("{what}: mirror node"), &rp.node)?;
            if rp.node == rv.primary || mirrors.iter().any(|m| m.node == rp.node) {
                return Err(format!("{what}: node {:?} is named twice", rp.node));
            }
            mirrors.push(Placement {
                mode: check_mode(&format!("{what}: mirror {:?}", rp.node), rp.mode)?,
                options: to_json(
                    &format!("{what}: mirror {:?}", rp.node),
                    rp.options,
                    RESERVED_MIRROR,
                )?,
                node: rp.node,
            });
        }
        if let Some(g) = &rv.consistency_group {
            check_name(&format!("{what}: consistency_group"), g)?;
        }
        if rv.nbd_port == Some(0) {
            return Err(format!("{what}: nbd_port 0"));
        }
        volumes.push(VolumeSpec {
            v: FORMAT,
            size,
            primary_mode: check_mode(&format!("{what}: primary_mode"), rv.primary_mode)?,
            primary: rv.primary,
            mirrors,
            consistency_group: rv.consistency_group,
            nbd_port: rv.nbd_port.unwrap_or(0),
            options: to_json(&what, rv.options, RESERVED)?,
            name: rv.name,
        });
    }
    // A group's volumes fail over as one: one set of nodes, one primary.
    for a in &volumes {
        for b in &volumes {
            if a.consistency_group.is_some()
                && a.consistency_group == b.consistency_group
                && (a.primary != b.primary || a.node_set() != b.node_set())
            {
                return Err(format!(
                    "volumes {:?} and {:?} of consistency group {:?} must have the same primary \
                     and the same nodes",
                    a.name,
                    b.name,
                    a.consistency_group.as_deref().unwrap_or_default()
                ));
            }
        }
    }
    Ok(Declaration {
        nbd_port_base: raw.nbd_port_base.unwrap_or(DEFAULT_NBD_PORT_BASE),
        volumes,
    })
}

/// Gives every volume without an NBD port one: its port in `stored` if it
/// is declared there already (a port never moves under a host), else the
/// lowest from `base` that no volume uses. Err: two volumes want one port.
pub fn assign_ports(decl: &mut Declaration, stored: &[VolumeSpec]) -> Result<(), String> {
    for v in decl.volumes.iter_mut().filter(|v| v.nbd_port == 0) {
        if let Some(s) = stored.iter().find(|s| s.name == v.name) {
            v.nbd_port = s.nbd_port;
        }
    }
    let mut used: std::collections::BTreeSet<u16> =
        decl.volumes.iter().map(|v| v.nbd_port).collect();
    // Ports of stored volumes this declaration keeps or drops alike: a
    // dropped volume is still served until its nodes restart.
    used.extend(stored.iter().map(|s| s.nbd_port));
    let mut next = decl.nbd_port_base;
    for v in decl.volumes.iter_mut().filter(|v| v.nbd_port == 0) {
        while used.contains(&next) {
            next = next
                .checked_add(1)
                .ok_or("no free NBD port above nbd_port_base")?;
        }
        v.nbd_port = next;
        used.insert(next);
    }
    for a in &decl.volumes {
        if let Some(b) = decl
            .volumes
            .iter()
            .find(|b| b.name != a.name && b.nbd_port == a.nbd_port)
        {
            return Err(format!(
                "volumes {:?} and {:?} both have nbd_port {}",
                a.name, b.name, a.nbd_port
            ));
        }
        if let Some(s) = stored
            .iter()
            .find(|s| s.name != a.name && s.nbd_port == a.nbd_port)
        {
            return Err(format!(
                "nbd_port {} of {:?} is the port of the declared volume {:?}",
                a.nbd_port, a.name, s.name
            ));
        }
    }
    Ok(())
}

impl VolumeSpec {
    /// Every node that holds the volume, its initial primary first.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.primary.as_str()).chain(self.mirrors.iter().map(|m| m.node.as_str()))
    }

    fn node_set(&self) -> std::collections::BTreeSet<&str> {
        self.nodes().collect()
    }

    pub fn involves(&self, node: &str) -> bool {
        self.nodes().any(|n| n == node)
    }

    /// The `[[volume]]` table `node` serves this volume with: its image in
    /// `volume_dir`, its export at `nbd_host:nbd_port`, a link to every
    /// other node of the volume at the address `peer` gives for it (the
    /// link to the primary's node stays parked until that node is a
    /// mirror). Err: a peer's address is not known yet.
    pub fn volume_table(
        &self,
        node: &str,
        peer: &dyn Fn(&str) -> Option<String>,
        volume_dir: &Path,
        nbd_host: IpAddr,
    ) -> Result<String, String> {
        let mut t = toml::Table::new();
        let s = |x: &str| toml::Value::String(x.to_owned());
        t.insert("name".into(), s(&self.name));
        let path = volume_dir.join(format!("{}.img", self.name));
        t.insert("path".into(), s(&path.to_string_lossy()));
        t.insert("size".into(), toml::Value::Integer(self.size as i64));
        let role = if node == self.primary {
            "primary"
        } else {
            "mirror"
        };
        t.insert("role".into(), s(role));
        let nbd = std::net::SocketAddr::new(nbd_host, self.nbd_port);
        t.insert("nbd".into(), s(&nbd.to_string()));
        if let Some(g) = &self.consistency_group {
            t.insert("consistency_group".into(), s(g));
        }
        for (k, v) in &self.options {
            if let Some(v) = toml_value(v) {
                t.insert(k.clone(), v);
            }
        }
        let mut links = Vec::new();
        let none = BTreeMap::new();
        let others = std::iter::once((self.primary.as_str(), self.primary_mode.as_str(), &none))
            .chain(
                self.mirrors
                    .iter()
                    .map(|m| (m.node.as_str(), m.mode.as_str(), &m.options)),
            )
            .filter(|(n, _, _)| *n != node);
        for (n, mode, options) in others {
            let addr =
                peer(n).ok_or_else(|| format!("node {n:?} has not registered its address yet"))?;
            let mut m = toml::Table::new();
            m.insert("peer".into(), s(&addr));
            m.insert("peer_name".into(), s(n));
            m.insert("mode".into(), s(mode));
            for (k, v) in options {
                if let Some(v) = toml_value(v) {
                    m.insert(k.clone(), v);
                }
            }
            links.push(toml::Value::Table(m));
        }
        if !links.is_empty() {
            t.insert("mirror".into(), toml::Value::Array(links));
        }
        let mut doc = toml::Table::new();
        doc.insert(
            "volume".into(),
            toml::Value::Array(vec![toml::Value::Table(t)]),
        );
        toml::to_string(&doc).map_err(|e| format!("volume {:?}: {e}", self.name))
    }
}

/// Checks every volume's table as the node config of each of its nodes
/// would be checked, with placeholder addresses: a declaration that no node
/// could serve is refused before it reaches etcd.
pub fn check_on_nodes(decl: &Declaration) -> Result<(), String> {
    use crate::daemon::config::NodeConfig;
    let nodes: std::collections::BTreeSet<&str> =
        decl.volumes.iter().flat_map(|v| v.nodes()).collect();
    let port = |n: &str| 20000 + nodes.iter().position(|x| *x == n).unwrap_or(0) as u16;
    // The exports on another address than the listeners, so that a
    // volume's port cannot clash with a placeholder.
    for node in &nodes {
        let mut text = format!(
            "node = \"{node}\"\nlisten = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:1\"\n\
             secret_file = \"secret\"\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\n",
            port(node)
        );
        for v in decl.volumes.iter().filter(|v| v.involves(node)) {
            let peer = |n: &str| Some(format!("127.0.0.1:{}", port(n)));
            text.push_str(&v.volume_table(
                node,
                &peer,
                Path::new("/nonexistent"),
                [127, 0, 0, 2].into(),
            )?);
            text.push('\n');
        }
        NodeConfig::parse(&text, Path::new("declaration.toml"))
            .map_err(|e| format!("on node {node:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FILE: &str = r#"
[[volume]]
name = "db"
size = "64MiB"
primary = "a"
mirrors = [{ node = "b" }, { node = "c", mode = "async", options = { compression = "lz4" } }]
consistency_group = "app"
options = { track_size = "128KiB" }

[[volume]]
name = "logs"
size = 16777216
primary = "a"
mirrors = [{ node = "b" }, { node = "c", mode = "async" }]
consistency_group = "app"
nbd_port = 10950
"#;

    #[test]
    fn a_file_is_read_checked_and_given_ports() {
        let mut d = parse_file(FILE).unwrap();
        assert_eq!(d.volumes.len(), 2);
        assert_eq!(d.volumes[0].size, 64 << 20);
        assert_eq!(d.volumes[0].mirrors[1].mode, "async");
        assert_eq!(d.volumes[0].primary_mode, "sync");
        // A stored volume keeps its port; a new one takes the lowest free.
        let mut stored = d.volumes[1].clone();
        stored.name = "old".into();
        stored.nbd_port = DEFAULT_NBD_PORT_BASE;
        assign_ports(&mut d, &[stored]).unwrap();
        assert_eq!(d.volumes[0].nbd_port, DEFAULT_NBD_PORT_BASE + 1);
        assert_eq!(d.volumes[1].nbd_port, 10950);
        check_on_nodes(&d).unwrap();
    }

    #[test]
    fn a_node_config_with_the_table_is_valid_and_links_every_other_node() {
        let mut d = parse_file(FILE).unwrap();
        assign_ports(&mut d, &[]).unwrap();
        let peer = |n: &str| Some(format!("10.0.0.{}:7789", n.as_bytes()[0] - b'a' + 1));
        let t = d.volumes[0]
            .volume_table("b", &peer, Path::new("/srv/bm"), [10, 0, 0, 2].into())
            .unwrap();
        let text = format!(
            "node = \"b\"\nlisten = \"10.0.0.2:7789\"\nsecret_file = \"s\"\n\
             [cluster]\netcd = [\"http://127.0.0.1:2379\"]\n{t}"
        );
        let c = crate::daemon::config::NodeConfig::parse(&text, Path::new("/etc/b.toml")).unwrap();
        let v = &c.volumes[0];
        assert_eq!(v.role, crate::daemon::config::Role::Mirror);
        assert_eq!(v.path, Path::new("/srv/bm/db.img"));
        assert_eq!(v.track_size, 128 << 10);
        assert_eq!(v.consistency_group.as_deref(), Some("app"));
        let peers: Vec<&str> = v.mirrors.iter().map(|m| m.peer.as_str()).collect();
        assert_eq!(peers, ["10.0.0.1:7789", "10.0.0.3:7789"]);
        assert_eq!(v.mirrors[1].mode, crate::daemon::config::MirrorMode::Async);
        assert_eq!(v.mirrors[1].peer_name.as_deref(), Some("c"));
        // A peer not registered yet: not served until it is.
        let none = |_: &str| None;
        assert!(d.volumes[0]
            .volume_table("b", &none, Path::new("/srv"), [10, 0, 0, 2].into())
            .unwrap_err()
            .contains("has not registered"));
    }

    #[test]
    fn bad_declarations_are_refused_with_the_reason() {
        let cases = [
            ("[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\nmirrors = [{ node = \"a\" }]", "named twice"),
            ("[[volume]]\nname = \"x y\"\nsize = \"1MiB\"\nprimary = \"a\"", "expected 1-64"),
            ("[[volume]]\nname = \"x\"\nsize = 1000\nprimary = \"a\"", "multiple of 4096"),
            ("[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\nmirrors = [{ node = \"b\", mode = \"fast\" }]", "expected \"sync\""),
            ("[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\noptions = { path = \"/x\" }", "set by the declaration"),
            ("[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\ncolour = 1", "unknown field"),
            ("[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\nconsistency_group = \"g\"\n\
              [[volume]]\nname = \"y\"\nsize = \"1MiB\"\nprimary = \"b\"\nconsistency_group = \"g\"", "same primary"),
        ];
        for (text, why) in cases {
            let e = parse_file(text).unwrap_err();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        // Options a node would refuse are refused before etcd.
        let d = parse_file(
            "[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\nmirrors = [{ node = \"b\" }]\n\
             options = { track_size = \"3KiB\" }",
        )
        .unwrap();
        let mut d = d;
        assign_ports(&mut d, &[]).unwrap();
        assert!(check_on_nodes(&d).unwrap_err().contains("track_size"));
        // Two volumes on one port.
        let mut d = parse_file(
            "[[volume]]\nname = \"x\"\nsize = \"1MiB\"\nprimary = \"a\"\nnbd_port = 7000\n\
             [[volume]]\nname = \"y\"\nsize = \"1MiB\"\nprimary = \"a\"\nnbd_port = 7000",
        )
        .unwrap();
        assert!(assign_ports(&mut d, &[]).unwrap_err().contains("both have"));
    }

    proptest! {
        /// A declaration file of any text is read or refused with a
        /// reason, never a panic; a TOML-shaped one too.
        #[test]
        fn any_declaration_text_is_read_or_refused(
            text in ".{0,400}",
            keys in proptest::collection::vec(
                ("(name|size|primary|mirrors|nbd_port|options|consistency_group|mode|node)",
                 "(\"[a-z0-9.]{0,6}\"|-?[0-9]{1,6}|\\[\\]|\\{\\}|true)"), 0..8),
        ) {
            if let Ok(mut d) = parse_file(&text) {
                let _ = assign_ports(&mut d, &[]).map(|()| check_on_nodes(&d));
            }
            let mut t = String::from("[[volume]]\n");
            for (k, v) in keys {
                t.push_str(&format!("{k} = {v}\n"));
            }
            if let Ok(mut d) = parse_file(&t) {
                let _ = assign_ports(&mut d, &[]).map(|()| check_on_nodes(&d));
            }
        }

        /// The stored form decodes to what was encoded, and arbitrary bytes
        /// never panic the decoder.
        #[test]
        fn stored_specs_round_trip_and_garbage_is_refused(
            size in 1u64..1 << 30, port in 1u16.., async_c: bool,
            garbage in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let s = VolumeSpec {
                v: FORMAT, name: "v".into(), size: size * 4096, primary: "a".into(),
                primary_mode: "sync".into(),
                mirrors: vec![Placement { node: "c".into(),
                    mode: if async_c { "async" } else { "sync" }.into(), options: BTreeMap::new() }],
                consistency_group: None, nbd_port: port, options: BTreeMap::new(),
            };
            let back: VolumeSpec = super::super::records::decode(&super::super::records::encode(&s)).unwrap();
            prop_assert_eq!(back, s);
            let _ = super::super::records::decode::<VolumeSpec>(&garbage);
        }
    }
}
