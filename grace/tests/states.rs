//! Connection states as the hook and the handle see them, over HTTP/1, HTTP/2 and WebSocket.

mod common;

use std::time::Duration;

use common::{Client, SOON, app, start};
use futures_util::{SinkExt, StreamExt};
use grace_http::{ConnState::*, ShutdownNotice};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

#[tokio::test]
async fn http1_keep_alive_goes_new_active_idle_and_closed() {
    let mut srv = start(app(), |s| s).await;
    let mut c = Client::connect(srv.addr).await;
    srv.wait_counts(|c| c.new == 1).await;
    assert_eq!(c.get("/").await.unwrap().status, 200);
    srv.wait_counts(|c| c.idle == 1 && c.total() == 1).await;
    c.send("/sleep/200").await;
    srv.wait_counts(|c| c.active == 1 && c.idle == 0).await;
    assert_eq!(c.read().await.unwrap().status, 200);
    srv.wait_counts(|c| c.idle == 1).await;
    drop(c);
    srv.wait_counts(|c| c.total() == 0).await;
    assert_eq!(srv.states_of(0), [New, Active, Idle, Active, Idle, Closed]);
    srv.handle.shutdown();
    srv.report(Duration::ZERO).await;
}

#[tokio::test]
async fn http2_streams_drive_active_and_idle() {
    let mut srv = start(app(), |s| s).await;
    let io = TokioIo::new(TcpStream::connect(srv.addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = || {
        http::Request::get(format!("http://{}/sleep/200", srv.addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let pending = send.send_request(req());
    let waiting = tokio::spawn(pending);
    srv.wait_counts(|c| c.active == 1).await;
    let resp = waiting.await.unwrap().unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "slept 200"
    );
    srv.wait_counts(|c| c.idle == 1 && c.active == 0).await;
    let states = srv.states_of(0);
    assert_eq!(states.first(), Some(&New));
    assert_eq!(states.last(), Some(&Idle));
    assert!(states.contains(&Active));
    srv.handle.shutdown();
    assert!(srv.report(Duration::ZERO).await.is_clean());
}

/// A WebSocket echo that says goodbye (1001) when the drain starts, unless told to ignore it.
fn ws_app(polite: bool) -> axum::Router {
    use axum::Extension;
    use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
    axum::Router::new().route(
        "/ws",
        axum::routing::get(move |ws: WebSocketUpgrade, Extension(notice): Extension<ShutdownNotice>| async move {
            ws.on_upgrade(move |mut socket| async move {
                loop {
                    tokio::select! {
                        m = socket.recv() => match m {
                            Some(Ok(Message::Text(t))) => { let _ = socket.send(Message::Text(t)).await; }
                            _ => return,
                        },
                        _ = notice.wait(), if polite => {
                            let bye = CloseFrame { code: 1001, reason: "going away".into() };
                            let _ = socket.send(Message::Close(Some(bye))).await;
                            while let Some(Ok(m)) = socket.recv().await {
                                if matches!(m, Message::Close(_)) { break; }
                            }
                            return;
                        }
                    }
                }
            })
        }),
    )
}

#[tokio::test]
async fn upgraded_connections_stay_tracked_get_a_notice_and_say_goodbye() {
    let mut srv = start(ws_app(true), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(60)))
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.addr))
        .await
        .unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    srv.wait_counts(|c| c.hijacked == 1 && c.total() == 1).await;

    srv.handle.shutdown();
    let close = tokio::time::timeout(SOON, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match close {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    // tungstenite answers the close; the server then closes the socket.
    while let Some(Ok(_)) = ws.next().await {}
    let report = srv.report(Duration::ZERO).await;
    assert_eq!(report.at_start.hijacked, 1);
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(srv.states_of(0), [New, Active, Hijacked, Closed]);
}

#[tokio::test]
async fn an_upgraded_connection_that_ignores_the_notice_is_forced_at_the_deadline() {
    let deadline = Duration::from_millis(300);
    let mut srv = start(ws_app(false), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(deadline))
    })
    .await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", srv.addr))
        .await
        .unwrap();
    srv.wait_counts(|c| c.hijacked == 1).await;
    srv.handle.shutdown();
    let report = srv.report(deadline).await;
    assert_eq!(report.forced.len(), 1, "{report:?}");
    assert_eq!(report.forced[0].state, Hijacked);
    // The client sees its connection end.
    let end = tokio::time::timeout(SOON, ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
}

/// Issue 9, item 2: an idle keep-alive connection is closed after the idle timeout, so idle
/// clients cannot hold descriptors forever; one in use is not.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let srv = start(app(), |s| {
        s.timeouts(grace_http::Timeouts::default().idle(Duration::from_millis(300)))
    })
    .await;
    let mut idle = Client::connect(srv.addr).await;
    assert_eq!(idle.get("/").await.map(|r| r.status), Some(200));
    // A request that outlives the idle timeout is not cut: only idle time counts.
    let mut busy = Client::connect(srv.addr).await;
    assert_eq!(busy.get("/sleep/900").await.map(|r| r.status), Some(200));
    assert!(idle.closed().await, "the idle connection stayed open");
    srv.wait_counts(|c| c.total() <= 1).await;
}

/// A server built with no settings closes idle connections (after 75 s, nginx's default,
/// longer than the 60 s load balancers keep theirs): clients cannot hold them forever.
#[tokio::test]
async fn idle_connections_time_out_by_default() {
    let server = grace_http::Server::bind("127.0.0.1:0").await.unwrap();
    let config = format!("{server:?}");
    assert!(config.contains("idle: Some(75s)"), "{config}");
    assert_eq!(grace_http::DEFAULT_IDLE_TIMEOUT, Duration::from_secs(75));
}

/// Issue 9, item 2: a client that sends its headers and then dribbles its body (a byte every
/// 100 ms, below the minimum rate) is cut once the body timeout passes; a body sent at a
/// normal pace, even in pieces, is served.
#[tokio::test]
async fn a_dribbled_body_is_cut_and_a_normal_one_is_not() {
    let srv = start(app(), |s| {
        s.timeouts(grace_http::Timeouts::default().request_body(Duration::from_millis(400), 500))
    })
    .await;
    let mut ok = Client::connect(srv.addr).await;
    ok.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhello")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ok.write(b"world").await;
    let resp = ok.read().await.expect("a normal body was cut");
    assert_eq!((resp.status, resp.body.as_str()), (200, "helloworld"));

    let mut slow = Client::connect(srv.addr).await;
    slow.write(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        .await;
    let t = std::time::Instant::now();
    let answer = tokio::time::timeout(SOON, async {
        loop {
            // One byte at a time, as long as the server lets us.
            if tokio::io::AsyncWriteExt::write_all(slow.io.get_mut(), b"x")
                .await
                .is_err()
            {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut probe = [0u8; 1];
            let peek = slow.io.get_ref().peek(&mut probe);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1), peek).await {
                return slow.read().await;
            }
        }
    })
    .await
    .expect("the dribbled body held the connection");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "cut before the timeout"
    );
    if let Some(resp) = answer {
        assert_eq!(resp.status, 400, "{resp:?}");
        assert!(
            slow.closed().await,
            "the connection stayed open after a cut body"
        );
    }
}

/// When each of `n` WebSocket clients received its goodbye, counted from the drain.
async fn goodbye_times(spread: Duration, n: usize) -> Vec<Duration> {
    let mut srv = start(ws_app(true), |s| {
        s.drain_policy(
            grace_http::DrainPolicy::default()
                .shutdown_timeout(Duration::from_secs(60))
                .goodbye_spread(spread),
        )
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..n {
        let url = format!("ws://{}/ws", srv.addr);
        clients.push(tokio_tungstenite::connect_async(url).await.unwrap().0);
    }
    srv.wait_counts(|c| c.hijacked == n).await;
    let t = std::time::Instant::now();
    srv.handle.shutdown();
    let waits = clients.into_iter().map(|mut ws| async move {
        let close = tokio::time::timeout(SOON, ws.next()).await.unwrap();
        assert!(matches!(close, Some(Ok(Message::Close(_)))), "{close:?}");
        let at = t.elapsed();
        while let Some(Ok(_)) = ws.next().await {}
        at
    });
    let mut times = futures_util::future::join_all(waits).await;
    times.sort();
    assert!(srv.report(Duration::ZERO).await.is_clean());
    times
}

/// Issue 12: with a goodbye spread, notices to long-lived connections are spread over the
/// window (so their clients reconnect spread out), not sent at the same instant.
#[tokio::test]
async fn goodbyes_are_spread_over_the_window() {
    let window = Duration::from_millis(800);
    let spread = goodbye_times(window, 12).await;
    let span = spread[spread.len() - 1] - spread[0];
    assert!(
        span >= window / 2,
        "12 goodbyes over {span:?}, window {window:?}"
    );
    assert!(spread[spread.len() - 1] < window + SOON, "{spread:?}");
    // Without a spread they all leave at once, each well inside the window above.
    let at_once = goodbye_times(Duration::ZERO, 12).await;
    let span_at_once = at_once[at_once.len() - 1] - at_once[0];
    assert!(span_at_once < span, "{at_once:?} against {spread:?}");
}
