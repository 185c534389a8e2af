//! Connection limits through real sockets: `max_connections` (new connections wait in the
//! kernel's accept queue, never refused), `max_connection_age` (HTTP/1 `Connection: close`,
//! HTTP/2 GOAWAY), and hyper's own settings through `configure_hyper`.

mod common;

use std::time::{Duration, Instant};

use common::{Client, SOON, app, start};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

#[tokio::test]
async fn at_max_connections_new_connections_wait_in_the_queue_and_are_served_in_turn() {
    let mut s = start(app(), |s| {
        s.limits(grace_http::Limits::default().max_connections(2))
    })
    .await;
    // Both busy (a request in flight each): they keep their places.
    let mut c1 = Client::connect(s.addr).await;
    let mut c2 = Client::connect(s.addr).await;
    c1.send("/sleep/1500").await;
    c2.send("/sleep/1500").await;
    s.wait_counts(|c| c.active == 2).await;

    // The third connects (the kernel completes the handshake) but is not accepted yet.
    let mut c3 = Client::connect(s.addr).await;
    c3.send("/").await;
    let waited = tokio::time::timeout(Duration::from_millis(400), c3.read()).await;
    assert!(waited.is_err(), "served over the limit: {waited:?}");
    assert_eq!(s.handle.counts().total(), 2);

    // One closes: the waiting one is accepted and served.
    assert_eq!(c1.read().await.unwrap().status, 200);
    let t = Instant::now();
    drop(c1);
    let resp = tokio::time::timeout(SOON, c3.read())
        .await
        .expect("never served")
        .expect("cut instead of served");
    assert_eq!(resp.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(s.handle.counts().total(), 2);

    drop((c2, c3));
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn a_drain_at_the_limit_does_not_wait_for_a_place() {
    let mut s = start(app(), |s| {
        s.limits(grace_http::Limits::default().max_connections(1))
    })
    .await;
    let mut c1 = Client::connect(s.addr).await;
    c1.send("/sleep/300").await;
    s.wait_counts(|c| c.active == 1).await;
    s.handle.shutdown();
    let resp = c1.read().await.unwrap();
    assert_eq!(resp.header("connection"), Some("close"));
    let report = s.report(Duration::from_secs(30)).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert!(TcpStream::connect(s.addr).await.is_err(), "still listening");
}

#[tokio::test]
async fn connections_past_max_connection_age_close_gracefully() {
    let age = Duration::from_millis(300);
    let mut s = start(app(), |s| {
        s.limits(grace_http::Limits::default().max_connection_age(age))
    })
    .await;

    // HTTP/1, idle at its age: closed.
    let t = Instant::now();
    let mut idle = Client::connect(s.addr).await;
    assert_eq!(idle.get("/").await.unwrap().status, 200);
    assert!(idle.closed().await, "an old idle connection stayed open");
    assert!(
        t.elapsed() >= age * 8 / 10,
        "closed too early: {:?}",
        t.elapsed()
    );

    // HTTP/1, busy at its age: the response completes with `Connection: close`.
    let mut busy = Client::connect(s.addr).await;
    busy.send("/sleep/600").await;
    let resp = busy.read().await.expect("the request was cut");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(busy.closed().await);

    // HTTP/2: GOAWAY; a stream open across the age finishes, then the connection ends.
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://test/sleep/600")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.expect("the stream was cut");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slept 600");
    tokio::time::timeout(SOON, conn)
        .await
        .expect("the old HTTP/2 connection stayed open")
        .unwrap()
        .unwrap();

    s.wait_counts(|c| c.total() == 0).await;
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn configure_hyper_reaches_hyper() {
    let mut s = start(app(), |s| {
        s.configure_hyper(|b| {
            b.http1().title_case_headers(true);
        })
    })
    .await;
    let mut c = Client::connect(s.addr).await;
    let resp = c.get("/").await.unwrap();
    assert!(
        resp.headers.iter().any(|(k, _)| k == "Content-Length"),
        "{:?}",
        resp.headers
    );
    drop(c);
    s.handle.shutdown();
    s.report(Duration::ZERO).await;
}

/// At the limit, a waiting client gets the place of the connection idle longest: it is
/// served at once, not at the idle timeout, and the more recent idle connection stays.
#[tokio::test]
async fn at_max_connections_the_connection_idle_longest_makes_room() {
    let mut s = start(app(), |s| {
        s.limits(grace_http::Limits::default().max_connections(2))
    })
    .await;
    let mut c1 = Client::connect(s.addr).await;
    assert_eq!(c1.get("/").await.unwrap().status, 200);
    let mut c2 = Client::connect(s.addr).await;
    assert_eq!(c2.get("/").await.unwrap().status, 200);
    s.wait_counts(|c| c.idle == 2).await;

    let t = Instant::now();
    let mut c3 = Client::connect(s.addr).await;
    let resp = tokio::time::timeout(SOON, c3.get("/"))
        .await
        .expect("the waiting client was not served")
        .expect("cut instead of served");
    assert_eq!(resp.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(c1.closed().await, "the connection idle longest stayed open");
    assert_eq!(
        c2.get("/").await.unwrap().status,
        200,
        "the recent one was closed"
    );

    drop((c2, c3));
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

/// At the limit, connections that have sent nothing within the first-byte grace make room;
/// one whose request has begun (part of its head read) keeps its place and is served.
#[tokio::test]
async fn at_max_connections_silent_connections_make_room_and_begun_requests_stay() {
    let grace = Duration::from_millis(200);
    let mut s = start(app(), |s| {
        s.limits(grace_http::Limits::default().max_connections(2))
            .drain_policy(grace_http::DrainPolicy::default().new_connection_grace(grace))
    })
    .await;
    let mut begun = Client::connect(s.addr).await;
    begun.write(b"GET / HT").await;
    s.wait_counts(|c| c.active == 1).await;
    let mut silent = Client::connect(s.addr).await;
    s.wait_counts(|c| c.new == 1).await;

    let t = Instant::now();
    let mut waiting = Client::connect(s.addr).await;
    let resp = tokio::time::timeout(SOON, waiting.get("/"))
        .await
        .expect("the waiting client was not served")
        .expect("cut instead of served");
    assert_eq!(resp.status, 200);
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(silent.closed().await, "the silent connection stayed open");

    begun.write(b"TP/1.1\r\nHost: x\r\n\r\n").await;
    let resp = begun.read().await.expect("a begun request was cut");
    assert_eq!(resp.status, 200);

    drop((begun, waiting));
    s.handle.shutdown();
    let report = s.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}
