//! Sites on one machine: K network namespaces, each joined by a veth pair
//! to a bridge in the root namespace, so processes in different "sites"
//! talk over real (virtual) links that can be cut.
//!
//! ```text
//!   root ns: bmbr<N> 10.251.N.1/24 ─┬─ bmv<N>s0 ══ eth0 10.251.N.10  (ns bm-<pid>-<k>-0)
//!                                   ├─ bmv<N>s1 ══ eth0 10.251.N.11  (ns bm-<pid>-<k>-1)
//!                                   └─ ...
//! ```
//!
//! - Sites reach each other at layer 2 through the bridge (no IP
//!   forwarding involved) and reach the root namespace at the bridge's .1.
//!   Bridge netfilter: the bridge's own `nf_call_*` options are switched off,
//!   but a host with `br_netfilter` loaded and
//!   `net.bridge.bridge-nf-call-iptables=1` still passes bridged packets
//!   through its iptables FORWARD chain (the global switch ORs with the
//!   bridge's); with a DROP policy there, sites cannot talk. This
//!   machine has no iptables rules, so it works here.
//! - The /24 is claimed by adding an `unreachable` route for it (metric
//!   4000) in the root namespace: adding fails if another run holds it, so
//!   two processes never share a subnet, and whatever state the bridge is
//!   in, the subnet's traffic never takes the default route off this
//!   machine. The namespaces have no default route at all.
//! - [`Sites::partition`] sets the root end of the site's veth down: the
//!   site's end loses carrier, packets either way are silently lost (no
//!   reset, no error), while inside the site its own address still works
//!   (processes there still reach each other and a local etcd member).
//! - Drop deletes the namespaces (and with them the veth pairs), the
//!   bridge and the route; [`Sites::create`] first removes what runs of
//!   dead processes left behind.
//!
//! Needs root (CAP_NET_ADMIN) and `ip netns`; [`Sites::create`] says which
//! is missing, so a test can print it and skip.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The /24s used: 10.251.N.0/24, N in 1..=254.
const PREFIX: &str = "10.251";
/// The metric of the claiming `unreachable` route.
const METRIC: &str = "4000";
/// The alias that marks a bridge as ours (with the creating pid after it).
const ALIAS: &str = "blockmirror-testkit-sites pid ";

struct Site {
    ns: String,
    /// The veth end in the root namespace, a port of the bridge.
    host_if: String,
    ip: String,
    /// Whether the namespace was made (for drop after a failed create).
    made: bool,
}

/// K sites on one bridge; see the module docs.
pub struct Sites {
    bridge: String,
    bridge_ip: String,
    subnet: String,
    sites: Vec<Site>,
    bridge_made: bool,
}

/// Runs `ip` with `args`; its stderr in the Err.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Ok if this process can make namespaces: root, and `ip netns` works.
pub fn available() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Err("not root".into());
    }
    ip(&["netns", "list"])
        .map(|_| ())
        .map_err(|e| format!("`ip netns` unavailable: {e}"))
}

impl Sites {
    /// Creates `k` sites (at most 240), or says why it cannot.
    pub fn create(k: usize) -> Result<Sites, String> {
        available()?;
        if k > 240 {
            return Err(format!("{k} sites: at most 240 fit in a /24"));
        }
        cleanup_stale();
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let n = claim_subnet(pid, run)?;
        let mut me = Sites {
            bridge: format!("bmbr{n}"),
            bridge_ip: format!("{PREFIX}.{n}.1"),
            subnet: format!("{PREFIX}.{n}.0/24"),
            sites: (0..k)
                .map(|i| Site {
                    ns: format!("bm-{pid}-{run}-{i}"),
                    host_if: format!("bmv{n}s{i}"),
                    ip: format!("{PREFIX}.{n}.{}", 10 + i),
                    made: false,
                })
                .collect(),
            bridge_made: false,
        };
        // On an error, dropping `me` removes what was made.
        me.build()?;
        Ok(me)
    }

    fn build(&mut self) -> Result<(), String> {
        let br = self.bridge.clone();
        ip(&[
            "link",
            "add",
            &br,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        self.bridge_made = true;
        ip(&[
            "link",
            "set",
            &br,
            "alias",
            &format!("{ALIAS}{}", std::process::id()),
        ])?;
        // Not every iproute2 knows these; the host's sysctls decide anyway.
        let _ = ip(&[
            "link",
            "set",
            &br,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
            "nf_call_ip6tables",
            "0",
            "nf_call_arptables",
            "0",
        ]);
        ip(&["addr", "add", &format!("{}/24", self.bridge_ip), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..self.sites.len() {
            let (ns, host_if, addr) = {
                let s = &self.sites[i];
                (s.ns.clone(), s.host_if.clone(), format!("{}/24", s.ip))
            };
            ip(&["netns", "add", &ns])?;
            self.sites[i].made = true;
            // The site's end is made inside the namespace, as eth0.
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host_if, "master", &br])?;
            ip(&["link", "set", &host_if, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Site `i`'s namespace name (`bm-<pid>-<run>-<i>`).
    pub fn ns(&self, i: usize) -> &str {
        &self.sites[i].ns
    }

    /// Site `i`'s address (10.251.N.(10+i)), on its `eth0`.
    pub fn ip(&self, i: usize) -> &str {
        &self.sites[i].ip
    }

    /// The root namespace's address on the bridge (10.251.N.1): how sites
    /// reach processes running here.
    pub fn bridge_ip(&self) -> &str {
        &self.bridge_ip
    }

    /// The bridge's name (`bmbr<N>`).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The sites' subnet, 10.251.N.0/24.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// The root-namespace end of site `i`'s veth pair (a bridge port).
    pub fn host_if(&self, i: usize) -> &str {
        &self.sites[i].host_if
    }

    /// `["ip", "netns", "exec", NS]`: put it before a command line to run
    /// that command in site `i`.
    pub fn launcher(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", self.ns(i)]
            .map(str::to_string)
            .to_vec()
    }

    /// A `Command` that runs `program` in site `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(i), program]);
        cmd
    }

    /// Cuts site `i` off: the root end of its veth goes down. Nothing is
    /// closed or refused; packets to and from the site are lost.
    pub fn partition(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", self.host_if(i), "down"]).map(|_| ())
    }

    /// Restores site `i`'s link.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", self.host_if(i), "up"]).map(|_| ())
    }

    /// Whether site `i` is cut off (its link is administratively down).
    pub fn is_partitioned(&self, i: usize) -> Result<bool, String> {
        let out = ip(&["-o", "link", "show", self.host_if(i)])?;
        Ok(!out
            .split(['<', '>'])
            .nth(1)
            .unwrap_or("")
            .split(',')
            .any(|f| f == "UP"))
    }

    /// Runs `f` on a thread of its own that has entered site `i`'s network
    /// namespace: sockets it makes belong to the site (and keep working
    /// when handed back to other threads).
    pub fn in_ns<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.ns(i));
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
                // SAFETY: setns on a valid namespace fd; it changes only
                // this thread, which ends when `f` returns.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| "the closure run in the namespace panicked".to_string())?
        })
    }

    /// A TCP connection to `addr` made from inside site `i` (e.g. to an
    /// etcd member that the root namespace cannot reach while the site is
    /// partitioned).
    pub fn connect(&self, i: usize, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.in_ns(i, || TcpStream::connect_timeout(&addr, timeout))
            .map_err(io::Error::other)?
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        // Deleting a namespace deletes its eth0, and so the whole pair;
        // the root ends are deleted too in case a namespace outlives us
        // (a process still in it).
        for s in &self.sites {
            let _ = ip(&["link", "del", &s.host_if]);
            if s.made {
                let _ = ip(&["netns", "del", &s.ns]);
            }
        }
        if self.bridge_made {
            let _ = ip(&["link", "del", &self.bridge]);
        }
        let _ = ip(&[
            "route",
            "del",
            "unreachable",
            &self.subnet,
            "metric",
            METRIC,
        ]);
    }
}

/// Claims a free 10.251.N.0/24 with its `unreachable` route (which fails
/// when the route exists: the claim is atomic between processes), starting
/// from a point that depends on the pid and run.
fn claim_subnet(pid: u32, run: u32) -> Result<u32, String> {
    let used = ip(&["-4", "addr", "show"]).unwrap_or_default()
        + &ip(&["-4", "route", "show", "table", "all"]).unwrap_or_default();
    let start = (pid.wrapping_mul(31) + run * 7) % 254;
    for j in 0..254 {
        let n = (start + j) % 254 + 1;
        let net = format!("{PREFIX}.{n}.");
        if used.contains(&net) {
            continue;
        }
        let subnet = format!("{net}0/24");
        if ip(&["route", "add", "unreachable", &subnet, "metric", METRIC]).is_ok() {
            return Ok(n);
        }
    }
    Err(format!("no free {PREFIX}.N.0/24 left"))
}

/// Removes what runs of processes no longer alive left behind (a test
/// killed before its drop ran): their namespaces, bridges and routes.
pub fn cleanup_stale() {
    // Their etcd members first: a process left in a namespace keeps it
    // (and its veth pair) alive after its name is deleted.
    crate::etcd::kill_stale();
    let alive = |pid: &str| std::path::Path::new(&format!("/proc/{pid}")).exists();
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if let (Some("bm"), Some(pid), Some(_), Some(_), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            if pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    // `ip -o link show type bridge`: "7: bmbr12: <...> ... \    alias X"
    for line in ip(&["-o", "link", "show", "type", "bridge"])
        .unwrap_or_default()
        .lines()
    {
        let name = line.split(": ").nth(1).unwrap_or("").trim_end_matches(':');
        let Some(n) = name.strip_prefix("bmbr") else {
            continue;
        };
        let Some(pid) = line
            .split(ALIAS)
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        else {
            continue;
        };
        if !alive(pid) {
            for port in ip(&["-o", "link", "show", "master", name])
                .unwrap_or_default()
                .lines()
            {
                let port = port.split(": ").nth(1).unwrap_or("");
                let port = port.split('@').next().unwrap_or("");
                if port.starts_with("bmv") {
                    let _ = ip(&["link", "del", port]);
                }
            }
            let _ = ip(&["link", "del", name]);
            let _ = ip(&[
                "route",
                "del",
                "unreachable",
                &format!("{PREFIX}.{n}.0/24"),
                "metric",
                METRIC,
            ]);
        }
    }
}
