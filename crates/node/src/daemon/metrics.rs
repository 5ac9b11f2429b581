//! Per-volume request metrics, rendered as Prometheus text.
//!
//! Recording is a handful of relaxed atomic adds: no locks, no allocation.
//! Rendering reads each counter once; under concurrent recording a scrape may
//! see a request in one counter and not yet in another, which Prometheus
//! tolerates. Histogram buckets, `_sum` and `_count` come from one set of
//! reads so that `+Inf` always equals `_count`.
//!
//! [`render_all`] writes every volume grouped by metric family, with `# HELP`
//! and `# TYPE` once per family; [`write_header`] and [`write_sample`] let
//! other modules add their own families in the same format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use blockmirror_nbd::CmdKind;

/// Upper bounds of the latency histogram buckets, in nanoseconds; a final
/// `+Inf` bucket follows.
pub const LATENCY_BOUNDS_NS: [u64; 18] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// `le` labels matching [`LATENCY_BOUNDS_NS`], then `+Inf`.
const LATENCY_LE: [&str; BUCKETS] = [
    "1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025", "0.05", "0.1", "0.25", "1", "2.5", "5", "10", "+Inf",
];

const BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;
const CMDS: usize = CmdKind::ALL.len();

/// Counters for one command kind.
#[derive(Default)]
struct CmdStats {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Bytes of successful requests (for read/write: data moved; for
    /// trim/write_zeroes/cache: the range length).
    bytes: AtomicU64,
    /// Per-bucket counts, not cumulative.
    buckets: [AtomicU64; BUCKETS],
    latency_sum_ns: AtomicU64,
}

/// Reads one counter out of a [`CmdSnapshot`].
type Field = fn(&CmdSnapshot) -> u64;

/// One consistent-enough read of a [`CmdStats`].
struct CmdSnapshot {
    requests: u64,
    errors: u64,
    bytes: u64,
    buckets: [u64; BUCKETS],
    latency_sum_ns: u64,
}

impl CmdStats {
    fn snapshot(&self) -> CmdSnapshot {
        CmdSnapshot {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            latency_sum_ns: self.latency_sum_ns.load(Relaxed),
        }
    }
}

/// Request metrics of one volume. Share it behind an `Arc`.
pub struct VolumeMetrics {
    volume: String,
    cmds: [CmdStats; CMDS],
    connections: AtomicI64,
    size_bytes: AtomicU64,
}

impl std::fmt::Debug for VolumeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeMetrics")
            .field("volume", &self.volume)
            .field("connections", &self.connections())
            .field("size_bytes", &self.size_bytes())
            .finish_non_exhaustive()
    }
}

impl VolumeMetrics {
    /// Zeroed metrics for `volume` (the `volume` label).
    pub fn new(volume: &str) -> VolumeMetrics {
        VolumeMetrics {
            volume: volume.to_string(),
            cmds: Default::default(),
            connections: AtomicI64::new(0),
            size_bytes: AtomicU64::new(0),
        }
    }

    /// The `volume` label.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Counts one completed request. `bytes` counts only when `ok`; latency
    /// is recorded either way.
    #[inline]
    pub fn record(&self, cmd: CmdKind, bytes: u64, latency: Duration, ok: bool) {
        let s = &self.cmds[cmd.index()];
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        s.requests.fetch_add(1, Relaxed);
        if ok {
            s.bytes.fetch_add(bytes, Relaxed);
        } else {
            s.errors.fetch_add(1, Relaxed);
        }
        s.buckets[bucket_index(ns)].fetch_add(1, Relaxed);
        s.latency_sum_ns.fetch_add(ns, Relaxed);
    }

    /// A client connected to this volume's export.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    /// A client disconnected from this volume's export.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Open client connections (never negative).
    pub fn connections(&self) -> u64 {
        u64::try_from(self.connections.load(Relaxed)).unwrap_or(0)
    }

    /// Sets the `blockmirror_volume_size_bytes` gauge.
    pub fn set_size_bytes(&self, bytes: u64) {
        self.size_bytes.store(bytes, Relaxed);
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Relaxed)
    }

    /// Requests of kind `cmd` so far.
    pub fn requests(&self, cmd: CmdKind) -> u64 {
        self.cmds[cmd.index()].requests.load(Relaxed)
    }

    /// Failed requests of kind `cmd` so far.
    pub fn errors(&self, cmd: CmdKind) -> u64 {
        self.cmds[cmd.index()].errors.load(Relaxed)
    }

    /// Bytes of successful requests of kind `cmd` so far.
    pub fn bytes(&self, cmd: CmdKind) -> u64 {
        self.cmds[cmd.index()].bytes.load(Relaxed)
    }

    /// Bytes hosts have written (successful WRITE payloads).
    pub fn host_bytes_written(&self) -> u64 {
        self.bytes(CmdKind::Write)
    }

    /// Renders this volume alone, with its own HELP/TYPE lines. To render
    /// several volumes use [`render_all`].
    pub fn render(&self, out: &mut String) {
        render_into(out, &[self]);
    }
}

/// The histogram bucket for a latency of `ns` nanoseconds (`le` is inclusive).
#[inline]
fn bucket_index(ns: u64) -> usize {
    LATENCY_BOUNDS_NS.partition_point(|&b| b < ns)
}

/// Prometheus metric types, for [`write_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
            MetricType::Histogram => "histogram",
        }
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn write_header(out: &mut String, name: &str, kind: MetricType, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {}", kind.as_str());
}

/// Writes one sample line `name{k="v",...} value`, escaping label values.
pub fn write_sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    value: impl std::fmt::Display,
) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Nanoseconds as seconds, for `_sum`.
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Renders all `volumes` as Prometheus text, grouped by metric family.
pub fn render_all(volumes: &[&VolumeMetrics]) -> String {
    let mut out = String::new();
    render_into(&mut out, volumes);
    out
}

/// Appends all `volumes` to `out`, grouped by metric family.
pub fn render_into(out: &mut String, volumes: &[&VolumeMetrics]) {
    // Read every counter once so that all families agree with each other.
    let snaps: Vec<[CmdSnapshot; CMDS]> = volumes
        .iter()
        .map(|v| std::array::from_fn(|i| v.cmds[i].snapshot()))
        .collect();
    let rows = || {
        volumes.iter().zip(&snaps).flat_map(|(v, s)| {
            CmdKind::ALL
                .iter()
                .map(move |c| (v.volume.as_str(), c.as_str(), &s[c.index()]))
        })
    };

    let counters: [(&str, &str, Field); 3] = [
        (
            "blockmirror_requests_total",
            "NBD requests completed, by command.",
            |s| s.requests,
        ),
        (
            "blockmirror_request_errors_total",
            "NBD requests that completed with an error, by command.",
            |s| s.errors,
        ),
        (
            "blockmirror_bytes_total",
            "Bytes of successful NBD requests, by command (data moved for read/write, range length otherwise).",
            |s| s.bytes,
        ),
    ];
    for (name, help, get) in counters {
        write_header(out, name, MetricType::Counter, help);
        for (vol, cmd, s) in rows() {
            write_sample(out, name, &[("volume", vol), ("cmd", cmd)], get(s));
        }
    }

    let name = "blockmirror_host_bytes_written_total";
    write_header(
        out,
        name,
        MetricType::Counter,
        "Bytes written by hosts (successful NBD writes).",
    );
    for (v, s) in volumes.iter().zip(&snaps) {
        write_sample(
            out,
            name,
            &[("volume", &v.volume)],
            s[CmdKind::Write.index()].bytes,
        );
    }

    let name = "blockmirror_request_duration_seconds";
    write_header(
        out,
        name,
        MetricType::Histogram,
        "NBD request latency from receipt to reply, by command.",
    );
    let bucket = format!("{name}_bucket");
    let sum = format!("{name}_sum");
    let count = format!("{name}_count");
    for (vol, cmd, s) in rows() {
        let mut cumulative = 0u64;
        for (n, le) in s.buckets.iter().zip(LATENCY_LE) {
            cumulative = cumulative.wrapping_add(*n);
            write_sample(
                out,
                &bucket,
                &[("volume", vol), ("cmd", cmd), ("le", le)],
                cumulative,
            );
        }
        write_sample(
            out,
            &sum,
            &[("volume", vol), ("cmd", cmd)],
            seconds(s.latency_sum_ns),
        );
        write_sample(out, &count, &[("volume", vol), ("cmd", cmd)], cumulative);
    }

    let name = "blockmirror_connections";
    write_header(out, name, MetricType::Gauge, "Open NBD client connections.");
    for v in volumes {
        write_sample(
            out,
            name,
            &[("volume", &v.volume)],
            v.connections.load(Relaxed),
        );
    }

    let name = "blockmirror_volume_size_bytes";
    write_header(out, name, MetricType::Gauge, "Volume size in bytes.");
    for v in volumes {
        write_sample(out, name, &[("volume", &v.volume)], v.size_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    /// A parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A minimal checker of the Prometheus text exposition format: every
    /// non-comment line is `name{labels} value`; HELP and TYPE appear once
    /// per family, before its samples; families are not interleaved.
    fn check_exposition(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "must end with a newline");
        let mut samples = Vec::new();
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = HashSet::new();
        let mut finished = HashSet::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let kw = parts.next().unwrap();
                let name = parts.next().expect("comment names a metric").to_string();
                let arg = parts.next().expect("comment has text");
                assert!(valid_name(&name), "bad name in {line:?}");
                match kw {
                    "HELP" => assert!(helped.insert(name.clone()), "second HELP: {line}"),
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram"].contains(&arg),
                            "bad type: {line}"
                        );
                        assert!(
                            typed.insert(name.clone(), arg.to_string()).is_none(),
                            "second TYPE: {line}"
                        );
                    }
                    _ => panic!("unknown comment {line:?}"),
                }
                if current.as_deref() != Some(&name) {
                    if let Some(prev) = current.replace(name.clone()) {
                        finished.insert(prev);
                    }
                    assert!(!finished.contains(&name), "family {name} interleaved");
                }
                continue;
            }
            let s = parse_sample(line);
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    s.name
                        .strip_suffix(suf)
                        .filter(|base| typed.get(*base).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(&s.name)
                .to_string();
            assert_eq!(
                current.as_deref(),
                Some(family.as_str()),
                "sample outside its family: {line}"
            );
            assert!(typed.contains_key(&family), "no TYPE before {line}");
            samples.push(s);
        }
        samples
    }

    fn valid_name(n: &str) -> bool {
        let mut cs = n.chars();
        matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_sample(line: &str) -> Sample {
        let (head, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match head.split_once('{') {
            None => (head, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                (name, parse_labels(body, line))
            }
        };
        assert!(valid_name(name), "bad metric name in {line:?}");
        Sample {
            name: name.to_string(),
            labels,
            value,
        }
    }

    fn parse_labels(mut body: &str, line: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        while !body.is_empty() {
            let (k, rest) = body
                .split_once("=\"")
                .unwrap_or_else(|| panic!("bad label in {line:?}"));
            assert!(
                valid_name(k) && !k.contains(':'),
                "bad label name {k:?} in {line:?}"
            );
            let mut v = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => v.push('\\'),
                        Some((_, '"')) => v.push('"'),
                        Some((_, 'n')) => v.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => v.push(c),
                    None => panic!("unterminated label value in {line:?}"),
                }
            };
            assert!(
                labels.insert(k.to_string(), v).is_none(),
                "duplicate label in {line:?}"
            );
            body = &rest[end + 1..];
            body = body.strip_prefix(',').unwrap_or(body);
        }
        labels
    }

    fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> &'a Sample {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    /// Checks every histogram series: buckets ascend in `le`, are cumulative,
    /// and `+Inf` equals `_count`.
    fn check_histograms(samples: &[Sample]) {
        // Series key (name and labels but `le`) -> (le, cumulative count).
        type Series = BTreeMap<Vec<(String, String)>, Vec<(f64, f64)>>;
        let mut series = Series::new();
        for s in samples.iter().filter(|s| s.name.ends_with("_bucket")) {
            let le = s.labels.get("le").expect("bucket has le");
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le is a number")
            };
            let mut key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            key.insert(
                0,
                (
                    "__name__".into(),
                    s.name.trim_end_matches("_bucket").to_string(),
                ),
            );
            series.entry(key).or_default().push((le, s.value));
        }
        assert!(!series.is_empty());
        for (key, buckets) in series {
            for w in buckets.windows(2) {
                assert!(w[0].0 < w[1].0, "le not ascending in {key:?}");
                assert!(w[0].1 <= w[1].1, "buckets not cumulative in {key:?}");
            }
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "last bucket is not +Inf in {key:?}");
            let name = format!("{}_count", key[0].1);
            let labels: Vec<(&str, &str)> = key[1..]
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                find(samples, &name, &labels).value,
                last.1,
                "+Inf != _count in {key:?}"
            );
        }
    }

    #[test]
    fn bucket_bounds_are_inclusive() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(10_000), 0);
        assert_eq!(bucket_index(10_001), 1);
        assert_eq!(bucket_index(1_000_000_000), 14);
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        for (ns, le) in LATENCY_BOUNDS_NS.iter().zip(LATENCY_LE) {
            assert_eq!(le.parse::<f64>().unwrap(), *ns as f64 / 1e9);
        }
        assert_eq!(LATENCY_LE[BUCKETS - 1], "+Inf");
    }

    #[test]
    fn render_is_valid_exposition() {
        let a = VolumeMetrics::new("db");
        let b = VolumeMetrics::new("we\"ird\\name\n");
        a.set_size_bytes(1 << 30);
        a.connection_opened();
        a.connection_opened();
        a.connection_closed();
        a.record(CmdKind::Write, 4096, Duration::from_micros(30), true);
        a.record(CmdKind::Write, 4096, Duration::from_millis(3), true);
        a.record(CmdKind::Write, 4096, Duration::from_secs(100), false);
        a.record(CmdKind::Read, 512, Duration::from_nanos(1), true);
        a.record(CmdKind::Flush, 0, Duration::from_millis(1), true);
        b.record(CmdKind::Trim, 1 << 20, Duration::from_micros(10), true);

        let text = render_all(&[&a, &b]);
        let samples = check_exposition(&text);
        check_histograms(&samples);

        let w = [("volume", "db"), ("cmd", "write")];
        assert_eq!(find(&samples, "blockmirror_requests_total", &w).value, 3.0);
        assert_eq!(
            find(&samples, "blockmirror_request_errors_total", &w).value,
            1.0
        );
        assert_eq!(find(&samples, "blockmirror_bytes_total", &w).value, 8192.0);
        assert_eq!(
            find(
                &samples,
                "blockmirror_host_bytes_written_total",
                &[("volume", "db")]
            )
            .value,
            8192.0
        );
        assert_eq!(
            find(&samples, "blockmirror_request_duration_seconds_count", &w).value,
            3.0
        );
        let sum = find(&samples, "blockmirror_request_duration_seconds_sum", &w).value;
        assert!((sum - 100.00303).abs() < 1e-9, "{sum}");
        let bucket = |le| {
            find(
                &samples,
                "blockmirror_request_duration_seconds_bucket",
                &[("volume", "db"), ("cmd", "write"), ("le", le)],
            )
            .value
        };
        assert_eq!(bucket("2.5e-05"), 0.0);
        assert_eq!(bucket("5e-05"), 1.0);
        assert_eq!(bucket("0.005"), 2.0);
        assert_eq!(bucket("10"), 2.0);
        assert_eq!(bucket("+Inf"), 3.0);
        assert_eq!(
            find(&samples, "blockmirror_connections", &[("volume", "db")]).value,
            1.0
        );
        assert_eq!(
            find(
                &samples,
                "blockmirror_volume_size_bytes",
                &[("volume", "db")]
            )
            .value,
            1073741824.0
        );
        let odd = [("volume", "we\"ird\\name\n"), ("cmd", "trim")];
        assert_eq!(
            find(&samples, "blockmirror_bytes_total", &odd).value,
            1048576.0
        );

        // Every command kind appears for every volume.
        for v in ["db", "we\"ird\\name\n"] {
            for c in CmdKind::ALL {
                find(
                    &samples,
                    "blockmirror_requests_total",
                    &[("volume", v), ("cmd", c.as_str())],
                );
            }
        }
        assert_eq!(a.requests(CmdKind::Write), 3);
        assert_eq!(a.errors(CmdKind::Write), 1);
        assert_eq!(a.host_bytes_written(), 8192);
        assert_eq!(a.connections(), 1);
    }

    #[test]
    fn single_volume_render_and_empty_registry_are_valid() {
        let v = VolumeMetrics::new("x");
        let mut out = String::new();
        v.render(&mut out);
        check_histograms(&check_exposition(&out));
        let empty = render_all(&[]);
        check_exposition(&empty);
    }

    #[test]
    fn connections_never_report_negative() {
        let v = VolumeMetrics::new("x");
        v.connection_closed();
        assert_eq!(v.connections(), 0);
    }

    #[test]
    fn concurrent_recording_counts_everything() {
        let v = std::sync::Arc::new(VolumeMetrics::new("x"));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let v = v.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        v.record(
                            CmdKind::ALL[(i as usize + t) % CMDS],
                            1,
                            Duration::from_nanos(i * 1000),
                            true,
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = CmdKind::ALL.iter().map(|c| v.requests(*c)).sum();
        assert_eq!(total, 40_000);
        check_histograms(&check_exposition(&render_all(&[&v])));
    }

    #[test]
    fn extra_families_can_be_written() {
        let mut out = String::new();
        write_header(
            &mut out,
            "blockmirror_lag_bytes",
            MetricType::Gauge,
            "Replication lag.\nIn bytes.",
        );
        write_sample(
            &mut out,
            "blockmirror_lag_bytes",
            &[("volume", "db"), ("peer", "10.0.0.1:7700")],
            42,
        );
        write_sample(&mut out, "blockmirror_up", &[], 1);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "# HELP blockmirror_lag_bytes Replication lag.\\nIn bytes."
        );
        assert_eq!(
            lines[2],
            "blockmirror_lag_bytes{volume=\"db\",peer=\"10.0.0.1:7700\"} 42"
        );
        assert_eq!(lines[3], "blockmirror_up 1");
    }
}
