//! `--max-connections`, `--max-connection-age` and `--request-body-timeout` on a real
//! `grace-demo` process.

mod common;

use std::time::Duration;

use common::{Demo, Http, SOON, TempDir};
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn max_connections_queues_new_connections_instead_of_refusing_them() {
    let dir = TempDir::new();
    let args = ["--max-connections", "1"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    // The first is busy (a request in flight): it keeps its place.
    let mut first = Http::connect(demo.addr).await.unwrap();
    first.send("GET", "/sleep/1500", None).await.unwrap();

    let mut second = Http::connect(demo.addr)
        .await
        .expect("refused at the limit");
    second.send("GET", "/", None).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(400), second.read()).await;
    assert!(early.is_err(), "served over the limit");
    assert_eq!(first.read().await.unwrap().status, 200);
    drop(first);
    let resp = tokio::time::timeout(SOON, second.read())
        .await
        .expect("never served")
        .unwrap();
    assert_eq!(resp.status, 200);
    drop(second);

    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(
        exit.stderr.contains("max_connections reached"),
        "{}",
        exit.stderr
    );
}

#[tokio::test]
async fn max_connection_age_closes_old_keep_alive_connections() {
    let dir = TempDir::new();
    let args = ["--max-connection-age", "300ms"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/500", None).await.unwrap();
    let resp = c.read().await.expect("cut at its age");
    assert_eq!(resp.status, 200);
    assert!(resp.closes(), "{:?}", resp.headers);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}

/// A body dribbled below the minimum rate (a byte every 100 ms) is answered
/// `408 Request Timeout` once `--request-body-timeout` passes, and its connection closes;
/// a body sent in two pieces at a normal pace on the same server is served.
#[tokio::test]
async fn a_dribbled_body_is_answered_408_and_its_connection_closes() {
    let dir = TempDir::new();
    let args = ["--request-body-timeout", "1s"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let head = |len: usize| {
        format!(
            "POST /accounts HTTP/1.1\r\nHost: grace\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n"
        )
    };

    let mut ok = Http::connect(demo.addr).await.unwrap();
    let body = r#"{"id":"paced","balance":5}"#;
    let (first, rest) = body.split_at(10);
    let io = ok.raw().get_mut();
    io.write_all(format!("{}{first}", head(body.len())).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    io.write_all(rest.as_bytes()).await.unwrap();
    let resp = ok.read().await.expect("a paced body was cut");
    assert_eq!(resp.status, 201, "{}", resp.body);

    let mut slow = Http::connect(demo.addr).await.unwrap();
    slow.raw()
        .get_mut()
        .write_all(format!("{}{{", head(1000)).as_bytes())
        .await
        .unwrap();
    let t = std::time::Instant::now();
    // A byte at a time until the answer is there (or the server stops taking bytes).
    loop {
        assert!(t.elapsed() < SOON, "the dribbled body held its connection");
        if slow.raw().get_mut().write_all(b" ").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        let peek = slow.raw().get_ref().peek(&mut probe);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1), peek).await {
            break;
        }
    }
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "cut before the timeout"
    );
    let resp = slow.read().await.expect("the cut body got no answer");
    assert_eq!(resp.status, 408, "{}", resp.body);
    assert!(resp.body.contains("not received in time"), "{}", resp.body);
    let mut rest = Vec::new();
    let eof = tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(slow.raw(), &mut rest),
    )
    .await
    .expect("the connection stayed open after a cut body");
    assert!(eof.is_err() || rest.is_empty(), "{rest:?}");

    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}

/// `--max-connections 50` and `n` more connections waiting: how long an honest `GET /`
/// (connected after them all) waits for its answer.
async fn honest_get(demo: &Demo) -> Duration {
    let t = std::time::Instant::now();
    let mut honest = Http::connect(demo.addr).await.expect("connect");
    honest.send("GET", "/", None).await.unwrap();
    let resp = tokio::time::timeout(HONEST_BOUND, honest.read())
        .await
        .unwrap_or_else(|_| panic!("the honest request waited more than {HONEST_BOUND:?}"))
        .expect("the honest request was cut");
    assert_eq!(resp.status, 200);
    t.elapsed()
}

/// How long an honest client may wait at the limit, on a loaded machine (it waited 45 s
/// behind 1,000 silent connections, and the idle timeout, 75 s, behind 50 idle ones).
const HONEST_BOUND: Duration = Duration::from_secs(8);

/// Issue 20, item 6 (a): 1,000 connections that never send a byte do not keep an honest
/// client out: at the limit, silent connections past the first-byte grace are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_at_max_connections_give_way_to_an_honest_client() {
    let dir = TempDir::new();
    let args = ["--max-connections", "50"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut silent = Vec::new();
    for _ in 0..1_000 {
        silent.push(tokio::net::TcpStream::connect(demo.addr).await.unwrap());
    }
    let waited = honest_get(&demo).await;
    println!("honest GET behind 1,000 silent connections: {waited:?}");
    drop(silent);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}

/// Issue 20, item 6 (b): 50 idle keep-alive connections (each served one request) do not
/// keep an honest client waiting for the idle timeout: the one idle longest is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_at_max_connections_give_way_to_an_honest_client() {
    let dir = TempDir::new();
    let args = ["--max-connections", "50"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut c = Http::connect(demo.addr).await.unwrap();
        let resp = c.request("GET", "/", None).await.unwrap();
        assert_eq!(resp.status, 200);
        idle.push(c);
    }
    let waited = honest_get(&demo).await;
    println!("honest GET behind 50 idle connections: {waited:?}");
    // The one idle longest made room; the others are still open.
    let mut first = idle.remove(0);
    let mut byte = [0u8; 1];
    let eof = tokio::time::timeout(SOON, first.raw().read(&mut byte)).await;
    assert!(
        matches!(eof, Ok(Ok(0) | Err(_))),
        "the longest idle connection was not the one closed: {eof:?}"
    );
    let last = idle.last_mut().unwrap();
    let resp = last
        .request("GET", "/", None)
        .await
        .expect("a recent one was closed");
    assert_eq!(resp.status, 200);
    drop(idle);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}

/// Issue 20, item 6 (c): a connection with a request in flight is never closed to make
/// room: 50 slow requests at the limit all complete, and the honest client is served once
/// one of them has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_at_max_connections_are_never_cut() {
    let dir = TempDir::new();
    let args = ["--max-connections", "50"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut busy = Vec::new();
    for _ in 0..50 {
        let mut c = Http::connect(demo.addr).await.unwrap();
        c.send("GET", "/sleep/3000", None).await.unwrap();
        busy.push(c);
    }
    let t = std::time::Instant::now();
    let mut honest = Http::connect(demo.addr).await.unwrap();
    honest.send("GET", "/", None).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1_500), honest.read()).await;
    assert!(early.is_err(), "served over the limit: {early:?}");
    for (i, c) in busy.iter_mut().enumerate() {
        let resp = tokio::time::timeout(SOON, c.read())
            .await
            .unwrap_or_else(|_| panic!("slow request {i} never answered"))
            .unwrap_or_else(|e| panic!("slow request {i} was cut: {e}"));
        assert_eq!(resp.status, 200, "slow request {i}");
    }
    let resp = tokio::time::timeout(SOON, honest.read())
        .await
        .expect("the honest request was never served")
        .unwrap();
    assert_eq!(resp.status, 200);
    println!("honest GET behind 50 slow requests: {:?}", t.elapsed());
    drop((busy, honest));
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}
