use super::*;
use blockmirror_repl::VolumeIdentity;
use blockmirror_storage::{FaultBackend, Faults, MemBackend};
use tokio::io::DuplexStream;

const SIZE: u64 = 1 << 20;

fn peer() -> PeerInfo {
    PeerInfo {
        node: "primary".into(),
        volume: VolumeIdentity {
            name: "vol".into(),
            volume_id: [1; 16],
            size: SIZE,
            generation: 1,
            history: [0; blockmirror_repl::HISTORY_LEN],
        },
        compression: blockmirror_repl::Codec::None,
        epoch: 0,
    }
}

struct Client {
    r: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
    w: FrameWriter<tokio::io::WriteHalf<DuplexStream>>,
}

impl Client {
    async fn send(&mut self, f: Frame) {
        self.w.send(&f).await.unwrap();
    }
    async fn next(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(10), self.r.next())
            .await
            .expect("a reply")
            .unwrap()
            .expect("open")
    }
}

fn start(
    capacity: usize,
    fetch_timeout: Duration,
    backend: Arc<dyn Backend>,
) -> (Arc<JobService>, Client) {
    let svc = Arc::new(JobService::new(
        7,
        capacity,
        fetch_timeout,
        [DeviceConstants {
            volume: "vol".into(),
            size: SIZE,
            backend,
        }],
    ));
    let (a, b) = tokio::io::duplex(1 << 20);
    tokio::spawn(
        svc.clone()
            .serve(b, peer(), "vol", CancellationToken::new()),
    );
    let (r, w) = tokio::io::split(a);
    (
        svc,
        Client {
            r: FrameReader::new(r),
            w: FrameWriter::new(w),
        },
    )
}

fn data() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[tokio::test]
async fn hashes_open_a_job_and_match_the_data() {
    let backend = Arc::new(MemBackend::from_vec("vol", data()));
    let (svc, mut c) = start(4, DEFAULT_FETCH_TIMEOUT, backend);
    c.send(Frame::JobHash {
        id: 1,
        link: 0,
        offset: 8192,
        len: 3 * 4096 + 100,
        block: 4096,
    })
    .await;
    let Frame::JobHashes {
        id, link, digests, ..
    } = c.next().await
    else {
        panic!("not hashes")
    };
    assert_eq!(id, 1);
    assert!(!LinkId::from_u64(link).is_invalid());
    let d = data();
    assert_eq!(digests, hash_blocks(&d[8192..8192 + 3 * 4096 + 100], 4096));
    assert_eq!(svc.jobs_of("vol"), 1);
    // The same job reads; past the end is refused without ending it.
    c.send(Frame::JobRead {
        id: 2,
        link,
        offset: SIZE - 4096,
        len: 8192,
    })
    .await;
    assert!(matches!(
        c.next().await,
        Frame::JobError {
            id: 2,
            code: JobErrorCode::OutOfRange,
            ..
        }
    ));
    c.send(Frame::JobClose { id: 3, link }).await;
    assert_eq!(c.next().await, Frame::JobClosed { id: 3, link });
    assert_eq!(svc.live_jobs(), 0);
    // A closed job's link id is refused.
    c.send(Frame::JobRead {
        id: 4,
        link,
        offset: 0,
        len: 4096,
    })
    .await;
    assert!(matches!(
        c.next().await,
        Frame::JobError {
            id: 4,
            code: JobErrorCode::UnknownLink,
            ..
        }
    ));
}

#[tokio::test]
async fn a_full_table_answers_busy_at_once_and_a_closed_slot_is_reused() {
    let backend = Arc::new(MemBackend::new("vol", SIZE));
    let (svc, mut c) = start(3, DEFAULT_FETCH_TIMEOUT, backend);
    let mut links = Vec::new();
    for id in 0..4u64 {
        c.send(Frame::JobHash {
            id,
            link: 0,
            offset: 0,
            len: 4096,
            block: 4096,
        })
        .await;
        match c.next().await {
            Frame::JobHashes { link, .. } => links.push(link),
            Frame::JobError {
                id: 3,
                code: JobErrorCode::Busy,
                link: 0,
                ..
            } => {}
            f => panic!("{f:?}"),
        }
    }
    assert_eq!(links.len(), 3);
    assert_eq!(svc.counters.busy.load(Relaxed), 1);
    c.send(Frame::JobClose {
        id: 9,
        link: links[1],
    })
    .await;
    assert!(matches!(c.next().await, Frame::JobClosed { .. }));
    c.send(Frame::JobHash {
        id: 10,
        link: 0,
        offset: 0,
        len: 4096,
        block: 4096,
    })
    .await;
    let Frame::JobHashes { link, .. } = c.next().await else {
        panic!()
    };
    assert_eq!(LinkId::from_u64(link).slot, LinkId::from_u64(links[1]).slot);
    assert_ne!(link, links[1], "a slot's new job has a new link id");
    // The connection ends: its jobs are closed.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while svc.live_jobs() != 0 {
        assert!(Instant::now() < deadline, "jobs not closed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_slow_read_answers_not_ready_then_pushes_the_data_without_blocking_others() {
    let fault = Arc::new(FaultBackend::new(
        MemBackend::from_vec("vol", data()),
        Faults::default(),
    ));
    fault.set_read_latency(Some(Duration::from_millis(300)));
    let (svc, mut c) = start(4, DEFAULT_FETCH_TIMEOUT, fault.clone());
    c.send(Frame::JobRead {
        id: 1,
        link: 0,
        offset: 4096,
        len: 4096,
    })
    .await;
    let Frame::JobNotReady {
        id: 1,
        link,
        retry_after_ms,
        ..
    } = c.next().await
    else {
        panic!("expected not ready")
    };
    assert_eq!(retry_after_ms, RETRY_HINT_MS);
    // While the slow read runs, a close of another (unknown) job is
    // answered: the connection is not blocked.
    c.send(Frame::JobClose { id: 2, link: 12345 }).await;
    assert!(matches!(
        c.next().await,
        Frame::JobError {
            id: 2,
            code: JobErrorCode::UnknownLink,
            ..
        }
    ));
    let Frame::JobData {
        id: 1,
        link: l2,
        data: got,
        ..
    } = c.next().await
    else {
        panic!("expected data")
    };
    assert_eq!(l2, link);
    assert_eq!(&got[..], &data()[4096..8192]);
    assert_eq!(svc.counters.not_ready.load(Relaxed), 1);
}

/// An idle connection is closed after the idle timeout and its jobs
/// leave the table; any frame (a Ping too) counts as activity. The
/// clock is tokio's paused one: it jumps to the next timer whenever
/// every task waits, so nothing here sleeps in real time.
#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_closed_and_its_jobs_freed() {
    let idle = Duration::from_secs(60);
    let backend = Arc::new(MemBackend::new("vol", SIZE));
    let svc = Arc::new(
        JobService::new(
            7,
            4,
            DEFAULT_FETCH_TIMEOUT,
            [DeviceConstants {
                volume: "vol".into(),
                size: SIZE,
                backend,
            }],
        )
        .with_idle_timeout(idle),
    );
    let (a, b) = tokio::io::duplex(1 << 20);
    let served = tokio::spawn(
        svc.clone()
            .serve(b, peer(), "vol", CancellationToken::new()),
    );
    let (r, w) = tokio::io::split(a);
    let mut c = Client {
        r: FrameReader::new(r),
        w: FrameWriter::new(w),
    };
    let start = tokio::time::Instant::now();
    c.send(Frame::JobHash {
        id: 1,
        link: 0,
        offset: 0,
        len: 4096,
        block: 4096,
    })
    .await;
    assert!(matches!(c.next().await, Frame::JobHashes { id: 1, .. }));
    assert_eq!(svc.live_jobs(), 1);
    // Just short of the timeout, a ping: the connection lives on.
    tokio::time::advance(idle - Duration::from_secs(1)).await;
    c.send(Frame::Ping { id: 2 }).await;
    assert_eq!(c.next().await, Frame::Pong { id: 2 });
    let pinged = tokio::time::Instant::now();
    assert_eq!(svc.live_jobs(), 1);
    assert_eq!(svc.counters.idle_closed.load(Relaxed), 0);
    // Then nothing: the mirror closes the connection (end of stream
    // here) once the timeout has passed since the ping.
    let end = tokio::time::timeout(Duration::from_secs(3600), c.r.next())
        .await
        .expect("closed within the hour");
    assert!(matches!(end, Ok(None)), "{end:?}");
    served.await.unwrap();
    assert!(
        pinged.elapsed() >= idle,
        "closed after {:?}",
        pinged.elapsed()
    );
    assert!(start.elapsed() < 2 * idle + Duration::from_secs(1));
    assert_eq!(svc.live_jobs(), 0, "the idle connection's job is freed");
    assert_eq!(svc.counters.idle_closed.load(Relaxed), 1);
}

#[tokio::test]
async fn a_fetch_past_the_timeout_ends_the_job_with_its_own_error() {
    let fault = Arc::new(FaultBackend::new(
        MemBackend::new("vol", SIZE),
        Faults::default(),
    ));
    fault.set_read_latency(Some(Duration::from_millis(500)));
    let (svc, mut c) = start(4, Duration::from_millis(100), fault);
    c.send(Frame::JobRead {
        id: 1,
        link: 0,
        offset: 0,
        len: 4096,
    })
    .await;
    assert!(matches!(c.next().await, Frame::JobNotReady { id: 1, .. }));
    match c.next().await {
        Frame::JobError {
            id: 1,
            code: JobErrorCode::Timeout,
            message,
            ..
        } => assert!(message.contains("ended"), "{message}"),
        f => panic!("{f:?}"),
    }
    assert_eq!(svc.live_jobs(), 0, "the timed-out job ended");
    assert_eq!(svc.counters.timeouts.load(Relaxed), 1);
}
