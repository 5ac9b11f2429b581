//! A throwaway etcd cluster for tests: N members (usually 3) as child
//! processes of the test, each with its own data dir, log file and ports.
//!
//! - Ports come from [`free_port`]: below the kernel's ephemeral range (so
//!   no outgoing connection is ever given one of them while a member is
//!   down and about to restart on it), probed free by binding, and never
//!   handed out twice in one process. Another process may still take one
//!   between the probe and etcd's bind; [`EtcdCluster::start`] then sees the
//!   member exit with "address already in use" and starts over on new ports.
//! - Raft timing is short for fast tests: heartbeat 50 ms, election 500 ms,
//!   and `--pre-vote` on (etcd 3.4 defaults to off), so a member that comes
//!   back from a partition does not depose a healthy leader with its
//!   inflated term.
//! - A member may run behind a launcher prefix (`ip netns exec NS`, from
//!   [`crate::netns::Sites::launcher`]) and on its own IP. The launcher must
//!   exec etcd (as `ip netns exec` and `nsenter` do): [`EtcdCluster::kill`]
//!   signals the child's pid.
//! - Everything waits by polling with a deadline; nothing sleeps a fixed
//!   time to let state settle.
//!
//! Talking to the cluster needs no etcd client: etcd 3.4 serves the v3 API
//! as JSON over HTTP (grpc-gateway) on the client port, under `/v3/`
//! (`/v3beta/` is an alias; `/v3alpha/` is gone). Keys and values are
//! base64 in the JSON, int64 fields are strings. [`http`] is a minimal
//! HTTP/1.0 client over `std::net` for that and for `GET /health`.
//!
//! Dropping the cluster kills every member and removes the data dirs; the
//! logs stay in the directory the caller gave (usually a temp dir). A test
//! process killed before its drops run leaves its members running (they
//! are not tied to the parent's life: a member may outlive the thread that
//! started it); the next [`EtcdCluster::start`] kills them ([`kill_stale`]:
//! the cluster token names the pid that started them).

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where and how one member runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    /// The IP it listens on and advertises (client and peer URLs).
    pub ip: String,
    /// Prepended to the etcd command line, e.g. `["ip","netns","exec","ns"]`.
    pub launcher: Vec<String>,
}

impl MemberSpec {
    /// 127.0.0.1, no launcher.
    pub fn loopback() -> MemberSpec {
        MemberSpec::new("127.0.0.1", Vec::new())
    }

    pub fn new(ip: impl Into<String>, launcher: Vec<String>) -> MemberSpec {
        MemberSpec {
            ip: ip.into(),
            launcher,
        }
    }
}

/// How to start a cluster. [`EtcdOpts::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct EtcdOpts {
    /// Data dirs (`m<i>.data`, removed on drop) and logs (`m<i>.log`, kept)
    /// go here; created if missing.
    pub dir: PathBuf,
    pub members: Vec<MemberSpec>,
    /// The etcd binary: `$BLOCKMIRROR_ETCD`, else `etcd` from `PATH`.
    pub binary: PathBuf,
    /// `--heartbeat-interval`, ms.
    pub heartbeat_ms: u64,
    /// `--election-timeout`, ms.
    pub election_ms: u64,
    /// `--pre-vote`.
    pub pre_vote: bool,
    /// Appended to every member's command line.
    pub extra_args: Vec<String>,
    /// How long [`EtcdCluster::start`] waits for a healthy quorum (per try).
    pub start_timeout: Duration,
}

impl EtcdOpts {
    /// `n` members on 127.0.0.1, data and logs under `dir`.
    pub fn new(dir: impl Into<PathBuf>, n: usize) -> EtcdOpts {
        EtcdOpts::with_members(dir, vec![MemberSpec::loopback(); n])
    }

    /// One member per spec, e.g. one per network namespace.
    pub fn with_members(dir: impl Into<PathBuf>, members: Vec<MemberSpec>) -> EtcdOpts {
        EtcdOpts {
            dir: dir.into(),
            members,
            binary: std::env::var_os("BLOCKMIRROR_ETCD")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("etcd")),
            heartbeat_ms: 50,
            election_ms: 500,
            pre_vote: true,
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(20),
        }
    }
}

struct Member {
    name: String,
    spec: MemberSpec,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// The log's length when the current run of the member started.
    log_start: u64,
    child: Option<Child>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{}", self.spec.ip, self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{}", self.spec.ip, self.peer_port)
    }
}

/// A running cluster; see the module docs.
pub struct EtcdCluster {
    opts: EtcdOpts,
    token: String,
    initial_cluster: String,
    members: Vec<Member>,
}

/// Start attempts when a port turns out to be taken.
const START_TRIES: usize = 3;

impl EtcdCluster {
    /// Starts every member and waits until a quorum answers `/health` with
    /// `{"health":"true"}` (which in etcd 3.4 means a leader and a
    /// committed read through raft).
    pub fn start(opts: EtcdOpts) -> Result<EtcdCluster, String> {
        if opts.members.is_empty() {
            return Err("an etcd cluster needs at least one member".into());
        }
        kill_stale();
        fs::create_dir_all(&opts.dir)
            .map_err(|e| format!("cannot create {}: {e}", opts.dir.display()))?;
        static CLUSTERS: AtomicU32 = AtomicU32::new(0);
        let k = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for attempt in 0..START_TRIES {
            let members = opts
                .members
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    Ok(Member {
                        name: format!("m{i}"),
                        spec: spec.clone(),
                        client_port: free_port()?,
                        peer_port: free_port()?,
                        data_dir: opts.dir.join(format!("m{i}.data")),
                        log_path: opts.dir.join(format!("m{i}.log")),
                        log_start: 0,
                        child: None,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            let mut cluster = EtcdCluster {
                opts: opts.clone(),
                token: format!("bm-{}-{k}-{attempt}", std::process::id()),
                initial_cluster,
                members,
            };
            // A member that exits while we wait: port taken (try again on
            // others) or anything else (give up, with its log).
            let result = (|| {
                // One after another: a new member first asks its peers
                // whether it is already bootstrapped, giving each a second;
                // a peer that has bound its port but not yet serves (one
                // started at the same moment) costs that whole second. A
                // member serves its peer port before it needs the others, so
                // waiting for that (briefly) makes the start ~1-2 s faster.
                for i in 0..cluster.len() {
                    let _ = fs::remove_dir_all(&cluster.members[i].data_dir);
                    cluster.spawn(i).map_err(|e| (false, e))?;
                    let peer = cluster.addr(i, cluster.members[i].peer_port);
                    let until = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < until && cluster.exited(i).is_none() {
                        if http(peer, "GET", "/version", None, Duration::from_millis(500)).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                let deadline = Instant::now() + cluster.opts.start_timeout;
                loop {
                    for i in 0..cluster.len() {
                        if let Some(status) = cluster.exited(i) {
                            // This run's part of the log (earlier tries'
                            // runs appended theirs before it).
                            let log = cluster.log(i);
                            let log = log
                                .get(cluster.members[i].log_start as usize..)
                                .unwrap_or(&log);
                            let busy = log.contains("address already in use");
                            return Err((
                                busy,
                                format!(
                                    "etcd member {i} exited during start ({status}); log {}:\n{}",
                                    cluster.members[i].log_path.display(),
                                    tail(log, 20)
                                ),
                            ));
                        }
                    }
                    if cluster.healthy_count(Duration::from_secs(2)) >= cluster.quorum() {
                        return Ok(());
                    }
                    if Instant::now() >= deadline {
                        return Err((
                            false,
                            format!(
                                "etcd cluster not healthy after {:?}; logs in {}",
                                cluster.opts.start_timeout,
                                cluster.opts.dir.display()
                            ),
                        ));
                    }
                    std::thread::sleep(POLL);
                }
            })();
            match result {
                Ok(()) => return Ok(cluster),
                Err((true, e)) => last = e, // dropped: killed and removed
                Err((false, e)) => return Err(e),
            }
        }
        Err(format!(
            "{START_TRIES} tries, ports taken each time; last: {last}"
        ))
    }

    /// The command line of member `i` (after its launcher).
    fn args(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let mut args = vec![
            "--name".to_string(),
            m.name.clone(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--listen-client-urls".into(),
            m.client_url(),
            "--advertise-client-urls".into(),
            m.client_url(),
            "--listen-peer-urls".into(),
            m.peer_url(),
            "--initial-advertise-peer-urls".into(),
            m.peer_url(),
            // Ignored by a member that already has a data dir (a restart).
            "--initial-cluster".into(),
            self.initial_cluster.clone(),
            "--initial-cluster-state".into(),
            "new".into(),
            "--initial-cluster-token".into(),
            self.token.clone(),
            "--heartbeat-interval".into(),
            self.opts.heartbeat_ms.to_string(),
            "--election-timeout".into(),
            self.opts.election_ms.to_string(),
            format!("--pre-vote={}", self.opts.pre_vote),
            // 3.4's default logger is the deprecated capnslog, which warns.
            "--logger".into(),
            "zap".into(),
            "--log-outputs".into(),
            "stderr".into(),
        ];
        args.extend(self.opts.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let args = self.args(i);
        let m = &mut self.members[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .map_err(|e| format!("cannot open {}: {e}", m.log_path.display()))?;
        m.log_start = log.metadata().map(|md| md.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot clone the log fd: {e}"))?;
        let (program, prefix) = match m.spec.launcher.split_first() {
            Some((p, rest)) => (PathBuf::from(p), rest.to_vec()),
            None => (self.opts.binary.clone(), Vec::new()),
        };
        let mut cmd = Command::new(&program);
        cmd.args(&prefix);
        if !m.spec.launcher.is_empty() {
            cmd.arg(&self.opts.binary);
        }
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // The daemon's settings must not leak in (ETCD_* override flags).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {} for etcd member {i}: {e}", program.display()))?;
        m.child = Some(child);
        Ok(())
    }

    /// The exit status of member `i` if it was started and has exited.
    fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.members[i]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Members needed for a majority.
    pub fn quorum(&self) -> usize {
        self.len() / 2 + 1
    }

    /// Every member's client URL, `http://ip:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// Member `i`'s client URL, `http://ip:port`.
    pub fn member_endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Member `i`'s client address (for [`http`], or a connection made in a
    /// namespace).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.addr(i, self.members[i].client_port)
    }

    fn addr(&self, i: usize, port: u16) -> SocketAddr {
        format!("{}:{port}", self.members[i].spec.ip)
            .parse()
            .expect("member IPs are IP addresses")
    }

    /// Member `i`'s peer URL.
    pub fn peer_url(&self, i: usize) -> String {
        self.members[i].peer_url()
    }

    /// Member `i`'s etcd name (`m<i>`).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Whether member `i`'s process is alive (started and not exited).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i].child.is_some() && self.exited(i).is_none()
    }

    /// SIGKILL to member `i`, and waits for it. No-op if not running.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with the same data dir, ports and flags (it
    /// rejoins from its data dir; the initial-cluster flags are ignored).
    /// Kills it first if it is running. Does not wait: see
    /// [`EtcdCluster::wait_member_healthy`].
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.spawn(i)
    }

    /// Whether member `i` answers `GET /health` with `{"health":"true"}`
    /// within `timeout`. etcd 3.4 answers false (503) without a leader, and
    /// its check is a read through raft, so a member cut off from the
    /// quorum soon says false too.
    pub fn health(&self, i: usize, timeout: Duration) -> bool {
        match http(self.client_addr(i), "GET", "/health", None, timeout) {
            Ok((_, body)) => serde_json::from_slice::<Value>(&body)
                .map(|v| v["health"] == "true")
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Members answering healthy now. They are asked at once, each on a
    /// thread: a member that is not ready yet accepts the connection but
    /// answers nothing until it is (or the timeout), and must not hold up
    /// the question to the others.
    pub fn healthy_count(&self, timeout: Duration) -> usize {
        std::thread::scope(|s| {
            let asks: Vec<_> = (0..self.len())
                .map(|i| s.spawn(move || self.health(i, timeout)))
                .collect();
            asks.into_iter()
                .map(|a| a.join().unwrap_or(false))
                .filter(|&ok| ok)
                .count()
        })
    }

    /// Polls until a quorum of members is healthy, or `timeout` passes.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), String> {
        let quorum = self.quorum();
        self.wait_for(timeout, "a healthy quorum", || {
            self.healthy_count(Duration::from_secs(2)) >= quorum
        })
    }

    /// Polls until every member is healthy, or `timeout` passes.
    pub fn wait_all_healthy(&self, timeout: Duration) -> Result<(), String> {
        let n = self.len();
        self.wait_for(timeout, "every member healthy", || {
            self.healthy_count(Duration::from_secs(2)) == n
        })
    }

    /// Polls until member `i` is healthy, or `timeout` passes.
    pub fn wait_member_healthy(&self, i: usize, timeout: Duration) -> Result<(), String> {
        self.wait_for(timeout, &format!("member {i} healthy"), || {
            self.health(i, Duration::from_secs(2))
        })
    }

    fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        mut ok: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {what} after {timeout:?}; logs in {}",
                    self.opts.dir.display()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Member `i`'s log so far (stdout and stderr, every run of it).
    pub fn log(&self, i: usize) -> String {
        fs::read(&self.members[i].log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Member `i`'s log file.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log_path
    }

    /// POSTs `body` to a v3 gateway path on member `i` (e.g.
    /// `/v3/kv/range`) and returns the JSON answer; a non-200 answer is an
    /// Err with etcd's message.
    pub fn post_json(
        &self,
        i: usize,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, String> {
        post_json(self.client_addr(i), path, body, timeout)
    }

    /// Puts `key` = `value` through member `i`; the revision it made.
    pub fn put(
        &self,
        i: usize,
        key: &[u8],
        value: &[u8],
        timeout: Duration,
    ) -> Result<i64, String> {
        let v = self.post_json(
            i,
            "/v3/kv/put",
            &json!({"key": b64encode(key), "value": b64encode(value)}),
            timeout,
        )?;
        int_field(&v["header"]["revision"])
            .ok_or_else(|| format!("put answer without a revision: {v}"))
    }

    /// A linearizable read of `key` through member `i` (needs a quorum).
    pub fn get(&self, i: usize, key: &[u8], timeout: Duration) -> Result<Option<Vec<u8>>, String> {
        self.range(i, key, false, timeout)
    }

    /// A serializable read of `key` from member `i`'s own copy (no quorum
    /// needed; may be stale).
    pub fn get_local(
        &self,
        i: usize,
        key: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        self.range(i, key, true, timeout)
    }

    fn range(
        &self,
        i: usize,
        key: &[u8],
        serializable: bool,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        let v = self.post_json(
            i,
            "/v3/kv/range",
            &json!({"key": b64encode(key), "serializable": serializable}),
            timeout,
        )?;
        range_value(&v)
    }

    /// Puts `key` = `value` attached to `lease` (from [`EtcdCluster::grant`]);
    /// the revision it made.
    pub fn put_with_lease(
        &self,
        i: usize,
        key: &[u8],
        value: &[u8],
        lease: i64,
        timeout: Duration,
    ) -> Result<i64, String> {
        let v = self.post_json(
            i,
            "/v3/kv/put",
            &json!({"key": b64encode(key), "value": b64encode(value), "lease": lease.to_string()}),
            timeout,
        )?;
        int_field(&v["header"]["revision"])
            .ok_or_else(|| format!("put answer without a revision: {v}"))
    }

    /// Deletes `key`; how many keys went (0 or 1).
    pub fn delete(&self, i: usize, key: &[u8], timeout: Duration) -> Result<i64, String> {
        let v = self.post_json(
            i,
            "/v3/kv/deleterange",
            &json!({"key": b64encode(key)}),
            timeout,
        )?;
        Ok(int_field(&v["deleted"]).unwrap_or(0))
    }

    /// Every key starting with `prefix` (all keys for an empty one), in key
    /// order, read linearizably through member `i`.
    pub fn list(&self, i: usize, prefix: &[u8], timeout: Duration) -> Result<Vec<Kv>, String> {
        let v = self.post_json(
            i,
            "/v3/kv/range",
            // Every key: etcd wants key "\0" (an empty key is refused).
            &json!({
                "key": b64encode(if prefix.is_empty() { &[0] } else { prefix }),
                "range_end": b64encode(&prefix_end(prefix)),
            }),
            timeout,
        )?;
        v["kvs"]
            .as_array()
            .map(|kvs| kvs.iter().map(Kv::from_json).collect())
            .unwrap_or(Ok(Vec::new()))
    }

    /// Grants a lease of `ttl_secs` through member `i`; its id. etcd raises
    /// a TTL below its minimum (1.5 election timeouts, rounded up to whole
    /// seconds) to that.
    pub fn grant(&self, i: usize, ttl_secs: i64, timeout: Duration) -> Result<i64, String> {
        let v = self.post_json(
            i,
            "/v3/lease/grant",
            &json!({"TTL": ttl_secs.to_string()}),
            timeout,
        )?;
        if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(format!("lease grant: {e}"));
        }
        int_field(&v["ID"]).ok_or_else(|| format!("grant answer without an ID: {v}"))
    }

    /// One keep-alive of `lease` (the gateway's keep-alive is a stream; one
    /// message in, one out); the TTL it was renewed to. An expired or
    /// unknown lease is an Err.
    pub fn keep_alive_once(&self, i: usize, lease: i64, timeout: Duration) -> Result<i64, String> {
        let v = self.post_json(
            i,
            "/v3/lease/keepalive",
            &json!({"ID": lease.to_string()}),
            timeout,
        )?;
        match int_field(&v["result"]["TTL"]) {
            Some(ttl) if ttl > 0 => Ok(ttl),
            _ => Err(format!(
                "lease {lease} not renewed (expired or unknown): {v}"
            )),
        }
    }

    /// The seconds `lease` has left, or None if it expired or never was.
    pub fn time_to_live(
        &self,
        i: usize,
        lease: i64,
        timeout: Duration,
    ) -> Result<Option<i64>, String> {
        let v = self.post_json(
            i,
            "/v3/lease/timetolive",
            &json!({"ID": lease.to_string()}),
            timeout,
        )?;
        // Whole seconds, rounded down; 0 is left out of the JSON; -1 is gone.
        Ok(Some(int_field(&v["TTL"]).unwrap_or(0)).filter(|&t| t >= 0))
    }

    /// Revokes `lease`, deleting the keys attached to it.
    pub fn revoke(&self, i: usize, lease: i64, timeout: Duration) -> Result<(), String> {
        self.post_json(
            i,
            "/v3/lease/revoke",
            &json!({"ID": lease.to_string()}),
            timeout,
        )
        .map(|_| ())
    }

    /// The index of the member member `i` believes is the leader (from
    /// `/v3/maintenance/status`), if it knows one.
    pub fn leader_seen_by(&self, i: usize, timeout: Duration) -> Option<usize> {
        let status = self
            .post_json(i, "/v3/maintenance/status", &json!({}), timeout)
            .ok()?;
        let leader = status["leader"].as_str()?;
        if leader == "0" {
            return None;
        }
        // Member ids are only known through the members' own answers.
        (0..self.len()).find(|&j| {
            self.post_json(j, "/v3/maintenance/status", &json!({}), timeout)
                .ok()
                .and_then(|s| s["header"]["member_id"].as_str().map(|id| id == leader))
                .unwrap_or(false)
        })
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        for m in &self.members {
            let _ = fs::remove_dir_all(&m.data_dir);
        }
    }
}

/// Kills etcd members that an earlier test process started and left
/// behind when it died without running its drops (SIGKILL, a panic in a
/// signal handler): any process whose command line has
/// `--initial-cluster-token bm-<pid>-...` for a `<pid>` no longer alive.
/// Nothing else is touched.
pub fn kill_stale() {
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let Some(token) = args
            .windows(2)
            .find(|w| w[0] == b"--initial-cluster-token")
            .map(|w| String::from_utf8_lossy(w[1]).into_owned())
        else {
            continue;
        };
        let Some(owner) = token
            .strip_prefix("bm-")
            .and_then(|t| t.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{owner}")).exists() {
            // SAFETY: kill(2) on a pid; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(50);

/// The first 5 and the last `lines` lines of a log (a flag error comes
/// first, before pages of usage; a crash comes last).
fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    if all.len() <= lines + 5 {
        return all.join("\n");
    }
    format!(
        "{}\n[...]\n{}",
        all[..5].join("\n"),
        all[all.len() - lines..].join("\n")
    )
}

/// An int64 field of a gateway answer: a JSON string ("12"), or a number.
fn int_field(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// One key of a range answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The lease it is attached to, 0 for none.
    pub lease: i64,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
}

impl Kv {
    /// From the gateway's JSON (fields at their zero value are left out).
    pub fn from_json(v: &Value) -> Result<Kv, String> {
        let bytes = |f: &str| b64decode(v[f].as_str().unwrap_or(""));
        let int = |f: &str| int_field(&v[f]).unwrap_or(0);
        Ok(Kv {
            key: bytes("key")?,
            value: bytes("value")?,
            lease: int("lease"),
            create_revision: int("create_revision"),
            mod_revision: int("mod_revision"),
            version: int("version"),
        })
    }
}

/// The `range_end` that makes a range of every key starting with `prefix`:
/// the prefix with its last byte below 0xff raised by one; `[0]` (every
/// key) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The value of the first key in a `/v3/kv/range` answer, None if no key.
pub fn range_value(v: &Value) -> Result<Option<Vec<u8>>, String> {
    match v["kvs"].as_array().and_then(|kvs| kvs.first()) {
        None => Ok(None),
        // An empty value is left out of the JSON.
        Some(kv) => b64decode(kv["value"].as_str().unwrap_or("")).map(Some),
    }
}

/// POSTs JSON to `addr` and parses the JSON answer; non-200 is an Err
/// carrying etcd's error message.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, String> {
    let (status, answer) = http(
        addr,
        "POST",
        path,
        Some(body.to_string().as_bytes()),
        timeout,
    )?;
    parse_answer(status, &answer, path)
}

/// The JSON of an answer; non-200 is an Err carrying etcd's error message.
pub fn parse_answer(status: u16, answer: &[u8], path: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(answer).map_err(|e| {
        format!(
            "{path}: HTTP {status}, not JSON ({e}): {}",
            String::from_utf8_lossy(answer)
        )
    })?;
    if status != 200 {
        return Err(format!(
            "{path}: HTTP {status}: {}",
            v["error"].as_str().unwrap_or(&v.to_string())
        ));
    }
    Ok(v)
}

/// One HTTP/1.0 request to `addr`, answered within `timeout` (connect,
/// send and the whole answer): the status code and the body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("{method} {path} on {addr}: connect: {e}"))?;
    http_on(stream, &addr.to_string(), method, path, body, deadline)
}

/// [`http`] over a stream already connected (e.g. one made inside a
/// network namespace by [`crate::netns::Sites::connect`]).
pub fn http_on(
    mut stream: TcpStream,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    deadline: Instant,
) -> Result<(u16, Vec<u8>), String> {
    let what = |e: &dyn std::fmt::Display| format!("{method} {path} on {host}: {e}");
    let left = |now: Instant| {
        deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    };
    // HTTP/1.0 and no keep-alive: Go answers with a Content-Length (or
    // until close), never chunked, and closes.
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or(&[]));
    stream
        .set_write_timeout(Some(left(Instant::now()).map_err(|e| what(&e))?))
        .and_then(|_| stream.write_all(&bytes))
        .map_err(|e| what(&e))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let d = left(Instant::now()).map_err(|e| what(&e))?;
        stream.set_read_timeout(Some(d)).map_err(|e| what(&e))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(what(&"timed out"));
            }
            Err(e) => return Err(what(&e)),
        }
        if let Some(done) = complete(&answer) {
            return done.map_err(|e| what(&e));
        }
    }
    parse_response(&answer, true).map_err(|e| what(&e))
}

/// A response already complete by its Content-Length, if it is.
fn complete(answer: &[u8]) -> Option<Result<(u16, Vec<u8>), String>> {
    let end = find(answer, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    (answer.len() >= end + 4 + len).then(|| parse_response(answer, false))
}

/// Splits a whole response into status and body (dechunking if needed).
pub fn parse_response(answer: &[u8], at_eof: bool) -> Result<(u16, Vec<u8>), String> {
    let end = find(answer, b"\r\n\r\n").ok_or("answer ended inside its headers")?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let l = l.to_ascii_lowercase();
        if let Some(v) = l.strip_prefix("transfer-encoding:") {
            chunked = v.contains("chunked");
        } else if let Some(v) = l.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let rest = &answer[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            return Err(format!("body cut short: {} of {n} bytes", rest.len()));
        }
        rest[..n].to_vec()
    } else if at_eof {
        rest.to_vec()
    } else {
        return Err("body of unknown length".into());
    };
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = find(rest, b"\r\n").ok_or("chunk size line cut short")?;
        let line = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {line:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body); // trailers ignored
        }
        if rest.len() < size {
            return Err("chunk cut short".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Ports this process has handed out (never twice: a killed member's ports
/// stay its own for its restart).
static USED_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Ports are taken from here: below Linux's default ephemeral range
/// (32768..60999), so connect() never picks one as a local port, and clear
/// of etcd's defaults and the ports of `scripts/etcd.sh`.
const PORT_RANGE: std::ops::Range<u16> = 23000..32000;

/// A TCP port free on every address now, not handed out before by this
/// process. Start points differ by pid, so parallel test processes mostly
/// probe different ports; a lost race shows as a bind error later.
pub fn free_port() -> Result<u16, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let base = std::process::id().wrapping_mul(2654435761) % span;
    let mut used = USED_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let used = used.get_or_insert_with(HashSet::new);
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = PORT_RANGE.start + ((base + k * 7) % span) as u16;
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            used.insert(port);
            return Ok(port);
        }
    }
    Err(format!("no free port in {PORT_RANGE:?}"))
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what the gateway takes for bytes fields).
pub fn b64encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for j in 0..4 {
            if j <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * j) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional).
pub fn b64decode(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = B64
            .iter()
            .position(|&x| x == c)
            .ok_or_else(|| format!("not base64: {s:?}"))? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for (plain, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64encode(plain), enc);
            assert_eq!(b64decode(enc).unwrap(), plain);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(b64decode(&b64encode(&all)).unwrap(), all);
        assert!(b64decode("Zm9v!").is_err());
    }

    #[test]
    fn responses_parse_by_length_chunks_or_eof() {
        let r = b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(complete(r).unwrap().unwrap(), (200, b"hello".to_vec()));
        assert!(complete(&r[..r.len() - 1]).is_none());
        let c = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX: y\r\n\r\n";
        assert_eq!(parse_response(c, true).unwrap(), (404, b"abcde".to_vec()));
        let e = b"HTTP/1.0 503 Service Unavailable\r\n\r\n{}";
        assert_eq!(parse_response(e, true).unwrap(), (503, b"{}".to_vec()));
        assert!(parse_response(b"HTTP/1.0 200", true).is_err());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"/bm/"), b"/bm0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert_eq!(ports.len(), 50);
        assert!(ports.iter().all(|p| PORT_RANGE.contains(p)));
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = EtcdOpts::new(dir.path(), 1);
        opts.binary = "/nonexistent/etcd".into();
        let err = EtcdCluster::start(opts).err().unwrap();
        assert!(err.contains("cannot run /nonexistent/etcd"), "{err}");
    }
}
