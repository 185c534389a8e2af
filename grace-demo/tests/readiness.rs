//! Readiness for load balancers, through a real `grace-demo` and real signals: `/readyz`
//! answers 503 from the moment the drain is asked for, `/healthz` stays 200, in-flight
//! requests finish, and during `--pre-stop-delay` new connections are still accepted and
//! served before the listener closes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;

const DELAY: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_first_and_the_pre_stop_delay_keeps_serving() {
    let dir = TempDir::new();
    let db = format!("sqlite://{}?mode=rwc", dir.path("ledger.db").display());
    let demo = Demo::start(
        &dir,
        &[
            "--db".into(),
            db,
            "--pre-stop-delay".into(),
            format!("{}ms", DELAY.as_millis()),
            "--shutdown-timeout".into(),
            "20s".into(),
        ],
    )
    .await;
    let addr = demo.addr;
    assert_eq!(
        call(addr, "GET", "/readyz", None).await.unwrap().status,
        200
    );
    assert_eq!(
        call(addr, "GET", "/healthz", None).await.unwrap().status,
        200
    );
    for body in [r#"{"id":"a","balance":100}"#, r#"{"id":"b","balance":0}"#] {
        let r = call(addr, "POST", "/accounts", Some(body)).await.unwrap();
        assert_eq!(r.status, 201, "{body}: {}", r.body);
    }

    // A request in flight across the whole delay and beyond the listener's close.
    let in_flight_ms = DELAY.as_millis() as u64 + 1_500;
    let mut slow = Http::connect(addr).await.unwrap();
    slow.send("GET", &format!("/sleep/{in_flight_ms}"), None)
        .await
        .unwrap();
    let in_flight = tokio::spawn(async move { slow.read().await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    demo.signal(Signal::TERM);

    // Readiness turns 503 as soon as the signal is handled, while the listener is open.
    let first_503 = loop {
        let r = call(addr, "GET", "/readyz", None)
            .await
            .expect("listener closed before readiness failed");
        if r.status == 503 {
            break signalled.elapsed();
        }
        assert_eq!(r.status, 200);
        assert!(signalled.elapsed() < DELAY, "readiness never turned 503");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("readiness 503 after {first_503:?}");
    assert!(
        first_503 < Duration::from_secs(1),
        "readiness took {first_503:?} to fail"
    );

    // During the delay: new connections are accepted and served, liveness stays 200,
    // readiness stays 503, and the ledger still takes transfers.
    let mut served_during_delay = 0;
    let mut last_served = signalled.elapsed();
    while signalled.elapsed() < DELAY - Duration::from_secs(1) {
        let r = call(addr, "GET", "/", None)
            .await
            .expect("refused during the delay");
        assert_eq!(r.status, 200);
        let r = call(addr, "GET", "/healthz", None).await.unwrap();
        assert_eq!(r.status, 200, "liveness must stay 200");
        let r = call(addr, "GET", "/readyz", None).await.unwrap();
        assert_eq!(r.status, 503, "readiness must stay 503");
        let t = r#"{"from":"a","to":"b","amount":1}"#;
        let r = call(addr, "POST", "/transfers", Some(t)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        served_during_delay += 1;
        last_served = signalled.elapsed();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served_during_delay >= 3,
        "only {served_during_delay} rounds served"
    );

    // Then the listener closes: new connections are refused.
    let refused_at = loop {
        match Http::connect(addr).await {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                break signalled.elapsed();
            }
            Ok(_) => {
                assert!(signalled.elapsed() < DELAY + SOON, "listener never closed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    println!(
        "served {served_during_delay} rounds until {last_served:?}, refused from {refused_at:?}"
    );
    assert!(
        refused_at >= DELAY - Duration::from_millis(100),
        "listener closed {refused_at:?} after the signal, before the {DELAY:?} delay ended"
    );

    // The request that was in flight at the signal still gets its whole answer.
    let r = tokio::time::timeout(SOON, in_flight)
        .await
        .expect("in-flight request hung")
        .unwrap()
        .expect("in-flight request was cut");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("slept {in_flight_ms} ms\n"));
    assert!(
        r.closes(),
        "the drained response must carry Connection: close"
    );

    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    let pre_stop = exit.report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "pre_stop")
        .unwrap_or_else(|| panic!("no pre_stop phase: {}", exit.report))["ms"]
        .as_f64()
        .unwrap();
    assert!(
        (DELAY.as_millis() as f64 - 50.0..DELAY.as_millis() as f64 + 2_000.0).contains(&pre_stop),
        "pre_stop took {pre_stop} ms"
    );
    assert!(exit.report["requests_completed"].as_u64() >= Some(1));
}

/// Issue 12: the soft drain. During the pre-stop delay (readiness failing, the listener
/// still accepting), a keep-alive client's next response carries `Connection: close`, so it
/// moves to another instance before the listener closes, while new connections are still
/// accepted and served.
#[tokio::test]
async fn during_the_pre_stop_delay_keep_alive_clients_are_told_to_reconnect() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &["--pre-stop-delay".into(), "3s".into()]).await;
    let mut kept = Http::connect(demo.addr).await.unwrap();
    let before = kept.request("GET", "/", None).await.unwrap();
    assert!(!before.closes(), "closed before any drain");
    demo.signal(Signal::TERM);
    // Readiness fails at once; the keep-alive connection's next answer says goodbye.
    let t = Instant::now();
    while call(demo.addr, "GET", "/readyz", None)
        .await
        .unwrap()
        .status
        != 503
    {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "readiness never failed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = kept.request("GET", "/", None).await.unwrap();
    assert_eq!(during.status, 200);
    assert!(
        during.closes(),
        "no Connection: close during the pre-stop delay"
    );
    // The listener still accepts: a fresh connection is served.
    assert_eq!(call(demo.addr, "GET", "/", None).await.unwrap().status, 200);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}
