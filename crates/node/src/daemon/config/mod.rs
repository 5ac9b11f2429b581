//! The node config file (TOML), parsed into a validated [`NodeConfig`].
//!
//! Parsing has two steps: serde reads the file into `Raw*` structs that
//! refuse unknown keys, then `validate` checks every value and the
//! cross-field rules and builds the typed config. Every error names the file,
//! the key (`volume[1].nbd`) and the reason.
//!
//! Features that are not built yet are parsed like the
//! rest and refused in validation with [`ConfigError::Unsupported`], so
//! lifting them later only touches validation.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockmirror_repl::{Codec, MAX_DATA};
use serde::Deserialize;

/// The admin address used when a config has no `admin` key, and by the CLI
/// when there is no config in the current directory.
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7780);

/// The config file the CLI looks for in the current directory.
pub const DEFAULT_CONFIG_FILE: &str = "blockmirror.toml";

/// Sizes must be a multiple of this many bytes.
pub const SIZE_ALIGN: u64 = 512;

const SIZE_EXAMPLES: &str = "examples: 1GiB, 512MiB, 4096";
const ADDR_FORM: &str = "HOST:PORT, e.g. 127.0.0.1:7780";
/// Default for `max_lag_bytes` of an async mirror.
pub const DEFAULT_MAX_LAG_BYTES: u64 = 64 << 20;
/// Default for `max_lag_seconds` of an async mirror.
pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);
/// Default for `start_wait`.
pub const DEFAULT_START_WAIT: Duration = Duration::from_secs(5);
/// Default for `mirror_timeout`.
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for `bitmap_granularity`.
pub const DEFAULT_BITMAP_GRANULARITY: u64 = 64 * 1024;
/// Most apply tasks (worker threads) one mirror volume may have.
pub const MAX_APPLY_TASKS: usize = 256;
/// Default for `track_size`: host writes larger than this are split into
/// track subtasks prepared in parallel (seeds 000/001).
pub const DEFAULT_TRACK_SIZE: u64 = 64 * 1024;
/// Smallest `track_size`.
pub const MIN_TRACK_SIZE: u64 = 4096;
/// Default for `job_timeout` (seed 002's four seconds).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(4);
/// Default for `primary_silence`: a primary pings an idle link every second,
/// so ten seconds without a frame means it is gone.
pub const DEFAULT_PRIMARY_SILENCE: Duration = Duration::from_secs(10);
/// Default for `job_idle_timeout`.
pub const DEFAULT_JOB_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A validated node config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's name, unique in the deployment.
    pub node: String,
    /// The replication listener, if any.
    pub listen: Option<SocketAddr>,
    /// The admin HTTP address ([`DEFAULT_ADMIN_ADDR`] when the key is absent).
    pub admin: SocketAddr,
    /// The shared secret file, resolved against the config file's directory.
    /// Not opened here.
    pub secret_file: Option<PathBuf>,
    /// At least one volume; names and NBD addresses are unique.
    pub volumes: Vec<VolumeConfig>,
    /// On a mirror node: how long one disk fetch of a verify or remote-read
    /// job may take before the job ends with a timeout (key `job_timeout`,
    /// default [`DEFAULT_JOB_TIMEOUT`]).
    pub job_timeout: Duration,
    /// On a mirror node: a replication link that brings no frame (not even
    /// the primary's once-a-second ping) for this long is taken as dead
    /// (key `primary_silence`, default [`DEFAULT_PRIMARY_SILENCE`]).
    pub primary_silence: Duration,
    /// On a mirror node: a job connection that brings no frame for this long
    /// while none of its requests is being worked on is closed and its jobs
    /// leave the job table (key `job_idle_timeout`, default
    /// [`DEFAULT_JOB_IDLE_TIMEOUT`]).
    pub job_idle_timeout: Duration,
    /// The config file this was read from.
    pub path: PathBuf,
}

/// One `[[volume]]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Non-empty, `[A-Za-z0-9_.-]`; also the NBD export name.
    pub name: String,
    /// Backing file or block device, resolved against the config file's directory.
    pub path: PathBuf,
    /// Size in bytes: non-zero and a multiple of [`SIZE_ALIGN`].
    pub size: u64,
    pub role: Role,
    pub nbd: NbdListen,
    pub consistency_group: Option<String>,
    /// Open the backing store with O_DIRECT (key `direct_io`, default false).
    pub direct_io: bool,
    /// Export read-only even on a primary (key `read_only`, default false).
    pub read_only: bool,
    /// On a primary: where its changes are mirrored (`[[volume.mirror]]`).
    pub mirrors: Vec<MirrorConfig>,
    /// What a mirror failure does to host writes (key `on_mirror_failure`).
    pub on_mirror_failure: FailurePolicy,
    /// A mirror request unanswered this long fails the link (key `mirror_timeout`, default 5s).
    pub mirror_timeout: Duration,
    /// A primary with mirrors holds host writes at start until each link
    /// has met its peer once (or failed to reach it), at most this long
    /// (key `start_wait`, default 5s; "0s": not at all). A returning old
    /// primary thus learns that its mirror was promoted, and demotes
    /// itself, before a host can write to it and cause a split brain.
    pub start_wait: Duration,
    /// Granularity of the out-of-sync bitmap (key `bitmap_granularity`, default 64KiB).
    pub bitmap_granularity: u64,
    /// On a mirror: range groups of the apply engine (key `apply_groups`, default 4).
    pub apply_groups: usize,
    /// On a mirror: apply tasks per group (key `apply_tasks_per_group`, default 2).
    pub apply_tasks_per_group: usize,
    /// Writes larger than this are split at track boundaries into subtasks
    /// for the mirrors (key `track_size`, default 64KiB; a power of two from
    /// 4KiB to 32MiB).
    pub track_size: u64,
    /// How a primary fills and resyncs its mirrors (keys `initial_sync`,
    /// `resync_threshold`, `resync_max_suspension`).
    pub resync: ResyncConfig,
    /// On a primary: where host reads go (key `read_policy`, default "primary").
    pub read_policy: ReadPolicy,
    /// On a primary: what a local backend I/O error does (key
    /// `on_primary_failure`, default "fail").
    pub on_primary_failure: PrimaryFailurePolicy,
    /// For tests only: wrap the backend in a fault injector that
    /// `POST /volumes/{name}/faults` sets (key `fault_injection`, default false).
    pub fault_injection: bool,
}

/// Where a primary's host reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPolicy {
    /// Always the local backend.
    Primary,
    /// The local backend or an in-sync sync mirror, whichever path has the
    /// lower measured read latency (seed 004, FIG. 9).
    Balanced,
}

impl ReadPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadPolicy::Primary => "primary",
            ReadPolicy::Balanced => "balanced",
        }
    }
}

/// What a primary does when its local backend fails an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryFailurePolicy {
    /// The host gets the error.
    Fail,
    /// The local disk is marked failed and no longer used: reads are remote
    /// reads from an in-sync sync mirror, writes go to the in-sync sync
    /// mirrors only (DRBD's `on-io-error detach`).
    ServeFromMirror,
}

impl PrimaryFailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PrimaryFailurePolicy::Fail => "fail",
            PrimaryFailurePolicy::ServeFromMirror => "serve_from_mirror",
        }
    }
}

/// How a blank mirror (new, replaced, or discarded) is filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialSync {
    /// Seed 004 FIG. 2: host writes only mark the change mask while passes
    /// copy what it marks; once a pass leaves at most `resync_threshold`
    /// marked, host writes are suspended briefly for a final copy.
    Iterative,
    /// DRBD-style: the link is live at once (host writes replicated) and the
    /// marked regions are copied under range locks.
    Live,
}

/// Resync settings of one primary volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncConfig {
    /// Key `initial_sync`: `iterative` (default) or `live`.
    pub initial_sync: InitialSync,
    /// Key `resync_threshold` (default 16MiB): an iterative sync suspends host
    /// writes for its final copy once a pass leaves at most this much marked.
    pub threshold: u64,
    /// Key `resync_max_suspension` (default 500ms): a final copy that would
    /// hold host writes longer is cut short; host writes resume and passes go on.
    pub max_suspension: Duration,
    /// Key `resync_rate` (bytes per second, default 0: unlimited): the copy
    /// of every resync is paced to this, leaving the rest of the link and
    /// the disks to host I/O. Changed at run time by `blockmirror resync --rate`.
    pub rate: u64,
    /// Key `resync_checksum` (default false): before copying a region, ask
    /// the mirror for its BLAKE3 hash and send the data only if it differs
    /// (DRBD's csums-alg). Saves the link when marked regions mostly match.
    pub checksum: bool,
    /// Key `resync_host_share` (percent, 0 to 90, default 0): while hosts
    /// write (seen in the last 100 ms), the copy runs at `resync_rate` less
    /// this share, leaving it to host I/O. Needs a `resync_rate`.
    pub host_share: u8,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            initial_sync: InitialSync::Iterative,
            threshold: 16 << 20,
            max_suspension: Duration::from_millis(500),
            rate: 0,
            checksum: false,
            host_share: 0,
        }
    }
}

/// One `[[volume.mirror]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The mirror node's `listen` address, as written (host:port).
    pub peer: String,
    /// The resolved address.
    pub addr: SocketAddr,
    pub mode: MirrorMode,
    /// How Write data is compressed on this link (key `compression`:
    /// "none", the default, "lz4" or "zstd").
    pub compression: Codec,
    /// Async: most write data acknowledged to hosts and not yet to this
    /// mirror (key `max_lag_bytes`, default 64MiB).
    pub max_lag_bytes: u64,
    /// Async: oldest unacknowledged write's age allowed (key
    /// `max_lag_seconds`, default 5s; the RPO bound).
    pub max_lag: Duration,
    /// Async: what happens past either bound (key `lag_policy`).
    pub lag_policy: LagPolicy,
    /// Async: every epoch is made durable on the mirror (an fdatasync)
    /// before the next one starts (key `durable_barriers`, default false),
    /// so the mirror stays crash-consistent across an OS crash or power
    /// loss of its own, not only a crash of its process.
    pub durable_barriers: bool,
}

/// What an async mirror does when its lag passes a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagPolicy {
    /// Host writes wait for the mirror (each waits for its own
    /// acknowledgement) until the lag is back under the bound: the mirror
    /// stays consistent, the host slows to the link's pace.
    Throttle,
    /// Writes past the bound are recorded in the out-of-sync bitmap instead
    /// of being sent; the mirror is inconsistent until a resync copies them.
    Bitmap,
}

impl LagPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            LagPolicy::Throttle => "throttle",
            LagPolicy::Bitmap => "bitmap",
        }
    }
}

/// How a mirror follows its primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorMode {
    /// The host's write completes only when the mirror has it.
    Sync,
    /// The host's write completes after the local write; the mirror follows
    /// in dependency order, a bounded distance behind.
    Async,
}

impl MirrorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorMode::Sync => "sync",
            MirrorMode::Async => "async",
        }
    }

    pub fn from_name(s: &str) -> Option<MirrorMode> {
        match s {
            "sync" => Some(MirrorMode::Sync),
            "async" => Some(MirrorMode::Async),
            _ => None,
        }
    }
}

/// What a failed mirror does to host writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// The mirror is marked degraded; host writes go on and are recorded in
    /// the out-of-sync bitmap for a later resync.
    Degrade,
    /// Host writes fail with EIO until the mirror is back (RPO zero).
    Fence,
}

/// A volume's replication role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Mirror,
}

impl Role {
    /// The config and /status spelling: `primary` or `mirror`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Mirror => "mirror",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a volume's NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdListen {
    Tcp(SocketAddr),
    /// A Unix socket path, resolved against the config file's directory.
    Unix(PathBuf),
}

impl NbdListen {
    /// The NBD URI a client uses for export `name` on this listener, e.g.
    /// `nbd://127.0.0.1:10809/db` or `nbd+unix:///db?socket=/run/db.sock`.
    pub fn uri(&self, name: &str) -> String {
        match self {
            NbdListen::Tcp(addr) => format!("nbd://{addr}/{name}"),
            NbdListen::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
        }
    }
}

impl fmt::Display for NbdListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdListen::Tcp(addr) => write!(f, "{addr}"),
            NbdListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a config was refused. Each variant names the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key; `message` is toml's,
    /// with line and column.
    #[error("config {}: {message}", .path.display())]
    Syntax { path: PathBuf, message: String },
    /// A value that parsed but is not acceptable.
    #[error("config {}: {key}: {reason}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// A duration or size that does not parse or is out of range.
    #[error("config {}: {error}", .path.display())]
    Value {
        path: PathBuf,
        #[source]
        error: ValueError,
    },
    /// A key for a feature this version does not have yet.
    #[error("config {}: {key}: {reason}", .path.display())]
    Unsupported {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

impl ConfigError {
    /// The config file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Read { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::Value { path, .. }
            | ConfigError::Unsupported { path, .. } => path,
        }
    }

    /// The offending key, for `Invalid` and `Unsupported`.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Unsupported { key, .. } => Some(key),
            ConfigError::Value { error, .. } => Some(&error.key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

impl NodeConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text, path)
    }

    /// Parses and validates config `text`; `path` is where it came from (used
    /// in errors and to resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let raw: RawNode = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        validate(raw, path)
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

/// The admin address of `cwd/blockmirror.toml` if that file exists and is
/// valid, else [`DEFAULT_ADMIN_ADDR`].
pub fn default_admin_addr(cwd: &Path) -> SocketAddr {
    let path = cwd.join(DEFAULT_CONFIG_FILE);
    if !path.is_file() {
        return DEFAULT_ADMIN_ADDR;
    }
    NodeConfig::load(&path)
        .map(|c| c.admin)
        .unwrap_or(DEFAULT_ADMIN_ADDR)
}

// ---------------------------------------------------------------------------
// Raw, as written in the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    node: Option<String>,
    listen: Option<String>,
    admin: Option<String>,
    secret_file: Option<String>,
    job_timeout: Option<String>,
    primary_silence: Option<String>,
    job_idle_timeout: Option<String>,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Option<String>,
    path: Option<String>,
    size: Option<toml::Value>,
    role: Option<String>,
    nbd: Option<String>,
    consistency_group: Option<String>,
    #[serde(default)]
    direct_io: bool,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    mirror: Vec<RawMirror>,
    on_mirror_failure: Option<String>,
    mirror_timeout: Option<String>,
    start_wait: Option<String>,
    bitmap_granularity: Option<toml::Value>,
    apply_groups: Option<i64>,
    apply_tasks_per_group: Option<i64>,
    track_size: Option<toml::Value>,
    initial_sync: Option<String>,
    resync_threshold: Option<toml::Value>,
    resync_max_suspension: Option<String>,
    resync_rate: Option<toml::Value>,
    #[serde(default)]
    resync_checksum: bool,
    resync_host_share: Option<i64>,
    read_policy: Option<String>,
    on_primary_failure: Option<String>,
    #[serde(default)]
    fault_injection: bool,
}

/// A `[[volume.mirror]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    peer: Option<String>,
    mode: Option<String>,
    compression: Option<String>,
    max_lag_bytes: Option<toml::Value>,
    max_lag_seconds: Option<toml::Value>,
    lag_policy: Option<String>,
    durable_barriers: Option<bool>,
}

// ---------------------------------------------------------------------------
// Validation.

/// Builds errors for one config file.
struct Ctx<'a> {
    path: &'a Path,
    dir: PathBuf,
}

impl Ctx<'_> {
    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// A duration or size helper's result, its error tied to this file.
    fn value<T>(&self, r: Result<T, ValueError>) -> Result<T, ConfigError> {
        r.map_err(|error| ConfigError::Value {
            path: self.path.to_path_buf(),
            error,
        })
    }

    fn required<T>(&self, value: Option<T>, key: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.invalid(key, "missing (required)"))
    }

    fn resolve(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
}

fn validate(raw: RawNode, path: &Path) -> Result<NodeConfig, ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let cx = Ctx { path, dir };

    let node = cx.required(raw.node, "node")?;
    check_name(&node).map_err(|r| cx.invalid("node", r))?;

    let listen = match raw.listen {
        Some(s) => Some(parse_socket_addr(&s, ADDR_FORM).map_err(|r| cx.invalid("listen", r))?),
        None => None,
    };
    let admin = match raw.admin {
        Some(s) => parse_socket_addr(&s, ADDR_FORM).map_err(|r| cx.invalid("admin", r))?,
        None => DEFAULT_ADMIN_ADDR,
    };
    let secret_file = match raw.secret_file {
        Some(s) if s.is_empty() => return Err(cx.invalid("secret_file", "empty path")),
        Some(s) => Some(cx.resolve(&s)),
        None => None,
    };

    let job_timeout = cx.value(duration(
        raw.job_timeout.as_deref(),
        "job_timeout",
        DEFAULT_JOB_TIMEOUT,
        DurationRange::AtLeast(Duration::from_millis(10)),
        "4s, 500ms",
    ))?;
    let primary_silence = cx.value(duration(
        raw.primary_silence.as_deref(),
        "primary_silence",
        DEFAULT_PRIMARY_SILENCE,
        DurationRange::AboveZero,
        "10s, 30s",
    ))?;
    let job_idle_timeout = cx.value(duration(
        raw.job_idle_timeout.as_deref(),
        "job_idle_timeout",
        DEFAULT_JOB_IDLE_TIMEOUT,
        DurationRange::AboveZero,
        "60s, 5m",
    ))?;

    if raw.volume.is_empty() {
        return Err(cx.invalid("volume", "at least one [[volume]] table is required"));
    }

    // TCP listeners seen so far, to refuse two sockets on one address.
    let mut tcp: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(a) = listen {
        tcp.push(("listen".to_string(), a));
    }
    let admin_clash = listen.filter(|l| tcp_conflict(*l, admin));
    if admin_clash.is_some() {
        return Err(cx.invalid("admin", format!("{admin} is also used by listen")));
    }
    tcp.push(("admin".to_string(), admin));

    let mut names: HashMap<String, usize> = HashMap::new();
    let mut unix: HashMap<PathBuf, usize> = HashMap::new();
    let mut paths: HashMap<PathBuf, usize> = HashMap::new();
    let mut volumes = Vec::with_capacity(raw.volume.len());

    for (i, rv) in raw.volume.into_iter().enumerate() {
        let key = |k: &str| format!("volume[{i}].{k}");

        let name = cx.required(rv.name, &key("name"))?;
        check_name(&name).map_err(|r| cx.invalid(key("name"), r))?;
        if let Some(j) = names.insert(name.clone(), i) {
            return Err(cx.invalid(
                key("name"),
                format!("{name:?} is already the name of volume[{j}]"),
            ));
        }

        let vpath = cx.required(rv.path, &key("path"))?;
        if vpath.is_empty() {
            return Err(cx.invalid(key("path"), "empty path"));
        }
        let vpath = cx.resolve(&vpath);
        if let Some(j) = paths.insert(vpath.clone(), i) {
            return Err(cx.invalid(
                key("path"),
                format!("{} is already the path of volume[{j}]", vpath.display()),
            ));
        }

        let size = cx.required(rv.size, &key("size"))?;
        let size = cx.value(size_value(&size, &key("size")))?;

        let role = match rv.role.as_deref() {
            None => return Err(cx.invalid(key("role"), "missing (required: primary or mirror)")),
            Some("primary") => Role::Primary,
            Some("mirror") => Role::Mirror,
            Some(other) => {
                return Err(cx.invalid(
                    key("role"),
                    format!("{other:?} is not a role (expected \"primary\" or \"mirror\")"),
                ))
            }
        };

        let mut mirrors = Vec::with_capacity(rv.mirror.len());
        for (m, rm) in rv.mirror.into_iter().enumerate() {
            let mkey = |k: &str| format!("volume[{i}].mirror[{m}].{k}");
            let peer = cx.required(rm.peer, &mkey("peer"))?;
            let addr =
                parse_socket_addr(&peer, ADDR_FORM).map_err(|r| cx.invalid(mkey("peer"), r))?;
            if mirrors.iter().any(|x: &MirrorConfig| x.addr == addr) {
                return Err(cx.invalid(mkey("peer"), format!("{peer} is listed twice")));
            }
            let mode = match rm.mode.as_deref() {
                None => MirrorMode::Sync,
                Some(m) if MirrorMode::from_name(m).is_some() => {
                    MirrorMode::from_name(m).expect("checked")
                }
                Some(other) => {
                    return Err(cx.invalid(
                        mkey("mode"),
                        format!("{other:?} is not a mode (expected \"sync\" or \"async\")"),
                    ))
                }
            };
            let compression = match rm.compression.as_deref() {
                None => Codec::None,
                Some(c) => Codec::from_name(c).ok_or_else(|| {
                    cx.invalid(
                        mkey("compression"),
                        format!(
                            "{c:?} is not a compression (expected \"none\", \"lz4\" or \"zstd\")"
                        ),
                    )
                })?,
            };
            // A size is never zero.
            let max_lag_bytes = cx.value(size_or(
                rm.max_lag_bytes.as_ref(),
                &mkey("max_lag_bytes"),
                DEFAULT_MAX_LAG_BYTES,
            ))?;
            let max_lag = match &rm.max_lag_seconds {
                None => DEFAULT_MAX_LAG,
                Some(v) => match v.as_float().or(v.as_integer().map(|i| i as f64)) {
                    Some(f) if f > 0.0 && f.is_finite() && f <= 86_400.0 => {
                        Duration::from_secs_f64(f)
                    }
                    _ => {
                        return Err(cx.invalid(
                            mkey("max_lag_seconds"),
                            format!("{v} is not a number of seconds above 0 (e.g. 5 or 0.5)"),
                        ))
                    }
                },
            };
            let lag_policy = match rm.lag_policy.as_deref() {
                None | Some("throttle") => LagPolicy::Throttle,
                Some("bitmap") => LagPolicy::Bitmap,
                Some(other) => {
                    return Err(cx.invalid(
                        mkey("lag_policy"),
                        format!("{other:?} is not a policy (expected \"throttle\" or \"bitmap\")"),
                    ))
                }
            };
            mirrors.push(MirrorConfig {
                peer,
                addr,
                mode,
                compression,
                max_lag_bytes,
                max_lag,
                lag_policy,
                durable_barriers: rm.durable_barriers.unwrap_or(false),
            });
        }
        let on_mirror_failure = match rv.on_mirror_failure.as_deref() {
            None | Some("degrade") => FailurePolicy::Degrade,
            Some("fence") => FailurePolicy::Fence,
            Some(other) => {
                return Err(cx.invalid(
                    key("on_mirror_failure"),
                    format!("{other:?} is not a policy (expected \"degrade\" or \"fence\")"),
                ))
            }
        };
        let read_policy = match rv.read_policy.as_deref() {
            None | Some("primary") => ReadPolicy::Primary,
            Some("balanced") => ReadPolicy::Balanced,
            Some(other) => {
                return Err(cx.invalid(
                    key("read_policy"),
                    format!("{other:?} is not a policy (expected \"primary\" or \"balanced\")"),
                ))
            }
        };
        let on_primary_failure = match rv.on_primary_failure.as_deref() {
            None | Some("fail") => PrimaryFailurePolicy::Fail,
            Some("serve_from_mirror") => PrimaryFailurePolicy::ServeFromMirror,
            Some(other) => {
                return Err(cx.invalid(
                    key("on_primary_failure"),
                    format!(
                        "{other:?} is not a policy (expected \"fail\" or \"serve_from_mirror\")"
                    ),
                ))
            }
        };
        if on_primary_failure == PrimaryFailurePolicy::ServeFromMirror
            && role == Role::Primary
            && mirrors.is_empty()
        {
            return Err(cx.invalid(
                key("on_primary_failure"),
                "\"serve_from_mirror\" needs a [[volume.mirror]] to serve from",
            ));
        }
        let mirror_timeout = cx.value(duration(
            rv.mirror_timeout.as_deref(),
            &key("mirror_timeout"),
            DEFAULT_MIRROR_TIMEOUT,
            DurationRange::AtLeast(Duration::from_millis(10)),
            "5s, 500ms",
        ))?;
        let start_wait = cx.value(duration(
            rv.start_wait.as_deref(),
            &key("start_wait"),
            DEFAULT_START_WAIT,
            DurationRange::AtMost(Duration::from_secs(3600)),
            "5s, 0s",
        ))?;
        let bitmap_granularity = cx.value(size_or(
            rv.bitmap_granularity.as_ref(),
            &key("bitmap_granularity"),
            DEFAULT_BITMAP_GRANULARITY,
        ))?;
        if !bitmap_granularity.is_power_of_two() || bitmap_granularity < 4096 {
            return Err(cx.invalid(
                key("bitmap_granularity"),
                format!("{bitmap_granularity} is not a power of two of at least 4096"),
            ));
        }
        let track_size = cx.value(size_or(
            rv.track_size.as_ref(),
            &key("track_size"),
            DEFAULT_TRACK_SIZE,
        ))?;
        if !track_size.is_power_of_two()
            || !(MIN_TRACK_SIZE..=u64::from(MAX_DATA)).contains(&track_size)
        {
            return Err(cx.invalid(
                key("track_size"),
                format!("{track_size} is not a power of two from 4KiB to 32MiB"),
            ));
        }

        let nbd = cx.required(rv.nbd, &key("nbd"))?;
        let nbd = parse_nbd(&nbd, &cx).map_err(|r| cx.invalid(key("nbd"), r))?;
        match &nbd {
            NbdListen::Tcp(a) => {
                if let Some((other, _)) = tcp.iter().find(|(_, b)| tcp_conflict(*a, *b)) {
                    return Err(cx.invalid(key("nbd"), format!("{a} is also used by {other}")));
                }
                tcp.push((key("nbd"), *a));
            }
            NbdListen::Unix(p) => {
                if let Some(j) = unix.insert(p.clone(), i) {
                    return Err(cx.invalid(
                        key("nbd"),
                        format!("unix:{} is also used by volume[{j}].nbd", p.display()),
                    ));
                }
            }
        }

        let consistency_group = match rv.consistency_group {
            Some(g) => {
                check_name(&g).map_err(|r| cx.invalid(key("consistency_group"), r))?;
                Some(g)
            }
            None => None,
        };

        let count = |v: Option<i64>, k: &str, default: usize| -> Result<usize, ConfigError> {
            match v {
                None => Ok(default),
                Some(n) if (1..=MAX_APPLY_TASKS as i64).contains(&n) => Ok(n as usize),
                Some(n) => Err(cx.invalid(
                    key(k),
                    format!("{n} is out of range (1 to {MAX_APPLY_TASKS})"),
                )),
            }
        };
        let apply_groups = count(rv.apply_groups, "apply_groups", 4)?;
        let apply_tasks_per_group = count(rv.apply_tasks_per_group, "apply_tasks_per_group", 2)?;
        if apply_groups * apply_tasks_per_group > MAX_APPLY_TASKS {
            return Err(cx.invalid(
                key("apply_tasks_per_group"),
                format!(
                    "{apply_groups} groups of {apply_tasks_per_group} tasks is more than {MAX_APPLY_TASKS} tasks"
                ),
            ));
        }

        let mut resync = ResyncConfig::default();
        match rv.initial_sync.as_deref() {
            None | Some("iterative") => {}
            Some("live") => resync.initial_sync = InitialSync::Live,
            Some(other) => {
                return Err(cx.invalid(
                    key("initial_sync"),
                    format!("{other:?}: expected \"iterative\" or \"live\""),
                ))
            }
        }
        resync.threshold = cx.value(size_or(
            rv.resync_threshold.as_ref(),
            &key("resync_threshold"),
            resync.threshold,
        ))?;
        resync.checksum = rv.resync_checksum;
        match rv.resync_host_share {
            None => {}
            Some(n @ 0..=90) => resync.host_share = n as u8,
            Some(n) => {
                return Err(cx.invalid(
                    key("resync_host_share"),
                    format!("{n} is out of range (0 to 90 percent)"),
                ))
            }
        }
        resync.rate = cx.value(size_or(
            rv.resync_rate.as_ref(),
            &key("resync_rate"),
            resync.rate,
        ))?;
        resync.max_suspension = cx.value(duration(
            rv.resync_max_suspension.as_deref(),
            &key("resync_max_suspension"),
            resync.max_suspension,
            DurationRange::Between(Duration::from_millis(1), Duration::from_secs(60)),
            "200ms, 1s",
        ))?;

        volumes.push(VolumeConfig {
            name,
            path: vpath,
            size,
            role,
            nbd,
            consistency_group,
            direct_io: rv.direct_io,
            read_only: rv.read_only || role == Role::Mirror,
            mirrors,
            on_mirror_failure,
            mirror_timeout,
            start_wait,
            bitmap_granularity,
            apply_groups,
            apply_tasks_per_group,
            track_size,
            resync,
            read_policy,
            on_primary_failure,
            fault_injection: rv.fault_injection,
        });
    }

    let replicating = volumes
        .iter()
        .any(|v| v.role == Role::Mirror || !v.mirrors.is_empty());
    if replicating && secret_file.is_none() {
        return Err(cx.invalid(
            "secret_file",
            "missing: required when a volume has mirrors or is a mirror (the shared secret authenticates replication links)",
        ));
    }
    if volumes.iter().any(|v| v.role == Role::Mirror) && listen.is_none() {
        return Err(cx.invalid(
            "listen",
            "missing: required when a volume has role = \"mirror\" (primaries connect to it)",
        ));
    }

    Ok(NodeConfig {
        node,
        listen,
        admin,
        secret_file,
        volumes,
        job_timeout,
        primary_silence,
        job_idle_timeout,
        path: path.to_path_buf(),
    })
}

/// Names (node, volume, consistency group): non-empty, `[A-Za-z0-9_.-]`, at
/// most 64 bytes.
fn check_name(name: &str) -> Result<(), String> {
    const MAX: usize = 64;
    if name.is_empty() {
        return Err("empty name".to_string());
    }
    if name.len() > MAX {
        return Err(format!("{name:?} is longer than {MAX} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?} (allowed: letters, digits, '_', '.', '-')"
        ));
    }
    Ok(())
}

/// `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`; a host name resolves to its first
/// IPv4 address, else its first address.
/// `expected` describes the accepted forms, for the error message.
fn parse_socket_addr(s: &str, expected: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = || format!("{s:?} is not an address (expected {expected})");
    // Only try name resolution for something shaped like host:port, so that
    // garbage never reaches the resolver.
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty()
        || port.parse::<u16>().is_err()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    {
        return Err(bad());
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn parse_nbd(s: &str, cx: &Ctx<'_>) -> Result<NbdListen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(format!("{s:?} has an empty socket path"));
        }
        return Ok(NbdListen::Unix(cx.resolve(p)));
    }
    parse_socket_addr(s, "HOST:PORT or unix:PATH, e.g. 127.0.0.1:10809").map(NbdListen::Tcp)
}

/// Whether two TCP listeners would fight over one port. Port 0 (any free
/// port) never conflicts.
fn tcp_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// Why one key's value was refused: the key (`volume[0].size`) and what is
/// wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ValueError {
    pub key: String,
    pub problem: ValueProblem,
}

/// What is wrong with a duration or size value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueProblem {
    /// humantime could not read it; `reason` is humantime's.
    #[error("{value:?} is not a duration ({reason}; examples: {examples})")]
    NotADuration {
        value: String,
        reason: String,
        examples: &'static str,
    },
    #[error("must be {0}")]
    DurationOutOfRange(DurationRange),
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// The durations a key accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationRange {
    AtLeast(Duration),
    AtMost(Duration),
    /// Both ends included.
    Between(Duration, Duration),
    AboveZero,
}

impl DurationRange {
    pub fn contains(self, d: Duration) -> bool {
        match self {
            DurationRange::AtLeast(min) => d >= min,
            DurationRange::AtMost(max) => d <= max,
            DurationRange::Between(min, max) => (min..=max).contains(&d),
            DurationRange::AboveZero => !d.is_zero(),
        }
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DurationRange::AtLeast(min) => write!(f, "at least {}", short(min)),
            DurationRange::AtMost(max) => write!(f, "at most {}", short(max)),
            DurationRange::Between(min, max) => {
                write!(f, "between {} and {}", short(min), short(max))
            }
            DurationRange::AboveZero => f.write_str("above 0"),
        }
    }
}

/// A bound as a config would spell it: `10ms`, `60s`, `1h`.
fn short(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() == 0 {
        if s >= 3600 && s % 3600 == 0 {
            format!("{}h", s / 3600)
        } else {
            format!("{s}s")
        }
    } else if d.as_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Why a size was refused (by [`parse_size`] or as a config value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size ({SIZE_EXAMPLES})")]
    NotASize(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} has too many decimal places")]
    TooManyDecimals(String),
    #[error("{0:?} is not a whole number of bytes")]
    Fractional(String),
    #[error("{0} is negative ({SIZE_EXAMPLES})")]
    Negative(i64),
    #[error("expected a size string or an integer, found a {0} ({SIZE_EXAMPLES})")]
    WrongType(&'static str),
    #[error("must be greater than zero")]
    Zero,
    #[error("{0} bytes is not a multiple of {SIZE_ALIGN}")]
    Unaligned(u64),
}

/// The one duration reader of the config: key `key`'s value `raw` (absent:
/// `default`), a humantime duration within `range`. `examples` go into the
/// error for a value that does not parse.
fn duration(
    raw: Option<&str>,
    key: &str,
    default: Duration,
    range: DurationRange,
    examples: &'static str,
) -> Result<Duration, ValueError> {
    let Some(t) = raw else { return Ok(default) };
    let problem = match humantime::parse_duration(t) {
        Ok(d) if range.contains(d) => return Ok(d),
        Ok(_) => ValueProblem::DurationOutOfRange(range),
        Err(e) => ValueProblem::NotADuration {
            value: t.to_owned(),
            reason: e.to_string(),
            examples,
        },
    };
    Err(ValueError {
        key: key.to_owned(),
        problem,
    })
}

/// The one size reader of the config: key `key`'s value `v` (absent:
/// `default`), see [`size_value`].
fn size_or(v: Option<&toml::Value>, key: &str, default: u64) -> Result<u64, ValueError> {
    v.map_or(Ok(default), |v| size_value(v, key))
}

/// A size value: a size string ([`parse_size`]) or an integer, non-zero and
/// a multiple of [`SIZE_ALIGN`].
fn size_value(v: &toml::Value, key: &str) -> Result<u64, ValueError> {
    let checked = || -> Result<u64, SizeError> {
        let n = match v {
            toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| SizeError::Negative(*i))?,
            toml::Value::String(s) => parse_size(s)?,
            other => return Err(SizeError::WrongType(other.type_str())),
        };
        if n == 0 {
            return Err(SizeError::Zero);
        }
        if n % SIZE_ALIGN != 0 {
            return Err(SizeError::Unaligned(n));
        }
        Ok(n)
    };
    checked().map_err(|e| ValueError {
        key: key.to_owned(),
        problem: e.into(),
    })
}

/// Parses a human size: an integer or decimal number, optional spaces, and an
/// optional unit. Binary units: `KiB MiB GiB TiB PiB` and the one-letter
/// `K M G T P` (as qemu-img reads them); decimal units: `kB KB MB GB TB PB`;
/// `B` or no unit is bytes. Units are case-insensitive. The result must be a
/// whole number of bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let bad = || SizeError::NotASize(s.to_owned());
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();

    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return Err(bad()),
    };

    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || (num.contains('.') && frac.is_empty()) {
        return Err(bad());
    }
    let too_large = || SizeError::TooLarge(s.to_owned());
    let int: u64 = int.parse().map_err(|_| too_large())?;
    let mut total = int.checked_mul(mult).ok_or_else(too_large)?;

    // The fraction, exactly: frac_digits * mult / 10^len must be whole.
    let frac = frac.trim_end_matches('0');
    if !frac.is_empty() {
        if frac.len() > 18 {
            return Err(SizeError::TooManyDecimals(s.to_owned()));
        }
        let digits: u128 = frac.parse().map_err(|_| bad())?;
        let scale = 10u128.pow(frac.len() as u32);
        let scaled = digits * u128::from(mult);
        let whole = scaled / scale;
        if whole * scale != scaled {
            return Err(SizeError::Fractional(s.to_owned()));
        }
        let part = u64::try_from(whole).map_err(|_| too_large())?;
        total = total.checked_add(part).ok_or_else(too_large)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "/etc/blockmirror/node.toml";

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new(P))
    }

    fn err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error names the file, `key` and contains `reason`.
    fn assert_err(text: &str, key: &str, reason: &str) {
        let e = err(text);
        let msg = e.to_string();
        assert_eq!(e.path(), Path::new(P), "{msg}");
        assert_eq!(e.key(), Some(key), "{msg}");
        assert!(
            msg.starts_with(&format!("config {P}: {key}: ")),
            "message {msg:?} should name file and key {key}"
        );
        assert!(
            msg.contains(reason),
            "message {msg:?} should contain {reason:?}"
        );
    }

    const EXAMPLE: &str = r#"
node = "site-a"                  # this node's name, unique in the deployment
listen = "127.0.0.1:7700"        # replication listener: primaries connect to mirrors here
admin = "127.0.0.1:7780"         # HTTP: GET /status (JSON), GET /metrics (Prometheus text)
secret_file = "secret.key"       # shared secret that authenticates replication peers

[[volume]]
name = "db"
path = "data/db.img"             # a file (created at `size` if missing) or a block device
size = "1GiB"
role = "primary"                 # primary | mirror
nbd = "127.0.0.1:10809"          # NBD listen address (tcp) or "unix:PATH"; export name = volume name
consistency_group = "app"        # optional
"#;

    /// One volume with `extra` lines appended to its table.
    fn vol(extra: &str) -> String {
        format!(
            "node = \"n\"\n[[volume]]\nname = \"db\"\npath = \"db.img\"\nsize = \"1MiB\"\nrole = \"primary\"\nnbd = \"127.0.0.1:10809\"\n{extra}\n"
        )
    }

    /// `vol` with key `k` replaced by `line`.
    fn vol_with(k: &str, line: &str) -> String {
        vol("")
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{k} =")) {
                    line
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn contract_example_parses() {
        let c = parse(EXAMPLE).expect("example parses");
        assert_eq!(c.node, "site-a");
        assert_eq!(c.listen, Some("127.0.0.1:7700".parse().unwrap()));
        assert_eq!(c.admin, "127.0.0.1:7780".parse().unwrap());
        assert_eq!(
            c.secret_file,
            Some(PathBuf::from("/etc/blockmirror/secret.key"))
        );
        assert_eq!(c.path, PathBuf::from(P));
        assert_eq!(c.volumes.len(), 1);
        let v = &c.volumes[0];
        assert_eq!(v.name, "db");
        assert_eq!(v.path, PathBuf::from("/etc/blockmirror/data/db.img"));
        assert_eq!(v.size, 1 << 30);
        assert_eq!(v.role, Role::Primary);
        assert_eq!(v.nbd, NbdListen::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(v.consistency_group.as_deref(), Some("app"));
        assert!(!v.direct_io);
        assert!(!v.read_only);
        assert_eq!(v.nbd.uri(&v.name), "nbd://127.0.0.1:10809/db");
        assert!(c.volume("db").is_some());
    }

    #[test]
    fn contract_example_with_mirror_table_parses() {
        let text =
            format!("{EXAMPLE}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\nmode = \"sync\"\n");
        let c = NodeConfig::parse(&text, Path::new("/etc/bm/node.toml")).unwrap();
        let v = &c.volumes[0];
        assert_eq!(v.mirrors.len(), 1);
        assert_eq!(v.mirrors[0].mode, MirrorMode::Sync);
        assert_eq!(v.mirrors[0].addr, "127.0.0.1:7701".parse().unwrap());
        assert_eq!(v.on_mirror_failure, FailurePolicy::Degrade);
        assert_eq!(v.mirror_timeout, DEFAULT_MIRROR_TIMEOUT);
        assert_eq!(v.start_wait, DEFAULT_START_WAIT);
        assert_eq!(c.job_timeout, DEFAULT_JOB_TIMEOUT);
        assert_eq!(v.bitmap_granularity, 64 * 1024);
        assert_eq!(v.track_size, DEFAULT_TRACK_SIZE);
        assert_eq!(v.mirrors[0].compression, Codec::None);
        assert_eq!(v.mirrors[0].max_lag_bytes, DEFAULT_MAX_LAG_BYTES);
        assert_eq!(v.mirrors[0].lag_policy, LagPolicy::Throttle);
        let text = format!(
            "{EXAMPLE}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\nmode = \"async\"\n\
             max_lag_bytes = \"8MiB\"\nmax_lag_seconds = 0.5\nlag_policy = \"bitmap\"\n\
             durable_barriers = true\n"
        );
        let c = NodeConfig::parse(&text, Path::new("/etc/bm/node.toml")).unwrap();
        let m = &c.volumes[0].mirrors[0];
        assert_eq!(m.mode, MirrorMode::Async);
        assert_eq!(m.max_lag_bytes, 8 << 20);
        assert_eq!(m.max_lag, Duration::from_millis(500));
        assert_eq!(m.lag_policy, LagPolicy::Bitmap);
        assert!(m.durable_barriers);
        for (extra, key, why) in [
            ("mode = \"later\"", "mode", "not a mode"),
            ("max_lag_bytes = 0", "max_lag_bytes", "greater than zero"),
            (
                "max_lag_seconds = -1",
                "max_lag_seconds",
                "not a number of seconds",
            ),
            (
                "max_lag_seconds = \"5s\"",
                "max_lag_seconds",
                "not a number of seconds",
            ),
            ("lag_policy = \"drop\"", "lag_policy", "not a policy"),
        ] {
            let mode = if key == "mode" {
                ""
            } else {
                "mode = \"async\"\n"
            };
            let text =
                format!("{EXAMPLE}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\n{mode}{extra}\n");
            assert_err(&text, &format!("volume[0].mirror[0].{key}"), why);
        }
    }

    #[test]
    fn resync_settings_are_checked() {
        let base = "secret_file = \"s\"\n";
        let with = |extra: &str| format!("{base}{}", vol(extra));
        let v = NodeConfig::parse(&with(""), Path::new("n.toml")).unwrap();
        assert_eq!(v.volumes[0].resync, ResyncConfig::default());
        let v = NodeConfig::parse(
            &with("initial_sync = \"live\"\nresync_threshold = \"4MiB\"\nresync_max_suspension = \"50ms\"\nresync_rate = \"100MiB\""),
            Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(
            v.volumes[0].resync,
            ResyncConfig {
                initial_sync: InitialSync::Live,
                threshold: 4 << 20,
                max_suspension: Duration::from_millis(50),
                rate: 100 << 20,
                checksum: false,
                host_share: 0,
            }
        );
        for (extra, k) in [
            ("initial_sync = \"fast\"", "initial_sync"),
            ("resync_threshold = \"lots\"", "resync_threshold"),
            ("resync_rate = -1", "resync_rate"),
            ("resync_host_share = 95", "resync_host_share"),
            ("resync_max_suspension = \"2min\"", "resync_max_suspension"),
            ("resync_max_suspension = \"soon\"", "resync_max_suspension"),
        ] {
            let e = NodeConfig::parse(&with(extra), Path::new("n.toml")).unwrap_err();
            assert!(e.to_string().contains(k), "{extra}: {e}");
        }
    }

    #[test]
    fn read_and_primary_failure_policies_are_checked() {
        let base = "secret_file = \"s\"\n";
        let mirrored = |extra: &str| {
            format!(
                "{base}{}",
                vol(&format!(
                    "{extra}\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\""
                ))
            )
        };
        let v = parse(&mirrored("")).unwrap().volumes.remove(0);
        assert_eq!(v.read_policy, ReadPolicy::Primary);
        assert_eq!(v.on_primary_failure, PrimaryFailurePolicy::Fail);
        assert!(!v.fault_injection);
        let v = parse(&mirrored(
            "read_policy = \"balanced\"\non_primary_failure = \"serve_from_mirror\"\nfault_injection = true",
        ))
        .unwrap()
        .volumes
        .remove(0);
        assert_eq!(v.read_policy, ReadPolicy::Balanced);
        assert_eq!(v.on_primary_failure, PrimaryFailurePolicy::ServeFromMirror);
        assert!(v.fault_injection);
        assert_err(
            &mirrored("read_policy = \"fastest\""),
            "volume[0].read_policy",
            "not a policy",
        );
        assert_err(
            &mirrored("on_primary_failure = \"detach\""),
            "volume[0].on_primary_failure",
            "not a policy",
        );
        assert_err(
            &vol("on_primary_failure = \"serve_from_mirror\""),
            "volume[0].on_primary_failure",
            "needs a [[volume.mirror]]",
        );
        let e = err(&vol("fault_injection = \"yes\""));
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn mirror_settings_are_checked() {
        let base = "secret_file = \"s\"\n";
        let with = |extra: &str| format!("{base}{}", vol(extra));
        let ok = NodeConfig::parse(
            &with("on_mirror_failure = \"fence\"\nmirror_timeout = \"250ms\"\nbitmap_granularity = \"1MiB\"\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\""),
            Path::new("n.toml"),
        )
        .unwrap();
        let v = &ok.volumes[0];
        assert_eq!(v.on_mirror_failure, FailurePolicy::Fence);
        assert_eq!(v.mirror_timeout, Duration::from_millis(250));
        assert_eq!(v.bitmap_granularity, 1 << 20);
        assert_err(
            &with("on_mirror_failure = \"panic\""),
            "volume[0].on_mirror_failure",
            "not a policy",
        );
        let c = NodeConfig::parse(
            &format!("job_timeout = \"250ms\"\n{EXAMPLE}"),
            Path::new("/etc/bm/node.toml"),
        )
        .unwrap();
        assert_eq!(c.job_timeout, Duration::from_millis(250));
        assert_err(
            &format!("job_timeout = \"later\"\n{EXAMPLE}"),
            "job_timeout",
            "not a duration",
        );
        assert_err(
            &with("mirror_timeout = \"soon\""),
            "volume[0].mirror_timeout",
            "not a duration",
        );
        let ok = NodeConfig::parse(
            &with("track_size = \"256KiB\"\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\ncompression = \"zstd\"\n[[volume.mirror]]\npeer = \"127.0.0.1:7702\"\ncompression = \"lz4\""),
            Path::new("n.toml"),
        )
        .unwrap();
        let v = &ok.volumes[0];
        assert_eq!(v.track_size, 256 << 10);
        assert_eq!(v.mirrors[0].compression, Codec::Zstd);
        assert_eq!(v.mirrors[1].compression, Codec::Lz4);
        for bad in ["\"96KiB\"", "2048", "\"64MiB\""] {
            assert_err(
                &with(&format!("track_size = {bad}")),
                "volume[0].track_size",
                "power of two from 4KiB to 32MiB",
            );
        }
        assert_err(
            &with("[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\ncompression = \"gzip\""),
            "volume[0].mirror[0].compression",
            "not a compression",
        );
        assert_err(
            &with("bitmap_granularity = 4608"),
            "volume[0].bitmap_granularity",
            "power of two",
        );
        assert_err(
            &with("[[volume.mirror]]\npeer = \"127.0.0.1:7701\"\n[[volume.mirror]]\npeer = \"127.0.0.1:7701\""),
            "volume[0].mirror[1].peer",
            "listed twice",
        );
        // Mirrors need the shared secret.
        assert_err(
            &vol("[[volume.mirror]]\npeer = \"127.0.0.1:7701\""),
            "secret_file",
            "required",
        );
    }

    #[test]
    fn mirror_side_timeouts_are_checked() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.primary_silence, DEFAULT_PRIMARY_SILENCE);
        assert_eq!(c.primary_silence, Duration::from_secs(10));
        assert_eq!(c.job_idle_timeout, DEFAULT_JOB_IDLE_TIMEOUT);
        let c = parse(&format!(
            "primary_silence = \"2500ms\"\njob_idle_timeout = \"5m\"\n{EXAMPLE}"
        ))
        .unwrap();
        assert_eq!(c.primary_silence, Duration::from_millis(2500));
        assert_eq!(c.job_idle_timeout, Duration::from_secs(300));
        for key in ["primary_silence", "job_idle_timeout"] {
            assert_err(
                &format!("{key} = \"0s\"\n{EXAMPLE}"),
                key,
                "must be above 0",
            );
            assert_err(
                &format!("{key} = \"quiet\"\n{EXAMPLE}"),
                key,
                "\"quiet\" is not a duration (",
            );
            let e = err(&format!("{key} = 10\n{EXAMPLE}"));
            assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        }
    }

    #[test]
    fn duration_and_size_errors_are_typed_and_name_the_key() {
        let e = err(&vol("mirror_timeout = \"5ms\""));
        match &e {
            ConfigError::Value { error, .. } => {
                assert_eq!(error.key, "volume[0].mirror_timeout");
                assert_eq!(
                    error.problem,
                    ValueProblem::DurationOutOfRange(DurationRange::AtLeast(
                        Duration::from_millis(10)
                    ))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            e.to_string(),
            format!("config {P}: volume[0].mirror_timeout: must be at least 10ms")
        );
        assert_err(
            &vol("start_wait = \"2h\""),
            "volume[0].start_wait",
            "must be at most 1h",
        );
        assert_err(
            &vol("resync_max_suspension = \"0s\""),
            "volume[0].resync_max_suspension",
            "must be between 1ms and 60s",
        );
        match err(&vol_with("size", "size = \"12XB\"")) {
            ConfigError::Value { error, .. } => {
                assert_eq!(error.key, "volume[0].size");
                assert_eq!(
                    error.problem,
                    ValueProblem::Size(SizeError::NotASize("12XB".into()))
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_size("1.3B"),
            Err(SizeError::Fractional("1.3B".into()))
        );
        assert_eq!(
            DurationRange::Between(Duration::from_millis(1), Duration::from_secs(60)).to_string(),
            "between 1ms and 60s"
        );
    }

    #[test]
    fn mirror_role_needs_listen_and_secret_and_is_read_only() {
        let text = vol_with("role", "role = \"mirror\"");
        assert_err(&text, "secret_file", "required");
        let text = format!("secret_file = \"s\"\n{text}");
        assert_err(&text, "listen", "required");
        let text = format!("listen = \"127.0.0.1:7701\"\n{text}");
        let c = NodeConfig::parse(&text, Path::new("n.toml")).unwrap();
        assert_eq!(c.volumes[0].role, Role::Mirror);
        assert!(c.volumes[0].read_only, "a mirror's export is read-only");
        // A mirror may list the peers it mirrors to once promoted (failback).
        let symmetric = format!("{text}[[volume.mirror]]\npeer = \"127.0.0.1:7702\"\n");
        let c = NodeConfig::parse(&symmetric, Path::new("n.toml")).unwrap();
        assert_eq!(c.volumes[0].role, Role::Mirror);
        assert_eq!(c.volumes[0].mirrors.len(), 1);
    }

    #[test]
    fn mirror_table_unknown_key_is_a_syntax_error() {
        let e = err(&vol("[[volume.mirror]]\npeer = \"a:1\"\nbogus = 1"));
        assert!(matches!(e, ConfigError::Syntax { .. }));
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn optional_flags_and_defaults() {
        let c = parse(&vol("direct_io = true\nread_only = true")).unwrap();
        assert!(c.volumes[0].direct_io);
        assert!(c.volumes[0].read_only);
        assert_eq!(c.admin, DEFAULT_ADMIN_ADDR);
        assert_eq!(c.listen, None);
        assert_eq!(c.secret_file, None);
    }

    #[test]
    fn unix_nbd_resolves_against_config_dir() {
        let c = parse(&vol_with("nbd", "nbd = \"unix:run/db.sock\"")).unwrap();
        let p = PathBuf::from("/etc/blockmirror/run/db.sock");
        assert_eq!(c.volumes[0].nbd, NbdListen::Unix(p));
        assert_eq!(
            c.volumes[0].nbd.uri("db"),
            "nbd+unix:///db?socket=/etc/blockmirror/run/db.sock"
        );
        let c = parse(&vol_with("nbd", "nbd = \"unix:/abs/db.sock\"")).unwrap();
        assert_eq!(c.volumes[0].nbd, NbdListen::Unix("/abs/db.sock".into()));
    }

    #[test]
    fn relative_config_path_resolves_against_dot() {
        let c = NodeConfig::parse(&vol(""), Path::new("node.toml")).unwrap();
        assert_eq!(c.volumes[0].path, PathBuf::from("./db.img"));
    }

    #[test]
    fn hostnames_resolve() {
        let c = parse(&vol_with("nbd", "nbd = \"localhost:10809\"")).unwrap();
        match c.volumes[0].nbd {
            NbdListen::Tcp(a) => {
                assert!(a.ip().is_loopback(), "{a}");
                assert_eq!(a.port(), 10809);
            }
            ref other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ipv6_addresses_parse() {
        let c = parse(&vol_with("nbd", "nbd = \"[::1]:10809\"")).unwrap();
        assert_eq!(
            c.volumes[0].nbd,
            NbdListen::Tcp("[::1]:10809".parse().unwrap())
        );
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("4096", 4096),
            ("1GiB", 1 << 30),
            ("512MiB", 512 << 20),
            ("512 MiB", 512 << 20),
            ("1gib", 1 << 30),
            ("1G", 1 << 30),
            ("1K", 1024),
            ("2TiB", 2 << 40),
            ("1GB", 1_000_000_000),
            ("1MB", 1_000_000),
            ("1kB", 1000),
            ("1.5GiB", 3 << 29),
            ("0.5KiB", 512),
            ("512B", 512),
            ("1.0 MiB", 1 << 20),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for s in [
            "",
            "GiB",
            "12XB",
            "-1",
            "1..5G",
            "1.",
            ".5G",
            "1 2",
            "1e3",
            "0x10",
            "1.3B",
            "99999999999999999999",
            "16384PiB",
        ] {
            assert!(parse_size(s).is_err(), "{s:?} should not parse");
        }
    }

    #[test]
    fn integer_size() {
        let c = parse(&vol_with("size", "size = 1048576")).unwrap();
        assert_eq!(c.volumes[0].size, 1 << 20);
    }

    #[test]
    fn size_errors() {
        assert_err(
            &vol_with("size", "size = \"12XB\""),
            "volume[0].size",
            "\"12XB\" is not a size (examples: 1GiB, 512MiB, 4096)",
        );
        assert_err(
            &vol_with("size", "size = 0"),
            "volume[0].size",
            "greater than zero",
        );
        assert_err(
            &vol_with("size", "size = \"0GiB\""),
            "volume[0].size",
            "greater than zero",
        );
        assert_err(
            &vol_with("size", "size = 1000"),
            "volume[0].size",
            "multiple of 512",
        );
        assert_err(
            &vol_with("size", "size = -512"),
            "volume[0].size",
            "negative",
        );
        assert_err(
            &vol_with("size", "size = 1.5"),
            "volume[0].size",
            "found a float",
        );
        assert_err(
            &vol_with("size", "size = \"1kB\""),
            "volume[0].size",
            "multiple of 512",
        );
    }

    #[test]
    fn missing_keys() {
        assert_err("[[volume]]\nname = \"a\"", "node", "missing");
        assert_err("node = \"n\"", "volume", "at least one");
        for k in ["name", "path", "size", "role", "nbd"] {
            let text = vol("")
                .lines()
                .filter(|l| !l.starts_with(&format!("{k} =")))
                .collect::<Vec<_>>()
                .join("\n");
            assert_err(&text, &format!("volume[0].{k}"), "missing");
        }
    }

    #[test]
    fn bad_names() {
        assert_err(&vol_with("name", "name = \"\""), "volume[0].name", "empty");
        assert_err(&vol_with("name", "name = \"a/b\""), "volume[0].name", "'/'");
        assert_err(&vol_with("name", "name = \"a b\""), "volume[0].name", "' '");
        assert_err(
            &vol("consistency_group = \"x y\""),
            "volume[0].consistency_group",
            "' '",
        );
        assert_err(
            &vol("").replace("node = \"n\"", "node = \"\""),
            "node",
            "empty",
        );
        assert!(parse(&vol_with("name", "name = \"A-z_0.9\"")).is_ok());
    }

    #[test]
    fn bad_role() {
        assert_err(
            &vol_with("role", "role = \"boss\""),
            "volume[0].role",
            "\"boss\" is not a role",
        );
    }

    #[test]
    fn bad_addresses() {
        assert_err(
            &format!("admin = \"nope\"\n{}", vol("")),
            "admin",
            "\"nope\" is not an address",
        );
        assert_err(
            &format!("listen = \"1.2.3.4\"\n{}", vol("")),
            "listen",
            "not an address",
        );
        assert_err(
            &format!("admin = \"127.0.0.1:99999\"\n{}", vol("")),
            "admin",
            "not an address",
        );
        assert_err(
            &vol_with("nbd", "nbd = \"garbage\""),
            "volume[0].nbd",
            "\"garbage\" is not an address (expected HOST:PORT or unix:PATH",
        );
        assert_err(
            &vol_with("nbd", "nbd = \"unix:\""),
            "volume[0].nbd",
            "empty socket path",
        );
        assert_err(
            &vol_with("nbd", "nbd = \"no-such-host.invalid:1\""),
            "volume[0].nbd",
            "cannot resolve",
        );
    }

    fn two_volumes(second: &str) -> String {
        format!(
            "{}\n[[volume]]\nname = \"b\"\npath = \"b.img\"\nsize = 512\nrole = \"primary\"\n{second}\n",
            vol("")
        )
    }

    #[test]
    fn two_volumes_parse() {
        let c = parse(&two_volumes("nbd = \"127.0.0.1:10810\"")).unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[1].size, 512);
    }

    #[test]
    fn duplicates() {
        assert_err(
            &two_volumes("nbd = \"127.0.0.1:10810\"").replace("name = \"b\"", "name = \"db\""),
            "volume[1].name",
            "\"db\" is already the name of volume[0]",
        );
        assert_err(
            &two_volumes("nbd = \"127.0.0.1:10809\""),
            "volume[1].nbd",
            "127.0.0.1:10809 is also used by volume[0].nbd",
        );
        assert_err(
            &two_volumes("nbd = \"0.0.0.0:10809\""),
            "volume[1].nbd",
            "also used by volume[0].nbd",
        );
        assert_err(
            &two_volumes("nbd = \"127.0.0.1:10810\"")
                .replace("path = \"b.img\"", "path = \"./db.img\""),
            "volume[1].path",
            "already the path of volume[0]",
        );
        assert_err(
            &format!("admin = \"127.0.0.1:10809\"\n{}", vol("")),
            "volume[0].nbd",
            "also used by admin",
        );
        assert_err(
            &format!(
                "admin = \"127.0.0.1:7700\"\nlisten = \"127.0.0.1:7700\"\n{}",
                vol("")
            ),
            "admin",
            "also used by listen",
        );
        let unix = vol_with("nbd", "nbd = \"unix:s.sock\"");
        assert_err(
            &format!(
                "{unix}\n[[volume]]\nname = \"b\"\npath = \"b.img\"\nsize = 512\nrole = \"primary\"\nnbd = \"unix:/etc/blockmirror/s.sock\"\n"
            ),
            "volume[1].nbd",
            "is also used by volume[0].nbd",
        );
        // Port 0 means "any free port" and never conflicts.
        let zero = two_volumes("nbd = \"127.0.0.1:0\"").replace("127.0.0.1:10809", "127.0.0.1:0");
        assert!(parse(&format!("admin = \"127.0.0.1:0\"\n{zero}")).is_ok());
    }

    #[test]
    fn syntax_errors_keep_line_and_column() {
        let e = err("node = \"n\"\n[[volume]]\nname = \n");
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { .. }));
        assert!(msg.starts_with(&format!("config {P}: ")), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("column"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = err(&format!("colour = \"blue\"\n{}", vol("")));
        assert!(matches!(e, ConfigError::Syntax { .. }));
        assert!(e.to_string().contains("colour"), "{e}");
        let e = err(&vol("sise = 1"));
        assert!(e.to_string().contains("sise"), "{e}");
    }

    #[test]
    fn wrong_types_are_refused() {
        let e = err(&vol("read_only = \"yes\""));
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        let e = err("node = 5");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn load_reads_files_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, vol("")).unwrap();
        let c = NodeConfig::load(&path).unwrap();
        assert_eq!(c.volumes[0].path, dir.path().join("db.img"));
        let missing = dir.path().join("missing.toml");
        let e = NodeConfig::load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn default_admin_addr_reads_cwd_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(default_admin_addr(dir.path()), DEFAULT_ADMIN_ADDR);
        let path = dir.path().join(DEFAULT_CONFIG_FILE);
        std::fs::write(&path, "not toml [").unwrap();
        assert_eq!(default_admin_addr(dir.path()), DEFAULT_ADMIN_ADDR);
        std::fs::write(&path, format!("admin = \"127.0.0.1:9999\"\n{}", vol(""))).unwrap();
        assert_eq!(
            default_admin_addr(dir.path()),
            "127.0.0.1:9999".parse().unwrap()
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_tomlish(
            key in "(node|admin|listen|name|size|nbd|role|path|mirror)",
            value in "(\"[ -9;-~]{0,20}\"|-?[0-9]{1,25}|true|\\[\\]|[0-9.]{1,6})",
        ) {
            let _ = parse(&format!("{key} = {value}\n"));
            let _ = parse(&vol_with(&key, &format!("{key} = {value}")));
        }

        #[test]
        fn parse_size_never_panics(s in "[0-9. kKmMgGtTpPiIbB]{0,30}") {
            let _ = parse_size(&s);
        }
    }
}
