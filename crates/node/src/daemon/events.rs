//! State-change events (`GET /events`, server-sent events) and the sample
//! history behind the status page (`GET /history`).
//!
//! Design: nothing in the data path publishes events. One task per node
//! (the [`Observer`]) samples the same [`NodeStatus`] that `GET /status`
//! returns every [`SAMPLE_EVERY`] and emits one [`Event`] for each field that
//! changed (role, generation, connection, link state, resync start and end,
//! verify results, split brain) on a `tokio::sync::broadcast` channel. A
//! transition that starts and ends within one sampling period is therefore
//! not seen; link states last far longer than that in practice (a reconnect
//! takes at least a handshake and a generation check), so no hook is needed.
//!
//! Once a second the observer also renders the node's metrics and keeps one
//! [`Sample`] (throughput, write latency, lag, out-of-sync bytes, resync
//! progress) in a ring of [`HISTORY_LEN`] (ten minutes).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::daemon::admin::AdminSource;
use crate::daemon::status::NodeStatus;

/// How often the observer compares the node's status with the last one.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(150);

/// After a [`poke`], the observer samples at once unless it sampled less
/// than this ago (then it waits for the rest): a burst of changes costs at
/// most one status read per this interval. Changes that undo each other
/// within it can still be coalesced.
pub const MIN_GAP: Duration = Duration::from_millis(5);

/// Bumped by [`poke`]; every observer in the process watches it.
static CHANGES: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(0).0);

/// Says that a link, a role or a mirror's stored state just changed: every
/// observer samples the status now instead of at its next tick, so that a
/// link that fails and reconnects within [`SAMPLE_EVERY`] still shows as
/// two events. Cheap (no allocation; a wake-up only when an observer
/// waits) and safe to call from any thread, with or without observers.
pub fn poke() {
    CHANGES.send_modify(|n| *n = n.wrapping_add(1));
}
/// A receiver of [`poke`]s (the cluster agent republishes which mirrors are
/// in step as soon as a link moves).
pub fn pokes() -> tokio::sync::watch::Receiver<u64> {
    CHANGES.subscribe()
}

/// Samples kept for the charts: one a second for ten minutes.
pub const HISTORY_LEN: usize = 600;
/// Events kept for `GET /events/recent` (the status page's event log).
pub const RECENT_LEN: usize = 200;

/// One state change, as sent on `GET /events` and printed by
/// `blockmirror events --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub node: String,
    pub volume: String,
    /// The mirror link's peer, for events about a link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// `role`, `generation`, `connection`, `state`, `resync`, `verify`,
    /// `split_brain`, `mirror_state` (on a mirror: its own label),
    /// `primary` (on a mirror: who feeds it).
    pub kind: String,
    /// The new value (a string for most kinds; see the README).
    pub value: serde_json::Value,
    /// The previous value, where there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
    /// True for the events `?now=true` sends first: the current state, not a
    /// change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub now: bool,
}

impl Event {
    /// One line for people, like `drbdsetup events2`.
    pub fn to_line(&self) -> String {
        let what = if self.now { "exists" } else { "change" };
        let mut s = format!("{} {what} {} volume:{}", self.time, self.kind, self.volume);
        if let Some(p) = &self.peer {
            s.push_str(&format!(" peer:{p}"));
        }
        let v = match &self.value {
            serde_json::Value::String(v) => v.clone(),
            v => v.to_string(),
        };
        s.push_str(&format!(" {}:{v}", self.kind));
        if let Some(o) = &self.old {
            let o = match o {
                serde_json::Value::String(o) => o.clone(),
                o => o.to_string(),
            };
            s.push_str(&format!(" (was {o})"));
        }
        s
    }
}

/// What events are derived from, per volume and per link.
#[derive(Debug, Clone, Default, PartialEq)]
struct Facts {
    /// volume -> field -> value
    volumes: BTreeMap<String, BTreeMap<&'static str, serde_json::Value>>,
    /// (volume, peer) -> field -> value
    links: BTreeMap<(String, String), BTreeMap<&'static str, serde_json::Value>>,
}

fn s(v: &str) -> serde_json::Value {
    serde_json::Value::String(v.to_owned())
}

impl Facts {
    fn of(status: &NodeStatus) -> Facts {
        let mut f = Facts::default();
        for v in &status.volumes {
            let mut m = BTreeMap::new();
            m.insert("role", s(&v.role));
            m.insert("generation", s(&v.generation));
            if let Some(st) = &v.state {
                m.insert("mirror_state", s(st));
            }
            if let Some(p) = &v.primary {
                m.insert("primary", s(p));
            }
            f.volumes.insert(v.name.clone(), m);
            for l in &v.mirrors {
                let mut m = BTreeMap::new();
                m.insert("connection", s(&l.connection));
                m.insert("state", s(&l.state));
                if let Some(r) = l.last_verify.as_ref().filter(|r| !r.is_running()) {
                    m.insert(
                        "verify",
                        serde_json::json!({
                            "id": r.id,
                            "result": r.state,
                            "differing_bytes": r.differing_bytes,
                            "full": r.full,
                        }),
                    );
                }
                f.links.insert((v.name.clone(), l.peer.clone()), m);
            }
        }
        f
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The events that turn `old` into `new` (all of `new`'s facts, marked
/// `now`, when `old` is `None`).
fn diff(node: &str, old: Option<&Facts>, new: &Facts) -> Vec<Event> {
    let time = now_rfc3339();
    let mut out = Vec::new();
    let ev = |volume: &str, peer: Option<&str>, kind: &str, value, old| Event {
        time: time.clone(),
        node: node.to_owned(),
        volume: volume.to_owned(),
        peer: peer.map(str::to_owned),
        kind: kind.to_owned(),
        value,
        old,
        now: false,
    };
    let initial = old.is_none();
    let empty = Facts::default();
    let old = old.unwrap_or(&empty);
    for (vol, fields) in &new.volumes {
        let before = old.volumes.get(vol);
        for (k, v) in fields {
            let was = before.and_then(|b| b.get(k));
            if was != Some(v) {
                out.push(ev(vol, None, k, v.clone(), was.cloned()));
                if *k == "mirror_state" && v == "split_brain" {
                    out.push(ev(vol, None, "split_brain", true.into(), None));
                }
            }
        }
    }
    for ((vol, peer), fields) in &new.links {
        let before = old.links.get(&(vol.clone(), peer.clone()));
        for (k, v) in fields {
            let was = before.and_then(|b| b.get(k));
            if was == Some(v) {
                continue;
            }
            out.push(ev(vol, Some(peer), k, v.clone(), was.cloned()));
            if *k != "state" || initial {
                continue;
            }
            // Derived: resync start and end, split brain.
            let was_s = was.and_then(|w| w.as_str()).unwrap_or("");
            let now_s = v.as_str().unwrap_or("");
            if now_s == "resyncing" {
                out.push(ev(vol, Some(peer), "resync", s("started"), None));
            } else if was_s == "resyncing" {
                let how = if now_s == "in_sync" {
                    "finished"
                } else {
                    "interrupted"
                };
                out.push(ev(vol, Some(peer), "resync", s(how), None));
            }
            if now_s == "split_brain" {
                out.push(ev(vol, Some(peer), "split_brain", true.into(), None));
            } else if was_s == "split_brain" {
                out.push(ev(vol, Some(peer), "split_brain", false.into(), None));
            }
        }
    }
    if initial {
        for e in &mut out {
            e.now = true;
        }
    }
    out
}

/// One second of the charts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub volumes: Vec<VolumeSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeSample {
    pub name: String,
    /// Host write throughput over the last second.
    pub write_bytes_per_sec: f64,
    /// Mean host write latency over the last second (null without writes).
    pub write_latency_ms: Option<f64>,
    pub links: Vec<LinkSample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkSample {
    pub peer: String,
    pub state: String,
    pub connection: String,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub out_of_sync_bytes: u64,
    /// Bytes acknowledged by this mirror over the last second.
    pub replicated_bytes_per_sec: f64,
    pub resync_done_bytes: u64,
    pub resync_total_bytes: u64,
}

/// The counters a sample is a difference of, read from the metrics text.
#[derive(Default)]
struct Counters {
    at: Option<Instant>,
    /// volume -> (bytes written, write count, write latency sum)
    writes: BTreeMap<String, (f64, f64, f64)>,
    /// (volume, peer) -> bytes replicated
    replicated: BTreeMap<(String, String), f64>,
}

/// Parses the labels of one Prometheus text sample line.
fn labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let mut val = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len() - eq - 2;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, c)) => val.push(c),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(key, val);
        rest = &rest[eq + 2 + end..];
    }
    out
}

fn read_counters(text: &str) -> Counters {
    let mut c = Counters {
        at: Some(Instant::now()),
        ..Counters::default()
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, l) = match head.split_once('{') {
            Some((n, l)) => (n, labels(l.trim_end_matches('}'))),
            None => (head, BTreeMap::new()),
        };
        let vol = l.get("volume").cloned().unwrap_or_default();
        match name {
            "blockmirror_host_bytes_written_total" => c.writes.entry(vol).or_default().0 = value,
            "blockmirror_request_duration_seconds_count"
                if l.get("cmd").map(String::as_str) == Some("write") =>
            {
                c.writes.entry(vol).or_default().1 = value
            }
            "blockmirror_request_duration_seconds_sum"
                if l.get("cmd").map(String::as_str) == Some("write") =>
            {
                c.writes.entry(vol).or_default().2 = value
            }
            "blockmirror_replicated_bytes_total" => {
                let peer = l.get("peer").cloned().unwrap_or_default();
                c.replicated.insert((vol, peer), value);
            }
            _ => {}
        }
    }
    c
}

fn sample(status: &NodeStatus, prev: &Counters, now: &Counters) -> Sample {
    let secs = match (prev.at, now.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
        _ => 1.0,
    };
    let have_prev = prev.at.is_some();
    Sample {
        t: unix_ms(),
        volumes: status
            .volumes
            .iter()
            .map(|v| {
                let (b1, n1, s1) = now.writes.get(&v.name).copied().unwrap_or_default();
                let (b0, n0, s0) = prev.writes.get(&v.name).copied().unwrap_or((b1, n1, s1));
                let dn = n1 - n0;
                VolumeSample {
                    name: v.name.clone(),
                    write_bytes_per_sec: if have_prev {
                        ((b1 - b0) / secs).max(0.0)
                    } else {
                        0.0
                    },
                    write_latency_ms: (have_prev && dn > 0.0).then(|| (s1 - s0) / dn * 1e3),
                    links: v
                        .mirrors
                        .iter()
                        .map(|l| {
                            let key = (v.name.clone(), l.peer.clone());
                            let r1 = now.replicated.get(&key).copied().unwrap_or(0.0);
                            let r0 = prev.replicated.get(&key).copied().unwrap_or(r1);
                            LinkSample {
                                peer: l.peer.clone(),
                                state: l.state.clone(),
                                connection: l.connection.clone(),
                                lag_bytes: l.lag_bytes,
                                lag_seconds: l.lag_seconds,
                                out_of_sync_bytes: l.out_of_sync_bytes,
                                replicated_bytes_per_sec: ((r1 - r0) / secs).max(0.0),
                                resync_done_bytes: l.resync_done_bytes,
                                resync_total_bytes: l.resync_total_bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// The node's event channel and sample history.
pub struct Observer {
    node: String,
    /// Cancelled when the node shuts down: ends every `GET /events` stream
    /// (the admin server's graceful shutdown waits for open responses).
    pub closed: CancellationToken,
    tx: broadcast::Sender<Event>,
    state: Mutex<ObserverState>,
}

#[derive(Default)]
struct ObserverState {
    facts: Option<Facts>,
    recent: VecDeque<Event>,
    history: VecDeque<Sample>,
}

impl Observer {
    pub fn new(node: &str, closed: CancellationToken) -> Arc<Observer> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Observer {
            node: node.to_owned(),
            closed,
            tx,
            state: Mutex::new(ObserverState::default()),
        })
    }

    /// A receiver of every event from now on, and the current state as
    /// `now` events (sent before anything the receiver will get).
    pub fn subscribe(&self, source: &dyn AdminSource) -> (Vec<Event>, broadcast::Receiver<Event>) {
        // The snapshot is taken now, not at the last sample (up to
        // SAMPLE_EVERY old): a change since then is published to the other
        // receivers first, and this one starts from the current state.
        self.observe(&source.status());
        // Taking the state lock orders this against `observe`: every change
        // after the snapshot below is on the receiver.
        let st = self.state.lock().expect("observer state");
        let rx = self.tx.subscribe();
        let facts = st
            .facts
            .clone()
            .unwrap_or_else(|| Facts::of(&source.status()));
        (diff(&self.node, None, &facts), rx)
    }

    /// The last [`RECENT_LEN`] events.
    pub fn recent(&self) -> Vec<Event> {
        let st = self.state.lock().expect("observer state");
        st.recent.iter().cloned().collect()
    }

    /// The last [`HISTORY_LEN`] samples, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        let st = self.state.lock().expect("observer state");
        st.history.iter().cloned().collect()
    }

    /// Compares `status` with the last one seen and publishes the changes.
    pub fn observe(&self, status: &NodeStatus) {
        let facts = Facts::of(status);
        let mut st = self.state.lock().expect("observer state");
        if st.facts.as_ref() == Some(&facts) {
            return;
        }
        let events = match &st.facts {
            Some(old) => diff(&self.node, Some(old), &facts),
            None => Vec::new(),
        };
        st.facts = Some(facts);
        for e in events {
            tracing::debug!(volume = %e.volume, peer = ?e.peer, kind = %e.kind, value = %e.value, "event");
            if st.recent.len() == RECENT_LEN {
                st.recent.pop_front();
            }
            st.recent.push_back(e.clone());
            // No receivers is fine.
            let _ = self.tx.send(e);
        }
    }

    fn push_sample(&self, s: Sample) {
        let mut st = self.state.lock().expect("observer state");
        if st.history.len() == HISTORY_LEN {
            st.history.pop_front();
        }
        st.history.push_back(s);
    }

    /// Samples `source` until `shutdown`.
    pub async fn run(self: Arc<Self>, source: Arc<dyn AdminSource>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut counters = Counters::default();
        let mut last_sample: Option<Instant> = None;
        let mut changes = CHANGES.subscribe();
        let mut last_status: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                _ = changes.changed() => {
                    if let Some(gap) = last_status.and_then(|t| MIN_GAP.checked_sub(t.elapsed())) {
                        tokio::time::sleep(gap).await;
                    }
                    changes.borrow_and_update();
                }
            }
            last_status = Some(Instant::now());
            let status = source.status();
            self.observe(&status);
            if last_sample.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_sample = Some(Instant::now());
                let now = read_counters(&source.metrics());
                self.push_sample(sample(&status, &counters, &now));
                counters = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::{MirrorStatus, VolumeStatus};

    fn status(conn: &str, state: &str) -> NodeStatus {
        NodeStatus {
            cluster: None,
            node: "a".into(),
            volumes: vec![VolumeStatus {
                name: "db".into(),
                role: "primary".into(),
                generation: "g1".into(),
                mirrors: vec![MirrorStatus {
                    peer: "127.0.0.1:7701".into(),
                    connection: conn.into(),
                    state: state.into(),
                    ..MirrorStatus::default()
                }],
                ..VolumeStatus::default()
            }],
        }
    }

    /// A source whose status the test sets.
    struct Settable(Mutex<NodeStatus>);

    impl AdminSource for Settable {
        fn status(&self) -> NodeStatus {
            self.0.lock().unwrap().clone()
        }
        fn metrics(&self) -> String {
            String::new()
        }
    }

    /// A link that fails and comes back well within one SAMPLE_EVERY shows
    /// as both changes when each is poked (as the link, role and receiver
    /// code do), and each event arrives before the next tick would.
    #[tokio::test(start_paused = true)]
    async fn a_poke_samples_at_once_so_a_quick_flap_is_seen() {
        let shutdown = CancellationToken::new();
        let o = Observer::new("a", shutdown.clone());
        let src = Arc::new(Settable(Mutex::new(status("connected", "in_sync"))));
        let (_, mut rx) = o.subscribe(&*src);
        let run = tokio::spawn(o.clone().run(src.clone(), shutdown.clone()));
        // Let the first tick pass.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let start = tokio::time::Instant::now();
        *src.0.lock().unwrap() = status("disconnected", "degraded");
        poke();
        let down = rx.recv().await.unwrap();
        assert_eq!(
            (down.kind.as_str(), down.value.as_str()),
            ("connection", Some("disconnected"))
        );
        assert_eq!(rx.recv().await.unwrap().kind, "state");
        *src.0.lock().unwrap() = status("connected", "in_sync");
        poke();
        let up = rx.recv().await.unwrap();
        assert_eq!(
            (up.kind.as_str(), up.value.as_str()),
            ("connection", Some("connected"))
        );
        let took = start.elapsed();
        assert!(
            took < SAMPLE_EVERY,
            "{took:?}: the events waited for a tick"
        );
        shutdown.cancel();
        run.await.unwrap();
    }

    #[test]
    fn changes_become_events_in_order() {
        let o = Observer::new("a", CancellationToken::new());
        let mut rx = o.tx.subscribe();
        o.observe(&status("connected", "in_sync"));
        o.observe(&status("disconnected", "degraded"));
        o.observe(&status("connected", "resyncing"));
        o.observe(&status("connected", "in_sync"));
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(format!("{}={}", e.kind, e.value.as_str().unwrap_or("?")));
        }
        assert_eq!(
            got,
            [
                "connection=disconnected",
                "state=degraded",
                "connection=connected",
                "state=resyncing",
                "resync=started",
                "state=in_sync",
                "resync=finished",
            ]
        );
        assert_eq!(o.recent().len(), 7);
    }

    #[test]
    fn now_events_describe_the_current_state() {
        let f = Facts::of(&status("connected", "split_brain"));
        let ev = diff("a", None, &f);
        assert!(ev.iter().all(|e| e.now));
        let kinds: Vec<&str> = ev.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["generation", "role", "connection", "state"]);
        assert!(ev[3]
            .to_line()
            .contains("exists state volume:db peer:127.0.0.1:7701"));
    }

    #[test]
    fn counters_parse_from_metrics_text() {
        let text = "# HELP x\n\
            blockmirror_host_bytes_written_total{volume=\"db\"} 4096\n\
            blockmirror_request_duration_seconds_count{volume=\"db\",cmd=\"write\"} 2\n\
            blockmirror_request_duration_seconds_sum{volume=\"db\",cmd=\"write\"} 0.5\n\
            blockmirror_request_duration_seconds_sum{volume=\"db\",cmd=\"read\"} 9\n\
            blockmirror_replicated_bytes_total{volume=\"db\",peer=\"p\\\"q\"} 100\n";
        let c = read_counters(text);
        assert_eq!(c.writes["db"], (4096.0, 2.0, 0.5));
        assert_eq!(c.replicated[&("db".to_string(), "p\"q".to_string())], 100.0);
    }
}
