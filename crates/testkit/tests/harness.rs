//! The cluster-mode harness tested on itself: an etcd cluster that keeps
//! and loses quorum as members die and come back, and the same cluster
//! spread over network namespaces with one site partitioned and healed.
//!
//! Needs `etcd` (scripts/install-deps.sh); the namespace test also needs
//! root and `ip netns`, and says why and passes without them.

use std::process::Command;
use std::time::{Duration, Instant};

use blockmirror_testkit::etcd::{self, EtcdCluster, EtcdOpts, MemberSpec};
use blockmirror_testkit::netns::Sites;

/// What a request that should succeed may take (an election may be on).
const OK_WITHIN: Duration = Duration::from_secs(10);
/// The bound on a request that should not succeed.
const FAIL_WITHIN: Duration = Duration::from_millis(1500);

/// Retries `f` until it succeeds or `timeout` passes.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => {
                panic!("{what}: still failing after {timeout:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Asserts that `f` fails, and within the bound it was given (plus slack).
fn fails_in_time<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> Result<T, String>) -> String {
    let t = Instant::now();
    let r = f();
    let took = t.elapsed();
    assert!(
        took < FAIL_WITHIN + Duration::from_secs(1),
        "{what} took {took:?}"
    );
    match r {
        Ok(v) => panic!("{what} succeeded: {v:?}"),
        Err(e) => {
            println!("{what}: failed as it should, in {took:?}: {e}");
            e
        }
    }
}

#[test]
fn loopback_cluster_keeps_quorum_with_one_down_and_loses_it_with_two() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut c = EtcdCluster::start(EtcdOpts::new(dir.path(), 3)).unwrap();
    println!(
        "3 members healthy in {:?}: {:?}",
        t.elapsed(),
        c.endpoints()
    );
    assert_eq!(c.endpoints().len(), 3);
    assert!(c.member_endpoint(1).starts_with("http://127.0.0.1:"));

    // Written through one member, read (linearizably) through another.
    c.put(0, b"k1", b"v1", OK_WITHIN).unwrap();
    assert_eq!(
        c.get(1, b"k1", OK_WITHIN).unwrap().as_deref(),
        Some(&b"v1"[..])
    );
    assert_eq!(c.get(2, b"absent", OK_WITHIN).unwrap(), None);
    assert!(c.leader_seen_by(2, OK_WITHIN).is_some());

    // One down: still a quorum.
    c.kill(0);
    assert!(!c.is_running(0));
    c.wait_healthy(OK_WITHIN).unwrap();
    eventually("a put with one member down", OK_WITHIN, || {
        c.put(1, b"k2", b"v2", Duration::from_secs(2))
    });
    assert_eq!(
        c.get(2, b"k2", OK_WITHIN).unwrap().as_deref(),
        Some(&b"v2"[..])
    );

    // Two down: no quorum; a put neither succeeds nor hangs.
    c.kill(1);
    fails_in_time("a put with two of three down", || {
        c.put(2, b"k3", b"v3", FAIL_WITHIN)
    });
    fails_in_time("a linearizable read with two of three down", || {
        c.get(2, b"k2", FAIL_WITHIN)
    });
    // Its own copy still answers.
    assert_eq!(
        c.get_local(2, b"k2", OK_WITHIN).unwrap().as_deref(),
        Some(&b"v2"[..])
    );

    // Both back from their data dirs, on the same ports.
    let t = Instant::now();
    c.restart(0).unwrap();
    c.restart(1).unwrap();
    c.wait_all_healthy(OK_WITHIN).unwrap();
    println!("healthy again {:?} after the restarts", t.elapsed());
    eventually("a put after the restarts", OK_WITHIN, || {
        c.put(0, b"k3", b"v3", Duration::from_secs(2))
    });
    // Member 0 missed k2 while down and caught up.
    assert_eq!(
        c.get(0, b"k2", OK_WITHIN).unwrap().as_deref(),
        Some(&b"v2"[..])
    );
    assert!(c.log(0).contains("3.4") || c.log(0).contains("etcd"));

    let data = dir.path().join("m0.data");
    assert!(data.exists());
    drop(c);
    assert!(!data.exists(), "data dirs are removed on drop");
    assert!(dir.path().join("m0.log").exists(), "logs are kept");
}

/// The namespace names `ip netns list` shows.
fn netns_list() -> String {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn netns_cluster_survives_a_partitioned_site_and_heals() {
    let sites = match Sites::create(3) {
        Ok(s) => s,
        Err(e) => {
            println!("skipping: network namespaces unavailable ({e})");
            return;
        }
    };
    let names: Vec<String> = (0..3).map(|i| sites.ns(i).to_string()).collect();
    let bridge = sites.bridge().to_string();

    let dir = tempfile::tempdir().unwrap();
    let members = (0..3)
        .map(|i| MemberSpec::new(sites.ip(i), sites.launcher(i)))
        .collect();
    let t = Instant::now();
    let c = EtcdCluster::start(EtcdOpts::with_members(dir.path(), members)).unwrap();
    println!(
        "3 members in 3 sites healthy in {:?}: {:?}",
        t.elapsed(),
        c.endpoints()
    );
    c.put(0, b"before", b"1", OK_WITHIN).unwrap();
    assert_eq!(
        c.get(2, b"before", OK_WITHIN).unwrap().as_deref(),
        Some(&b"1"[..])
    );

    // Site 0 cut off: sites 1 and 2 are a quorum.
    sites.partition(0).unwrap();
    eventually(
        "a put through member 1 during the partition",
        OK_WITHIN,
        || c.put(1, b"during", b"2", Duration::from_secs(2)),
    );
    // Member 0 is unreachable from here and from the other sites, but its
    // own site still reaches it: a serializable read answers, a
    // linearizable one cannot.
    let addr = c.client_addr(0);
    let in_site0 = |body: serde_json::Value, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        let stream = sites
            .connect(0, addr, timeout)
            .map_err(|e| format!("connect in site 0: {e}"))?;
        let (status, answer) = etcd::http_on(
            stream,
            &addr.to_string(),
            "POST",
            "/v3/kv/range",
            Some(body.to_string().as_bytes()),
            deadline,
        )?;
        etcd::parse_answer(status, &answer, "/v3/kv/range").and_then(|v| etcd::range_value(&v))
    };
    let key = etcd::b64encode(b"before");
    assert_eq!(
        in_site0(
            serde_json::json!({"key": key, "serializable": true}),
            OK_WITHIN
        )
        .unwrap()
        .as_deref(),
        Some(&b"1"[..])
    );
    fails_in_time("a linearizable read in the partitioned site", || {
        in_site0(serde_json::json!({"key": key}), FAIL_WITHIN)
    });
    // And its own /health soon says so (no leader: etcd 3.4 answers 503
    // {"health":"false"}).
    eventually("member 0 unhealthy in its own site", OK_WITHIN, || {
        let stream = sites
            .connect(0, addr, FAIL_WITHIN)
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let (status, body) =
            etcd::http_on(stream, &addr.to_string(), "GET", "/health", None, deadline)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if status != 200 && body.contains(r#""health":"false""#) {
            println!("member 0's /health in its site: HTTP {status} {body}");
            Ok(())
        } else {
            Err(format!("HTTP {status} {body}"))
        }
    });
    fails_in_time("a put from here to the partitioned site", || {
        c.put(0, b"lost", b"3", FAIL_WITHIN)
    });

    sites.heal(0).unwrap();
    let t = Instant::now();
    c.wait_all_healthy(OK_WITHIN).unwrap();
    println!("all healthy {:?} after the heal", t.elapsed());
    assert_eq!(
        c.get(0, b"during", OK_WITHIN).unwrap().as_deref(),
        Some(&b"2"[..])
    );

    drop(c);
    drop(sites);
    let left = netns_list();
    for name in &names {
        assert!(!left.contains(name.as_str()), "{name} left behind: {left}");
    }
    let link = Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .unwrap();
    assert!(!link.status.success(), "bridge {bridge} left behind");
}

/// Whether a connection from `from` (a site, or None for the root
/// namespace) to `to` is accepted within the bound.
fn reaches(sites: &Sites, from: Option<usize>, to: std::net::SocketAddr) -> bool {
    let t = Duration::from_millis(700);
    match from {
        Some(i) => sites.connect(i, to, t).is_ok(),
        None => std::net::TcpStream::connect_timeout(&to, t).is_ok(),
    }
}

#[test]
fn sites_reach_each_other_and_the_root_until_partitioned() {
    let sites = match Sites::create(3) {
        Ok(s) => s,
        Err(e) => {
            println!("skipping: network namespaces unavailable ({e})");
            return;
        }
    };
    assert_eq!(sites.launcher(1), ["ip", "netns", "exec", sites.ns(1)]);
    assert!(sites.ip(2).starts_with("10.251.") && sites.ip(2).ends_with(".12"));
    // A listener in each site on its address, and one here on the bridge's.
    let listeners: Vec<std::net::TcpListener> = (0..3)
        .map(|i| {
            let ip = sites.ip(i).to_string();
            sites
                .in_ns(i, move || std::net::TcpListener::bind((ip.as_str(), 0)))
                .unwrap()
                .unwrap()
        })
        .collect();
    let root = std::net::TcpListener::bind((sites.bridge_ip(), 0)).unwrap();
    let addr: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let root_addr = root.local_addr().unwrap();

    for i in 0..3 {
        assert!(reaches(&sites, None, addr[i]), "root to site {i}");
        assert!(reaches(&sites, Some(i), root_addr), "site {i} to root");
        for (j, &to) in addr.iter().enumerate() {
            assert!(reaches(&sites, Some(i), to), "site {i} to site {j}");
        }
    }
    // Nothing leaks: a site has no route off the subnet.
    assert!(!reaches(&sites, Some(0), "192.0.2.1:80".parse().unwrap()));

    sites.partition(1).unwrap();
    assert!(sites.is_partitioned(1).unwrap());
    assert!(!reaches(&sites, None, addr[1]), "root to a cut site");
    assert!(!reaches(&sites, Some(0), addr[1]), "site 0 to a cut site");
    assert!(!reaches(&sites, Some(1), addr[2]), "a cut site to site 2");
    assert!(reaches(&sites, Some(1), addr[1]), "a cut site to itself");
    assert!(reaches(&sites, Some(0), addr[2]), "the others still meet");

    sites.heal(1).unwrap();
    assert!(!sites.is_partitioned(1).unwrap());
    let deadline = Instant::now() + OK_WITHIN;
    while !(reaches(&sites, Some(0), addr[1]) && reaches(&sites, Some(1), root_addr)) {
        assert!(
            Instant::now() < deadline,
            "site 1 unreachable after the heal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn leases_hold_keys_while_kept_alive_and_take_them_when_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let c = EtcdCluster::start(EtcdOpts::new(dir.path(), 3)).unwrap();
    let kept = c.grant(0, 1, OK_WITHIN).unwrap();
    let left = c.grant(1, 1, OK_WITHIN).unwrap();
    c.put_with_lease(0, b"/bm/kept", b"a", kept, OK_WITHIN)
        .unwrap();
    c.put_with_lease(1, b"/bm/left", b"b", left, OK_WITHIN)
        .unwrap();
    c.put(2, b"/bm0", b"outside the prefix", OK_WITHIN).unwrap();
    let kvs = c.list(2, b"/bm/", OK_WITHIN).unwrap();
    assert_eq!(
        kvs.iter()
            .map(|kv| (&kv.key[..], kv.lease))
            .collect::<Vec<_>>(),
        [(&b"/bm/kept"[..], kept), (&b"/bm/left"[..], left)]
    );
    assert!(c.time_to_live(2, left, OK_WITHIN).unwrap().is_some());

    // One lease renewed, the other left to run out.
    let t = Instant::now();
    let expired = loop {
        c.keep_alive_once(0, kept, OK_WITHIN).unwrap();
        let keys = c.list(1, b"/bm/", OK_WITHIN).unwrap();
        if keys.len() == 1 {
            break keys;
        }
        assert!(t.elapsed() < OK_WITHIN, "the lease never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("a 1 s lease expired after {:?}", t.elapsed());
    assert_eq!(expired[0].key, b"/bm/kept");
    assert_eq!(c.time_to_live(0, left, OK_WITHIN).unwrap(), None);
    assert!(c.keep_alive_once(0, left, OK_WITHIN).is_err());

    c.revoke(2, kept, OK_WITHIN).unwrap();
    assert!(c.list(0, b"/bm/", OK_WITHIN).unwrap().is_empty());
    assert_eq!(c.delete(0, b"/bm0", OK_WITHIN).unwrap(), 1);
    assert!(c.list(0, b"", OK_WITHIN).unwrap().is_empty());
}

#[test]
fn a_member_that_cannot_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = EtcdOpts::new(dir.path(), 1);
    opts.extra_args = vec!["--no-such-flag".into()];
    let err = EtcdCluster::start(opts).err().unwrap();
    assert!(err.contains("exited during start"), "{err}");
    assert!(err.contains("no-such-flag"), "the log tail is in: {err}");

    // A port taken under it: started over on new ports, and here (the
    // taken port is in the extra args, so every try) given up.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut opts = EtcdOpts::new(dir.path(), 1);
    opts.extra_args = vec![
        "--listen-metrics-urls".into(),
        format!("http://{}", held.local_addr().unwrap()),
    ];
    let err = EtcdCluster::start(opts).err().unwrap();
    assert!(err.contains("3 tries, ports taken each time"), "{err}");
}
