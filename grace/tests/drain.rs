//! The drain, through real sockets: stop accepting, keep-alive off, idle and silent
//! connections closed at once, the deadline, forcing, and the report.

mod common;

use std::time::{Duration, Instant};

use common::{Client, SOON, app, start};
use grace_http::{ConnState, ForceReason, Trigger};
use tokio::net::TcpStream;

#[tokio::test]
async fn drain_closes_the_listener_at_once() {
    let mut srv = start(app(), |s| s).await;
    let mut busy = Client::connect(srv.addr).await;
    busy.send("/sleep/500").await; // keeps the drain going
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = TcpStream::connect(srv.addr)
        .await
        .expect_err("a new connection was accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(busy.read().await.unwrap().status, 200);
    srv.report(Duration::ZERO).await;
}

#[tokio::test]
async fn in_flight_response_carries_connection_close_and_the_connection_closes() {
    let mut srv = start(app(), |s| s).await;
    let mut c = Client::connect(srv.addr).await;
    assert_eq!(
        c.get("/").await.unwrap().header("connection"),
        None,
        "keep-alive before the drain"
    );
    c.send("/sleep/300").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    let resp = c.read().await.expect("in-flight request was cut");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, "slept 300");
    assert_eq!(resp.header("connection"), Some("close"));
    // No second request is served on it.
    c.send("/").await;
    assert!(
        c.read().await.is_none(),
        "a second request was served during the drain"
    );
    let report = srv.report(Duration::ZERO).await;
    assert_eq!(report.requests_completed, 1);
    assert!(report.is_clean());
    assert_eq!(report.at_start.active, 1);
    assert_eq!(report.at_start.idle, 0);
}

#[tokio::test]
async fn idle_and_silent_connections_close_at_once_without_waiting_for_the_deadline() {
    let mut srv = start(app(), |s| {
        s.drain_policy(
            grace_http::DrainPolicy::default()
                .shutdown_timeout(Duration::from_secs(60))
                .new_connection_grace(Duration::from_millis(100)),
        )
    })
    .await;
    let mut idle = Client::connect(srv.addr).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    let mut silent = Client::connect(srv.addr).await;
    srv.wait_counts(|c| c.idle == 1 && c.new == 1).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // past the first-byte grace
    let t = Instant::now();
    srv.handle.shutdown();
    assert!(idle.closed().await, "idle connection was not closed");
    assert!(
        silent.closed().await,
        "silent new connection was not closed"
    );
    let report = srv.report(Duration::ZERO).await;
    // Far below the 60 s deadline: the drain ended when the last connection did.
    assert!(t.elapsed() < SOON, "drain took {:?}", t.elapsed());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!((report.at_start.idle, report.at_start.new), (1, 1));
}

#[tokio::test]
async fn a_request_arriving_just_after_accept_is_still_served() {
    // A client that connected a moment before the drain and is about to send.
    let mut srv = start(app(), |s| {
        s.drain_policy(
            grace_http::DrainPolicy::default().new_connection_grace(Duration::from_secs(2)),
        )
    })
    .await;
    let mut c = Client::connect(srv.addr).await;
    srv.wait_counts(|c| c.new == 1).await;
    srv.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let resp = c
        .get("/")
        .await
        .expect("request sent in good faith was dropped");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert!(srv.report(Duration::ZERO).await.is_clean());
}

#[tokio::test]
async fn deadline_forces_every_state_and_the_report_says_what_was_cut() {
    let deadline = Duration::from_millis(500);
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(deadline))
            .record_requests(true)
    })
    .await;
    // A slow request.
    let mut slow = Client::connect(srv.addr).await;
    slow.send("/sleep/60000").await;
    // A client stuck half-way through its headers.
    let mut stuck = Client::connect(srv.addr).await;
    stuck.write(b"GET /sleep/1 HTTP/1.1\r\nHost: te").await;
    srv.wait_counts(|c| c.active == 2).await;

    let t = Instant::now();
    srv.handle.shutdown();
    assert!(slow.closed().await && stuck.closed().await);
    let report = srv.report(deadline).await;
    let took = t.elapsed();
    assert!(took >= deadline, "forced before the deadline: {took:?}");
    assert!(
        took < deadline + SOON,
        "forced long after the deadline: {took:?}"
    );
    assert_eq!(report.forced_by, Some(ForceReason::Deadline));
    // The half-sent head was closed by the drain after the first-byte grace (see
    // `a_half_sent_request_head_does_not_hold_the_drain`); only the slow request is forced.
    assert_eq!(report.forced.len(), 1, "{report:?}");
    assert!(report.forced.iter().all(|f| f.state == ConnState::Active));
    let with_request: Vec<_> = report
        .forced
        .iter()
        .filter_map(|f| f.request.as_ref())
        .collect();
    assert_eq!(
        with_request.len(),
        1,
        "the slow one had a request in progress"
    );
    assert_eq!(
        (
            with_request[0].method.as_str(),
            with_request[0].path.as_str()
        ),
        ("GET", "/sleep/60000")
    );
    assert!(
        report
            .forced
            .iter()
            .all(|f| f.peer.as_tcp().is_some() && f.age >= deadline)
    );
    assert!(!report.is_clean());
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["forced_by"], "deadline");
    assert_eq!(json["forced"][0]["state"], "active");
    assert!(
        json["phases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "force")
    );
}

/// Requests are recorded only when asked for (`Server::record_requests`): by default a
/// forced connection is reported with its peer, state and age, and no request.
#[tokio::test]
async fn without_record_requests_a_forced_connection_has_no_request() {
    let deadline = Duration::from_millis(300);
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(deadline))
    })
    .await;
    let mut slow = Client::connect(srv.addr).await;
    slow.send("/sleep/60000").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    let report = srv.report(deadline).await;
    assert_eq!(report.forced.len(), 1, "{report:?}");
    assert_eq!(report.forced[0].state, ConnState::Active);
    assert!(report.forced[0].request.is_none(), "{report:?}");
}

#[tokio::test]
async fn force_from_the_handle_cuts_at_once() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(60)))
    })
    .await;
    let mut slow = Client::connect(srv.addr).await;
    slow.send("/sleep/60000").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.handle.force();
    assert!(slow.closed().await);
    let report = srv.report(Duration::ZERO).await;
    assert_eq!(report.trigger, Trigger::Handle);
    assert_eq!(report.forced_by, Some(ForceReason::Handle));
    assert_eq!(report.forced.len(), 1);
}

#[tokio::test]
async fn streaming_responses_finish_during_the_drain() {
    use axum::routing::get;
    let stream = get(|| async {
        let chunks = futures_util::stream::iter(0..3).then(|i| async move {
            // The first chunk goes out at once: the drain starts mid-body.
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            Ok::<_, std::convert::Infallible>(format!("chunk{i};"))
        });
        axum::body::Body::from_stream(chunks)
    });
    use futures_util::StreamExt;
    let mut srv = start(axum::Router::new().route("/stream", stream), |s| s).await;
    let mut c = Client::connect(srv.addr).await;
    c.send("/stream").await;
    srv.wait_counts(|c| c.active == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.handle.shutdown();
    let resp = c.read().await.unwrap();
    assert_eq!(resp.body, "chunk0;chunk1;chunk2;");
    assert!(srv.report(Duration::ZERO).await.is_clean());
}

/// grace-check's slowloris scenario: a client in the middle of sending its request head
/// when the drain starts (a byte every 100 ms) gets the first-byte grace to finish it, then
/// its socket is shut: it holds the drain neither to the header-read timeout nor to the
/// deadline, and nothing is reported forced.
#[tokio::test]
async fn a_half_sent_request_head_does_not_hold_the_drain() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(30)))
            .timeouts(grace_http::Timeouts::default().header_read(Duration::from_secs(30)))
    })
    .await;
    let mut slow = Client::connect(srv.addr).await;
    slow.write(b"GET / HTTP/1.1\r\nHost: t\r\n").await;
    srv.wait_counts(|c| c.active == 1).await;
    let t = std::time::Instant::now();
    srv.handle.shutdown();
    let dribble = async {
        for b in b"X-Slow: yes\r\n".iter() {
            if tokio::io::AsyncWriteExt::write_all(slow.io.get_mut(), &[*b])
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let report = tokio::join!(srv.report(Duration::ZERO), dribble).0;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the drain took {:?}",
        t.elapsed()
    );
    assert!(report.is_clean(), "{}", report.to_json());
    assert!(
        slow.closed().await,
        "the half-sent request's connection stayed open"
    );
}

/// The report counts every connection the drain closed, those shut from the drain's own
/// loop included — not only those whose tasks happened to have unwound when the report was
/// written — and none as handed over outside an upgrade.
#[tokio::test]
async fn the_report_counts_the_connections_it_closed() {
    let mut srv = start(app(), |s| s).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut c = Client::connect(srv.addr).await;
        assert_eq!(c.get("/").await.unwrap().status, 200);
        idle.push(c);
    }
    srv.wait_counts(|c| c.idle == 300).await;
    srv.handle.shutdown();
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert_eq!(report.closed, 300, "{}", report.to_json());
    assert_eq!(report.handed_over, 0);
    // The phases tile the stop: closing the idle connections is in the drain phase, not
    // between phases, and nothing goes unaccounted.
    let phases: Duration = report.phases.iter().map(|p| p.took).sum();
    assert_eq!(phases, report.total, "{}", report.to_json());
    assert!(
        report
            .phases
            .iter()
            .any(|p| p.phase == grace_http::Phase::Drain),
        "{}",
        report.to_json()
    );
    for c in &mut idle {
        assert!(c.closed().await, "an idle connection was left open");
    }
}

/// With thousands of connections the drain shuts idle sockets, and the deadline forces
/// busy ones, from several threads at once (`conn/fanout.rs`): every one of them is still
/// closed, counted once and, when forced, reported once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_are_all_closed_or_forced_and_reported_once() {
    const EACH: usize = 2_100; // idle and busy: 4,200 in all, above the threaded size
    let needed = 4 * EACH as u64 + 256; // both ends of each connection, and some room
    let limit = grace_testkit::process::raise_nofile();
    if limit < needed {
        eprintln!("SKIPPED: RLIMIT_NOFILE's hard limit {limit} is below {needed}");
        return;
    }

    let deadline = Duration::from_secs(2);
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(deadline))
    })
    .await;
    let mut idle = Vec::with_capacity(EACH);
    let mut busy = Vec::with_capacity(EACH);
    for _ in 0..EACH {
        let mut c = Client::connect(srv.addr).await;
        assert_eq!(c.get("/").await.unwrap().status, 200);
        idle.push(c);
        let mut c = Client::connect(srv.addr).await;
        c.send("/sleep/60000").await;
        busy.push(c);
    }
    srv.wait_counts(|c| c.idle == EACH && c.active == EACH)
        .await;
    srv.handle.shutdown();
    for c in &mut idle {
        assert!(c.closed().await, "an idle connection was left open");
    }
    let report = srv.report(deadline).await;
    for c in &mut busy {
        assert!(c.closed().await, "a busy connection was left open");
    }
    assert_eq!(report.forced_by, Some(ForceReason::Deadline));
    assert_eq!(report.forced.len(), EACH, "{:?}", report.at_start);
    assert!(report.forced.iter().all(|f| f.state == ConnState::Active));
    let mut ids: Vec<u64> = report.forced.iter().map(|f| f.id).collect();
    assert!(ids.is_sorted(), "forced connections not in id order");
    ids.dedup();
    assert_eq!(ids.len(), EACH, "a forced connection reported twice");
    // `closed` counts those the drain closed; the forced are in `forced`.
    assert_eq!(report.closed, EACH as u64);
    assert_eq!((report.at_start.idle, report.at_start.active), (EACH, EACH));
}

/// The tasks of the connections the drain closed wait for the stop to be over before they
/// unwind, so that they do not compete with the jobs and resources for the CPU (and a
/// process that exits after the report never runs them); then they end. Their sockets are
/// closed at once, where they stand (the clients see the end, and the kernel frees them
/// then, not as the process exits), and they are `Closed` for the counts and the hook at
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_drain_closed_unwind_once_the_stop_is_over() {
    const N: usize = 50;
    let mut srv = start(app(), |s| s).await;
    // The server's sockets still held by a descriptor: on its port, with an inode (a
    // closed socket lingering in FIN_WAIT or TIME_WAIT has none). Other tests' sockets,
    // in this process too, are not counted.
    let port = format!(":{:04X} ", srv.addr.port());
    let open_fds = move || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        table
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 9 && format!("{} ", fields[1]).ends_with(&port) && fields[9] != "0"
            })
            .count()
    };
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen2 = std::sync::Arc::clone(&seen);
    let states = std::sync::Arc::clone(&srv.states);
    let open_fds2 = open_fds.clone();
    srv.handle
        .add_resource(grace_http::Resource::new("probe", move || async move {
            // Time enough for tasks that were not waiting to unwind.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let closed = states
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, s)| *s == ConnState::Closed)
                .count();
            *seen2.lock().unwrap() = Some((open_fds2(), closed, alive()));
            Ok::<_, std::io::Error>(())
        }));
    let mut idle = Vec::new();
    for _ in 0..N {
        let mut c = Client::connect(srv.addr).await;
        assert_eq!(c.get("/").await.unwrap().status, 200);
        idle.push(c);
    }
    srv.wait_counts(|c| c.idle == N).await;
    srv.handle.shutdown();
    for c in &mut idle {
        assert!(c.closed().await, "an idle connection was left open");
    }
    let report = srv.report(Duration::ZERO).await;
    assert_eq!(report.closed, N as u64);
    let (fds_then, closed_then, alive_then) = seen.lock().unwrap().expect("the probe ran");
    assert_eq!(
        closed_then, N,
        "the hook saw them Closed when the drain closed them"
    );
    assert_eq!(
        fds_then, 0,
        "sockets the drain closed still held by a descriptor during the resources' close"
    );
    assert!(
        alive_then >= N,
        "{alive_then} tasks alive during the resources' close: those of the {N} closed \
         connections had unwound already"
    );
    // Once the stop is over, every task unwinds.
    let t = Instant::now();
    while alive() > alive_then - N {
        assert!(
            t.elapsed() < SOON,
            "{alive_then} tasks alive during the resources' close, {} now: the closed \
             connections' tasks never ended",
            alive()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(srv.handle.counts().total(), 0);
}
