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

mod values;
use values::{duration, size_or, size_value};
pub use values::{parse_size, DurationRange, SizeError, ValueError, ValueProblem};

use crate::tls::{ClientCerts, TlsSettings};
pub use blockmirror_nbd::TlsMode;
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
    /// `[tls]`: the CA, this node's certificate and key (paths resolved),
    /// used by replication links (mutual TLS), NBD STARTTLS and HTTPS on the
    /// admin port. Not read here.
    pub tls: Option<TlsSettings>,
    /// `[admin_auth]`: bearer token for the admin API.
    pub admin_auth: Option<AdminAuthConfig>,
    /// `[cluster]`: roles decided through etcd (leases, fencing epochs,
    /// automatic failover). None: static roles, as configured.
    pub cluster: Option<ClusterConfig>,
    /// The config file this was read from.
    pub path: PathBuf,
    /// Its text: cluster mode appends the `[[volume]]` tables of the
    /// volumes etcd assigns to this node and validates the whole again
    /// ([`NodeConfig::with_volumes`]).
    pub text: String,
}

/// The `[cluster]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://host:port`), at least one.
    pub etcd: Vec<String>,
    /// The node's lease in etcd (key `lease_ttl`, default
    /// [`DEFAULT_LEASE_TTL`], at least 2 s): a primary that cannot renew it
    /// stops acknowledging writes before it lapses, and a mirror is promoted
    /// only after it lapsed.
    pub lease_ttl: Duration,
    /// Which mirrors may be promoted automatically (`auto_promote`).
    pub auto_promote: blockmirror_core::cluster::AutoPromote,
    /// The node's site (key `site`; default: the node's name).
    pub site: String,
    /// Key prefix in etcd (key `prefix`, default `/blockmirror`), so that
    /// several deployments can share one etcd.
    pub prefix: String,
    /// Where the images of volumes declared in etcd (`blockmirror cluster
    /// apply`) are made (key `volume_dir`, default `volumes-<node>` beside
    /// the config file).
    pub volume_dir: PathBuf,
    /// The address their NBD exports listen on, each at the port its
    /// declaration gives (key `nbd_host`, default the IP of `listen`, else
    /// 127.0.0.1).
    pub nbd_host: std::net::IpAddr,
}

/// Default `[cluster] lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The `[admin_auth]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAuthConfig {
    /// The file holding the bearer token (resolved; read at start).
    /// Optional with `client_certs`.
    pub token_file: Option<PathBuf>,
    /// GET requests (status, metrics, events, the page) need no token.
    pub open_reads: bool,
    /// A client certificate that chains to `[tls] ca`, presented over the
    /// HTTPS admin port, authorizes a request instead of the token.
    pub client_certs: bool,
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
    /// NBD STARTTLS for this export (key `tls`: "off", "allow", "require";
    /// default "allow" with `[tls]`, else "off").
    pub tls: TlsMode,
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
    /// With `[tls]`: the name the mirror's certificate must hold (key
    /// `peer_name`, e.g. its node name); without it, the IP address of
    /// `peer`.
    pub peer_name: Option<String>,
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
    /// How this node's replication links authenticate: what
    /// `LinkStream::link_key` makes of `secret_file` and `[tls]`; `None`
    /// with neither (no link can be authenticated).
    pub fn link_auth(&self) -> Option<blockmirror_repl::KeyMode> {
        use blockmirror_repl::KeyMode;
        match (self.secret_file.is_some(), self.tls.is_some()) {
            (true, true) => Some(KeyMode::TlsAndSecret),
            (false, true) => Some(KeyMode::Tls),
            (true, false) => Some(KeyMode::Secret),
            (false, false) => None,
        }
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        NodeConfig::parse(&text, path)
    }

    /// This config with `tables` (`[[volume]]` tables in the file's syntax)
    /// appended, validated as one file: the volumes cluster mode serves
    /// because etcd assigns them here are checked exactly as written ones.
    pub fn with_volumes(&self, tables: &str) -> Result<NodeConfig, ConfigError> {
        let mut c = NodeConfig::parse(&format!("{}\n{tables}", self.text), &self.path)?;
        c.text = self.text.clone();
        Ok(c)
    }

    /// Parses and validates config `text`; `path` is where it came from (used
    /// in errors and to resolve relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let raw: RawNode = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut c = validate(raw, path)?;
        c.text = text.to_owned();
        Ok(c)
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
    tls: Option<RawTls>,
    admin_auth: Option<RawAdminAuth>,
    cluster: Option<RawCluster>,
    #[serde(default)]
    volume: Vec<RawVolume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    #[serde(default)]
    etcd: Vec<String>,
    lease_ttl: Option<String>,
    auto_promote: Option<String>,
    site: Option<String>,
    prefix: Option<String>,
    volume_dir: Option<String>,
    nbd_host: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    nbd_client_certs: Option<String>,
    admin_https: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminAuth {
    token_file: Option<String>,
    #[serde(default)]
    open_reads: bool,
    #[serde(default)]
    client_certs: bool,
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
    tls: Option<String>,
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
    peer_name: Option<String>,
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

    let tls = match raw.tls {
        None => None,
        Some(t) => {
            let file = |v: Option<String>, k: &str| -> Result<PathBuf, ConfigError> {
                match v {
                    None => Err(cx.invalid(format!("tls.{k}"), "missing (required in [tls])")),
                    Some(s) if s.is_empty() => Err(cx.invalid(format!("tls.{k}"), "empty path")),
                    Some(s) => Ok(cx.resolve(&s)),
                }
            };
            let nbd_client_certs = match t.nbd_client_certs.as_deref() {
                None | Some("optional") => ClientCerts::Optional,
                Some("require") => ClientCerts::Require,
                Some(other) => {
                    return Err(cx.invalid(
                        "tls.nbd_client_certs",
                        format!("{other:?}: expected \"optional\" or \"require\""),
                    ))
                }
            };
            Some(TlsSettings {
                ca: file(t.ca, "ca")?,
                cert: file(t.cert, "cert")?,
                key: file(t.key, "key")?,
                nbd_client_certs,
                admin_https: t.admin_https.unwrap_or(true),
            })
        }
    };
    let admin_auth = match raw.admin_auth {
        None => None,
        Some(a) => {
            if a.client_certs && !tls.as_ref().is_some_and(|t| t.admin_https) {
                return Err(cx.invalid(
                    "admin_auth.client_certs",
                    "needs a [tls] table with HTTPS on the admin port (admin_https, the default)",
                ));
            }
            let token_file = match a.token_file {
                None if a.client_certs => None,
                None => {
                    return Err(cx.invalid(
                        "admin_auth.token_file",
                        "missing (required in [admin_auth] unless client_certs = true)",
                    ))
                }
                Some(s) if s.is_empty() => {
                    return Err(cx.invalid("admin_auth.token_file", "empty path"))
                }
                Some(s) => Some(cx.resolve(&s)),
            };
            Some(AdminAuthConfig {
                token_file,
                open_reads: a.open_reads,
                client_certs: a.client_certs,
            })
        }
    };

    let cluster = match raw.cluster {
        None => None,
        Some(c) => {
            if c.etcd.is_empty() {
                return Err(cx.invalid(
                    "cluster.etcd",
                    "missing: at least one endpoint, e.g. [\"http://127.0.0.1:2379\"]",
                ));
            }
            for e in &c.etcd {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(cx.invalid(
                        "cluster.etcd",
                        format!("{e:?}: expected a URL such as http://127.0.0.1:2379"),
                    ));
                }
            }
            let lease_ttl = cx.value(duration(
                c.lease_ttl.as_deref(),
                "cluster.lease_ttl",
                DEFAULT_LEASE_TTL,
                DurationRange::AboveZero,
                "5s, 10s",
            ))?;
            if lease_ttl < Duration::from_secs(2) {
                return Err(cx.invalid(
                    "cluster.lease_ttl",
                    "at least 2s (etcd leases count whole seconds, and the primary stops \
                     acknowledging writes a safety margin before its lease lapses)",
                ));
            }
            let auto_promote = match c.auto_promote.as_deref() {
                None => blockmirror_core::cluster::AutoPromote::default(),
                Some(s) => blockmirror_core::cluster::AutoPromote::parse(s).ok_or_else(|| {
                    cx.invalid(
                        "cluster.auto_promote",
                        format!("{s:?}: expected \"sync_only\", \"any\" or \"never\""),
                    )
                })?,
            };
            let prefix = c.prefix.unwrap_or_else(|| "/blockmirror".into());
            if !prefix.starts_with('/') || prefix.ends_with('/') {
                return Err(cx.invalid(
                    "cluster.prefix",
                    format!("{prefix:?}: expected a path such as /blockmirror"),
                ));
            }
            let site = c.site.unwrap_or_else(|| node.clone());
            check_name(&site).map_err(|e| cx.invalid("cluster.site", e))?;
            let volume_dir = match c.volume_dir {
                Some(s) if s.is_empty() => {
                    return Err(cx.invalid("cluster.volume_dir", "empty path"))
                }
                Some(s) => cx.resolve(&s),
                None => cx.resolve(&format!("volumes-{node}")),
            };
            let nbd_host = match c.nbd_host {
                Some(s) => s.parse().map_err(|_| {
                    cx.invalid("cluster.nbd_host", format!("{s:?}: expected an IP address"))
                })?,
                None => listen.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |l| l.ip()),
            };
            Some(ClusterConfig {
                etcd: c.etcd,
                lease_ttl,
                auto_promote,
                site,
                prefix,
                volume_dir,
                nbd_host,
            })
        }
    };

    if raw.volume.is_empty() && cluster.is_none() {
        return Err(cx.invalid(
            "volume",
            "at least one [[volume]] table is required (or a [cluster] table, whose volumes \
             `blockmirror cluster apply` declares in etcd)",
        ));
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
            let peer_name = match rm.peer_name {
                None => None,
                Some(n) => {
                    if rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
                        return Err(cx.invalid(
                            mkey("peer_name"),
                            format!("{n:?} is not a DNS name or IP address"),
                        ));
                    }
                    Some(n)
                }
            };
            mirrors.push(MirrorConfig {
                peer_name,
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

        let vtls = match rv.tls.as_deref() {
            None if tls.is_some() => TlsMode::Allow,
            None => TlsMode::Off,
            Some(m) => match TlsMode::from_name(m) {
                Some(TlsMode::Off) => TlsMode::Off,
                Some(_) if tls.is_none() => {
                    return Err(cx.invalid(
                        key("tls"),
                        format!("{m:?} needs a [tls] table (ca, cert, key)"),
                    ))
                }
                Some(t) => t,
                None => {
                    return Err(cx.invalid(
                        key("tls"),
                        format!("{m:?}: expected \"off\", \"allow\" or \"require\""),
                    ))
                }
            },
        };

        volumes.push(VolumeConfig {
            tls: vtls,
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
    // What authenticates a replication link: the shared secret, TLS (its
    // certificates, the handshake bound to the session), or both; without
    // [tls] the secret is the only way.
    if replicating && secret_file.is_none() && tls.is_none() {
        return Err(cx.invalid(
            "secret_file",
            "missing: required when a volume has mirrors or is a mirror and there is no [tls] \
             (the shared secret or TLS authenticates replication links)",
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
        tls,
        admin_auth,
        cluster,
        path: path.to_path_buf(),
        text: String::new(),
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

#[cfg(test)]
mod tests;
