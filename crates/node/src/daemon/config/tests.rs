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
                ValueProblem::DurationOutOfRange(DurationRange::AtLeast(Duration::from_millis(10)))
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

#[test]
fn contract_tls_and_admin_auth_keys_parse() {
    let text = format!(
        "{}tls = \"require\"\n[tls]\nca = \"tls/ca.pem\"\ncert = \"tls/site-a.pem\"\nkey = \"tls/site-a.key\"\n\
         [admin_auth]\ntoken_file = \"admin.token\"\nopen_reads = true\n",
        vol("")
    );
    let c = parse(&text).unwrap();
    let t = c.tls.as_ref().unwrap();
    assert_eq!(t.ca, Path::new("/etc/blockmirror/tls/ca.pem"));
    assert_eq!(t.cert, Path::new("/etc/blockmirror/tls/site-a.pem"));
    assert_eq!(t.key, Path::new("/etc/blockmirror/tls/site-a.key"));
    assert_eq!(t.nbd_client_certs, ClientCerts::Optional);
    assert_eq!(c.volumes[0].tls, TlsMode::Require);
    let a = c.admin_auth.as_ref().unwrap();
    assert_eq!(
        a.token_file.as_deref(),
        Some(Path::new("/etc/blockmirror/admin.token"))
    );
    assert!(a.open_reads);
    assert!(!a.client_certs);
    // With [tls] the default is "allow"; without, "off".
    let text = format!("{}[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n", vol(""));
    assert_eq!(parse(&text).unwrap().volumes[0].tls, TlsMode::Allow);
    assert_eq!(parse(&vol("")).unwrap().volumes[0].tls, TlsMode::Off);
}

#[test]
fn tls_keys_are_checked() {
    assert_err(
        &vol("tls = \"require\""),
        "volume[0].tls",
        "needs a [tls] table",
    );
    assert_err(&vol("tls = \"maybe\""), "volume[0].tls", "expected \"off\"");
    assert_err(
        &format!("{}[tls]\nca = \"a\"\ncert = \"b\"\n", vol("")),
        "tls.key",
        "missing",
    );
    assert_err(
        &format!(
            "{}[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nnbd_client_certs = \"x\"\n",
            vol("")
        ),
        "tls.nbd_client_certs",
        "expected",
    );
    assert_err(
        &format!("{}[admin_auth]\nopen_reads = true\n", vol("")),
        "admin_auth.token_file",
        "missing",
    );
}

#[test]
fn a_cluster_node_may_start_without_volumes_and_takes_more_later() {
    let text = "node = \"n\"\nlisten = \"10.0.0.7:7789\"\nsecret_file = \"s\"\n\
                [cluster]\netcd = [\"http://127.0.0.1:2379\"]\n";
    let c = parse(text).unwrap();
    assert!(c.volumes.is_empty());
    let cl = c.cluster.as_ref().unwrap();
    // Declared volumes' exports listen on the replication address's IP.
    assert_eq!(cl.nbd_host.to_string(), "10.0.0.7");
    assert_eq!(cl.volume_dir, Path::new("/etc/blockmirror/volumes-n"));
    let more = c
        .with_volumes(
            "[[volume]]\nname = \"v\"\npath = \"v.img\"\nsize = \"1MiB\"\nrole = \"mirror\"\n\
             nbd = \"10.0.0.7:10900\"\n",
        )
        .unwrap();
    assert_eq!(more.volumes.len(), 1);
    assert_eq!(more.text, c.text, "the text stays the file's own");
    // Validated as one file: a second volume on the same export address
    // is refused.
    let two = "[[volume]]\nname = \"v\"\npath = \"v.img\"\nsize = \"1MiB\"\nrole = \"mirror\"\n\
               nbd = \"10.0.0.7:10900\"\n\
               [[volume]]\nname = \"w\"\npath = \"w.img\"\nsize = \"1MiB\"\nrole = \"mirror\"\n\
               nbd = \"10.0.0.7:10900\"\n";
    assert!(c.with_volumes(two).is_err());
    let bad = "node = \"n\"\n[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nnbd_host = \"x\"\n";
    assert_err(bad, "cluster.nbd_host", "IP address");
}

#[test]
fn tls_alone_authenticates_replication_links_and_without_it_the_secret_is_required() {
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"n.pem\"\nkey = \"n.key\"\n";
    let primary = vol("[[volume.mirror]]\npeer = \"127.0.0.1:7701\"");
    let mirror = format!(
        "listen = \"127.0.0.1:7701\"\n{}",
        vol_with("role", "role = \"mirror\"")
    );
    for text in [&primary, &mirror] {
        // Neither: refused, and the message says either will do.
        let e = err(text).to_string();
        assert!(e.contains("secret_file") && e.contains("[tls]"), "{e}");
        // [tls] alone: valid, no secret.
        let c = parse(&format!("{text}{tls}")).unwrap();
        assert_eq!(c.secret_file, None);
        assert!(c.tls.is_some());
        // Both: valid, both kept (links then need both).
        let c = parse(&format!("secret_file = \"s\"\n{text}{tls}")).unwrap();
        assert_eq!(c.secret_file, Some(PathBuf::from("/etc/blockmirror/s")));
        assert!(c.tls.is_some());
        // The secret alone: valid, as before TLS.
        let c = parse(&format!("secret_file = \"s\"\n{text}")).unwrap();
        assert!(c.tls.is_none());
    }
}

#[test]
fn admin_client_certs_need_https_and_make_the_token_optional() {
    let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
    // Client certificates alone.
    let c = parse(&format!(
        "{}{tls}[admin_auth]\nclient_certs = true\n",
        vol("")
    ))
    .unwrap();
    let a = c.admin_auth.unwrap();
    assert!(a.client_certs);
    assert_eq!(a.token_file, None);
    // Both.
    let c = parse(&format!(
        "{}{tls}[admin_auth]\nclient_certs = true\ntoken_file = \"t\"\n",
        vol("")
    ))
    .unwrap();
    let a = c.admin_auth.unwrap();
    assert!(a.client_certs && a.token_file.is_some());
    // Neither: the token is missing, and the message says client_certs would do.
    assert_err(
        &format!("{}{tls}[admin_auth]\nclient_certs = false\n", vol("")),
        "admin_auth.token_file",
        "unless client_certs",
    );
    // Client certificates need the HTTPS admin port.
    assert_err(
        &format!("{}[admin_auth]\nclient_certs = true\n", vol("")),
        "admin_auth.client_certs",
        "needs a [tls] table",
    );
    assert_err(
        &format!(
            "{}{tls}admin_https = false\n[admin_auth]\nclient_certs = true\n",
            vol("")
        ),
        "admin_auth.client_certs",
        "admin_https",
    );
}
