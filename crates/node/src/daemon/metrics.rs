//! Per-volume request metrics, rendered as Prometheus text.
//!
//! Recording is a handful of relaxed atomic adds: no locks, no allocation.
//! Rendering reads each counter once; under concurrent recording a scrape may
//! see a request in one counter and not yet in another, which Prometheus
//! tolerates. Histogram buckets, `_sum` and `_count` come from one set of
//! reads so that `+Inf` always equals `_count`.
//!
//! The text is written by the `prometheus-client` crate (OpenMetrics): each
//! module registers a [`FnCollector`] for its own families beside the code it
//! measures ([`register`] here for the request families), and [`family`] and
//! [`Family::sample`] are the small helpers they encode with.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
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
}

/// The histogram bucket for a latency of `ns` nanoseconds (`le` is inclusive).
#[inline]
fn bucket_index(ns: u64) -> usize {
    LATENCY_BOUNDS_NS.partition_point(|&b| b < ns)
}

pub use prometheus_client::encoding::DescriptorEncoder as Encoder;
pub use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{MetricEncoder, NoLabelSet};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry's families as OpenMetrics text (Prometheus scrapes it; the
/// sample lines are those of the Prometheus text format, and it ends with
/// `# EOF`).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; a collector's own error would be a bug.
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("metrics encode into a String");
    out
}

/// The content type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus
/// does by default); anything else gets the Prometheus text format.
pub fn accepts_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut it = part.split(';');
            let mime = it.next().unwrap_or("").trim();
            let q_zero = it.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f64>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            mime.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
        })
    })
}

/// [`render`]'s OpenMetrics text as the Prometheus text format (0.0.4): a
/// counter family's `# HELP` and `# TYPE` name its `_total` samples, and
/// there is no `# EOF`. The sample lines are the same in both formats.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let lines: Vec<&str> = openmetrics.lines().collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    let counter_type = |name: &str, from: usize| {
        lines[from..]
            .iter()
            .take(3)
            .find_map(|l| l.strip_prefix("# TYPE "))
            .and_then(|t| t.split_once(' '))
            .is_some_and(|(n, k)| n == name && k == "counter")
    };
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE ", "# UNIT "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some(("# UNIT ", _)) => continue,
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counter_type(name, i) {
                    out.push_str(prefix);
                    out.push_str(name);
                    out.push_str("_total ");
                    out.push_str(tail);
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// A [`Collector`] made of a function that encodes the families of one part
/// of the node from the state it measures, read at each scrape. Each module
/// registers its own beside the code it measures.
pub struct FnCollector<F> {
    what: &'static str,
    encode: F,
}

impl<F> FnCollector<F>
where
    F: Fn(&mut Encoder<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    /// `what` names the part in Debug output.
    pub fn boxed(what: &'static str, encode: F) -> Box<Self> {
        Box::new(FnCollector { what, encode })
    }
}

impl<F> std::fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FnCollector({})", self.what)
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut Encoder<'_>) -> std::fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: Encoder<'_>) -> std::fmt::Result {
        (self.encode)(&mut encoder)
    }
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    U(u64),
    I(i64),
    F(f64),
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Value {
                Value::$v(x.into())
            }
        }
    )*};
}
value_from!(u64 => U, u32 => U, u8 => U, bool => U, i64 => I, i32 => I, f64 => F, f32 => F);

impl From<usize> for Value {
    fn from(x: usize) -> Value {
        Value::U(x as u64)
    }
}

/// One metric family being encoded: its `# HELP` and `# TYPE` are written,
/// [`Family::sample`] adds its samples.
pub struct Family<'s> {
    enc: MetricEncoder<'s>,
    kind: MetricType,
}

/// Starts the family `name`. A counter's name ends in `_total` as it appears
/// in the samples (the OpenMetrics family name is without it).
pub fn family<'s>(
    enc: &'s mut Encoder<'_>,
    name: &'s str,
    kind: MetricType,
    help: &str,
) -> Result<Family<'s>, std::fmt::Error> {
    let base = match kind {
        MetricType::Counter => name
            .strip_suffix("_total")
            .unwrap_or_else(|| panic!("counter {name} must end in _total")),
        _ => name,
    };
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    Ok(Family {
        enc: enc.encode_descriptor(base, &help, None, kind)?,
        kind,
    })
}

impl Family<'_> {
    /// Adds the sample with `labels` (label values are escaped).
    pub fn sample(&mut self, labels: &[(&str, &str)], v: impl Into<Value>) -> std::fmt::Result {
        let kind = self.kind;
        if labels.is_empty() {
            return encode_value(&mut self.enc, kind, v.into());
        }
        let mut m = self.enc.encode_family(&labels)?;
        encode_value(&mut m, kind, v.into())
    }

    /// Adds one histogram series: `buckets` are (upper bound, count in that
    /// bucket, not cumulative), the last bound `f64::INFINITY`.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> std::fmt::Result {
        debug_assert_eq!(self.kind, MetricType::Histogram);
        let mut m = self.enc.encode_family(&labels)?;
        m.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}

fn encode_value(m: &mut MetricEncoder<'_>, kind: MetricType, v: Value) -> std::fmt::Result {
    match (kind, v) {
        (MetricType::Counter, Value::U(x)) => m.encode_counter::<NoLabelSet, _, u64>(&x, None),
        (MetricType::Counter, Value::I(x)) => {
            m.encode_counter::<NoLabelSet, _, u64>(&u64::try_from(x).unwrap_or(0), None)
        }
        (MetricType::Counter, Value::F(x)) => m.encode_counter::<NoLabelSet, _, u64>(&x, None),
        (_, Value::U(x)) => m.encode_gauge(&x),
        (_, Value::I(x)) => m.encode_gauge(&x),
        (_, Value::F(x)) => m.encode_gauge(&x),
    }
}

/// Nanoseconds as seconds, for `_sum`.
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Registers the request families of `volumes` (read at each scrape).
/// The node's volumes as each scrape sees them (cluster mode adds volumes
/// while the node runs).
pub type VolumeList = Arc<dyn Fn() -> Vec<Arc<crate::volume::Volume>> + Send + Sync>;

pub fn register(registry: &mut Registry, volumes: VolumeList) {
    registry.register_collector(FnCollector::boxed("requests", move |enc| {
        let volumes = volumes();
        let all: Vec<&VolumeMetrics> = volumes.iter().map(|v| v.metrics()).collect();
        encode_volumes(enc, &all)
    }));
}

/// Encodes all `volumes`' request families, grouped by family.
pub fn encode_volumes(enc: &mut Encoder<'_>, volumes: &[&VolumeMetrics]) -> std::fmt::Result {
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
        let mut f = family(enc, name, MetricType::Counter, help)?;
        for (vol, cmd, s) in rows() {
            f.sample(&[("volume", vol), ("cmd", cmd)], get(s))?;
        }
    }

    let mut f = family(
        enc,
        "blockmirror_host_bytes_written_total",
        MetricType::Counter,
        "Bytes written by hosts (successful NBD writes).",
    )?;
    for (v, s) in volumes.iter().zip(&snaps) {
        f.sample(&[("volume", &v.volume)], s[CmdKind::Write.index()].bytes)?;
    }

    let mut f = family(
        enc,
        "blockmirror_request_duration_seconds",
        MetricType::Histogram,
        "NBD request latency from receipt to reply, by command.",
    )?;
    for (vol, cmd, s) in rows() {
        let buckets: [(f64, u64); BUCKETS] = std::array::from_fn(|i| {
            let le = LATENCY_BOUNDS_NS
                .get(i)
                .map_or(f64::INFINITY, |&ns| seconds(ns));
            (le, s.buckets[i])
        });
        // _count is the buckets' total, so `+Inf` always equals it.
        let count = s.buckets.iter().fold(0u64, |a, n| a.wrapping_add(*n));
        f.histogram(
            &[("volume", vol), ("cmd", cmd)],
            seconds(s.latency_sum_ns),
            count,
            &buckets,
        )?;
    }

    let mut f = family(
        enc,
        "blockmirror_connections",
        MetricType::Gauge,
        "Open NBD client connections.",
    )?;
    for v in volumes {
        f.sample(&[("volume", &v.volume)], v.connections.load(Relaxed))?;
    }

    let mut f = family(
        enc,
        "blockmirror_volume_size_bytes",
        MetricType::Gauge,
        "Volume size in bytes.",
    )?;
    for v in volumes {
        f.sample(&[("volume", &v.volume)], v.size_bytes())?;
    }
    Ok(())
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

    /// The request families of `volumes`, through a registry as /metrics
    /// renders them.
    fn render_volumes(volumes: &[&Arc<VolumeMetrics>]) -> String {
        let vols: Vec<Arc<VolumeMetrics>> = volumes.iter().map(|v| (*v).clone()).collect();
        let mut reg = Registry::default();
        reg.register_collector(FnCollector::boxed("test", move |enc| {
            let all: Vec<&VolumeMetrics> = vols.iter().map(|v| &**v).collect();
            encode_volumes(enc, &all)
        }));
        render(&reg)
    }

    /// A minimal checker of the OpenMetrics text exposition: every
    /// non-comment line is `name{labels} value`; HELP and TYPE appear once
    /// per family, before its samples; a counter family's samples are
    /// `NAME_total`, a histogram's `NAME_bucket`, `_sum` and `_count`;
    /// families are not interleaved; the text ends with `# EOF`.
    fn check_exposition(text: &str) -> Vec<Sample> {
        let text = text
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("must end with # EOF: {text:?}"));
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "must end with a newline"
        );
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
            let family = [
                ("_bucket", "histogram"),
                ("_sum", "histogram"),
                ("_count", "histogram"),
                ("_total", "counter"),
            ]
            .iter()
            .find_map(|(suf, kind)| {
                s.name
                    .strip_suffix(suf)
                    .filter(|base| typed.get(*base).map(String::as_str) == Some(*kind))
            })
            .unwrap_or(&s.name)
            .to_string();
            if let Some(kind) = typed.get(&family) {
                if kind == "counter" {
                    assert!(s.name.ends_with("_total"), "counter sample {line}");
                }
            }
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
    }

    #[test]
    fn render_is_valid_exposition() {
        let a = Arc::new(VolumeMetrics::new("db"));
        let b = Arc::new(VolumeMetrics::new("we\"ird\\name\n"));
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

        let text = render_volumes(&[&a, &b]);
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
        let bucket = |le: f64| {
            let s: Vec<&Sample> = samples
                .iter()
                .filter(|s| {
                    s.name == "blockmirror_request_duration_seconds_bucket"
                        && s.labels["volume"] == "db"
                        && s.labels["cmd"] == "write"
                        && match s.labels["le"].as_str() {
                            "+Inf" => le.is_infinite(),
                            v => v.parse::<f64>().unwrap() == le,
                        }
                })
                .collect();
            assert_eq!(s.len(), 1, "one bucket le={le}");
            s[0].value
        };
        assert_eq!(bucket(2.5e-05), 0.0);
        assert_eq!(bucket(5e-05), 1.0);
        assert_eq!(bucket(0.005), 2.0);
        assert_eq!(bucket(10.0), 2.0);
        assert_eq!(bucket(f64::INFINITY), 3.0);
        // Every bound of LATENCY_BOUNDS_NS is a bucket, in seconds.
        let les: Vec<f64> = samples
            .iter()
            .filter(|s| {
                s.name == "blockmirror_request_duration_seconds_bucket"
                    && s.labels["volume"] == "db"
                    && s.labels["cmd"] == "write"
            })
            .map(|s| s.labels["le"].parse::<f64>().unwrap_or(f64::INFINITY))
            .collect();
        let want: Vec<f64> = LATENCY_BOUNDS_NS
            .iter()
            .map(|&ns| seconds(ns))
            .chain([f64::INFINITY])
            .collect();
        assert_eq!(les, want);
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
        let v = Arc::new(VolumeMetrics::new("x"));
        check_histograms(&check_exposition(&render_volumes(&[&v])));
        check_exposition(&render_volumes(&[]));
        assert_eq!(render(&Registry::default()), "# EOF\n");
    }

    #[test]
    fn connections_never_report_negative() {
        let v = VolumeMetrics::new("x");
        v.connection_closed();
        assert_eq!(v.connections(), 0);
    }

    #[test]
    fn concurrent_recording_counts_everything() {
        let v = Arc::new(VolumeMetrics::new("x"));
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
        check_histograms(&check_exposition(&render_volumes(&[&v])));
    }

    #[test]
    fn families_of_other_modules_are_encoded_through_the_registry() {
        let mut reg = Registry::default();
        reg.register_collector(FnCollector::boxed("test", |enc| {
            let mut f = family(
                enc,
                "blockmirror_lag_bytes",
                MetricType::Gauge,
                "Replication lag.\nIn bytes.",
            )?;
            f.sample(&[("volume", "db"), ("peer", "10.0.0.1:7700")], 42u64)?;
            f.sample(&[("volume", "d\"b"), ("peer", "x")], 0.5)?;
            let mut f = family(
                enc,
                "blockmirror_link_reconnects_total",
                MetricType::Counter,
                "Reconnects.",
            )?;
            f.sample(&[("volume", "db")], 3u64)?;
            let mut f = family(enc, "blockmirror_up", MetricType::Gauge, "Up.")?;
            f.sample(&[], 1u8)
        }));
        let out = render(&reg);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "# HELP blockmirror_lag_bytes Replication lag.\\nIn bytes.",
                "# TYPE blockmirror_lag_bytes gauge",
                "blockmirror_lag_bytes{volume=\"db\",peer=\"10.0.0.1:7700\"} 42",
                "blockmirror_lag_bytes{volume=\"d\\\"b\",peer=\"x\"} 0.5",
                "# HELP blockmirror_link_reconnects Reconnects.",
                "# TYPE blockmirror_link_reconnects counter",
                "blockmirror_link_reconnects_total{volume=\"db\"} 3",
                "# HELP blockmirror_up Up.",
                "# TYPE blockmirror_up gauge",
                "blockmirror_up 1",
                "# EOF",
            ]
        );
        check_exposition(&out);
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    fn a_counter_name_without_total_is_a_bug() {
        let mut reg = Registry::default();
        reg.register_collector(FnCollector::boxed("test", |enc| {
            family(enc, "blockmirror_oops", MetricType::Counter, "x").map(|_| ())
        }));
        render(&reg);
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let om = "# HELP a_x Things.\n# TYPE a_x counter\na_x_total{v=\"1\"} 3\n\
                  # HELP a_g A gauge.\n# TYPE a_g gauge\na_g 1\n\
                  # HELP a_h Lat.\n# TYPE a_h histogram\na_h_sum 0.5\na_h_count 1\n\
                  a_h_bucket{le=\"+Inf\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_x_total Things.\n# TYPE a_x_total counter\na_x_total{v=\"1\"} 3\n\
             # HELP a_g A gauge.\n# TYPE a_g gauge\na_g 1\n\
             # HELP a_h Lat.\n# TYPE a_h histogram\na_h_sum 0.5\na_h_count 1\n\
             a_h_bucket{le=\"+Inf\"} 1\n"
        );
        // The volumes' families convert to what the old checker accepted.
        let v = Arc::new(VolumeMetrics::new("x"));
        v.record(CmdKind::Write, 4096, Duration::from_micros(30), true);
        let text = to_prometheus_text(&render_volumes(&[&v]));
        assert!(text.contains("# TYPE blockmirror_requests_total counter\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        // Prometheus 2.x's default Accept header.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics(Some(prom)));
        assert!(!accepts_openmetrics(None));
        assert!(!accepts_openmetrics(Some("*/*")));
        assert!(!accepts_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!accepts_openmetrics(Some(
            "application/openmetrics-text;q=0"
        )));
    }
}
