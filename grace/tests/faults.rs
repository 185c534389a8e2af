//! Bad input and faults: malformed requests, slow headers, panicking handlers.

mod common;

use std::time::Duration;

use common::{Client, app, start};

#[tokio::test]
async fn a_malformed_request_gets_400_and_disturbs_no_other_connection() {
    let mut srv = start(app(), |s| s).await;
    let mut good = Client::connect(srv.addr).await;
    good.send("/sleep/200").await;
    let mut bad = Client::connect(srv.addr).await;
    bad.write(b"GET / HTTP/1.1\r\nHost test\r\nthis is not a header\r\n\r\n")
        .await;
    assert_eq!(bad.read().await.unwrap().status, 400);
    assert!(bad.closed().await);
    assert_eq!(good.read().await.unwrap().status, 200);
    assert_eq!(good.get("/").await.unwrap().status, 200);
    srv.wait_counts(|c| c.total() == 1 && c.idle == 1).await;
    srv.handle.shutdown();
    srv.report(Duration::ZERO).await;
}

#[tokio::test]
async fn a_client_slow_with_its_headers_is_cut_by_the_header_timeout() {
    let mut srv = start(app(), |s| {
        s.timeouts(grace_http::Timeouts::default().header_read(Duration::from_millis(300)))
    })
    .await;
    let mut slow = Client::connect(srv.addr).await;
    slow.write(b"GET / HTTP/1.1\r\nHo").await;
    let mut silent = Client::connect(srv.addr).await;
    let mut busy = Client::connect(srv.addr).await;
    busy.send("/sleep/1000").await; // its head is complete: a slow handler is not cut
    assert!(slow.closed().await, "slow client was never cut");
    assert!(silent.closed().await, "silent client was never cut");
    assert_eq!(busy.read().await.unwrap().status, 200);
    let mut other = Client::connect(srv.addr).await;
    assert_eq!(other.get("/").await.unwrap().status, 200);
    srv.wait_counts(|c| c.total() == 2).await;
    srv.handle.shutdown();
    srv.report(Duration::ZERO).await;
}

#[tokio::test]
async fn a_panicking_handler_answers_500_and_counts_stay_right() {
    let mut srv = start(app(), |s| s).await;
    let mut c = Client::connect(srv.addr).await;
    let resp = c
        .get("/panic")
        .await
        .expect("no answer to a panicking handler");
    assert_eq!(resp.status, 500);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed().await);
    srv.wait_counts(|c| c.total() == 0).await;
    assert_eq!(
        srv.states_of(0).last(),
        Some(&grace_http::ConnState::Closed)
    );
    let mut after = Client::connect(srv.addr).await;
    assert_eq!(after.get("/").await.unwrap().status, 200);
    srv.handle.shutdown();
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean());
}

/// A service that panics in `call` itself (not in its future: a middleware's synchronous
/// part, outside any `Router`, whose routes call their services only when polled) is
/// answered 500 as well, and the counts stay right.
#[tokio::test]
async fn a_service_panicking_in_call_answers_500_and_counts_stay_right() {
    let boom = tower::service_fn(|req: http::Request<grace_http::RequestBody>| {
        assert_ne!(req.uri().path(), "/boom", "in call");
        std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"hello")),
        )))
    });
    let mut srv = start(boom, |s| s).await;
    let mut c = Client::connect(srv.addr).await;
    let resp = c.get("/boom").await.expect("no answer to a panic in call");
    assert_eq!(resp.status, 500);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed().await);
    srv.wait_counts(|c| c.total() == 0).await;
    let mut after = Client::connect(srv.addr).await;
    assert_eq!(after.get("/").await.unwrap().status, 200);
    srv.handle.shutdown();
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean());
}
