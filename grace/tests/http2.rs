//! HTTP/2 drain at the frame level: GOAWAY in two steps (RFC 9113 §6.8), open streams finish.

mod common;

use std::time::Duration;

use common::{SOON, app, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GOAWAY: u8 = 0x7;
const PING: u8 = 0x6;
const HEADERS: u8 = 0x1;
const DATA: u8 = 0x0;
const SETTINGS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn read_frame(s: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// HPACK: `:method GET`, `:scheme http`, `:path <path>` (literal), `:authority test`.
fn get_headers(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 4]);
    block.extend_from_slice(b"test");
    block
}

#[tokio::test]
async fn goaway_twice_then_the_open_stream_finishes() {
    let mut srv = start(app(), |s| s).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // END_STREAM | END_HEADERS on stream 1.
    s.write_all(&frame(HEADERS, 0x5, 1, &get_headers("/sleep/300")))
        .await
        .unwrap();
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();

    let mut goaways = Vec::new();
    let mut data = Vec::new();
    let mut ended = false;
    let result = tokio::time::timeout(SOON, async {
        while let Some((kind, flags, stream, payload)) = read_frame(&mut s).await {
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    s.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap()
                }
                PING if flags & 1 == 0 => s.write_all(&frame(PING, 1, 0, &payload)).await.unwrap(),
                GOAWAY => {
                    goaways.push(u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff)
                }
                DATA if stream == 1 => {
                    data.extend_from_slice(&payload);
                    ended |= flags & 1 == 1;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(result.is_ok(), "connection was not closed");
    assert_eq!(
        goaways,
        [0x7fff_ffff, 1],
        "GOAWAY(max) then GOAWAY(last stream id)"
    );
    assert_eq!(String::from_utf8_lossy(&data), "slept 300");
    assert!(ended, "stream 1 did not finish");
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.requests_completed, 1);
}

/// Reads frames until the server closes the connection; false if it is still open after
/// `SOON`. Answers nothing (a peer that never acknowledges SETTINGS or PING).
async fn closed_by_server(s: &mut TcpStream) -> bool {
    tokio::time::timeout(SOON, async { while read_frame(s).await.is_some() {} })
        .await
        .is_ok()
}

async fn preface(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// An HTTP/2 connection that has been answered one `GET /` and is now idle.
async fn idle_h2(srv: &common::Running) -> TcpStream {
    let mut s = preface(srv.addr).await;
    s.write_all(&frame(HEADERS, 0x5, 1, &get_headers("/")))
        .await
        .unwrap();
    srv.wait_counts(|c| c.idle == 1 && c.active == 0).await;
    s
}

/// Issue 9, item 2: an HTTP/2 connection that sends only the preface is cut by the
/// header-read timeout, as a silent HTTP/1 connection is (it was exempt once the preface
/// arrived).
#[tokio::test]
async fn a_preface_alone_does_not_hold_a_connection() {
    let srv = start(app(), |s| {
        s.timeouts(
            grace_http::Timeouts::default()
                .header_read(Duration::from_millis(300))
                .idle(None),
        )
    })
    .await;
    let mut s = preface(srv.addr).await;
    assert!(
        closed_by_server(&mut s).await,
        "a preface-only connection stayed open"
    );
    srv.wait_counts(|c| c.total() == 0).await;
}

/// Issue 9, item 2: HEADERS without END_HEADERS (a CONTINUATION that never comes) is cut by
/// the header-read timeout.
#[tokio::test]
async fn headers_without_end_headers_do_not_hold_a_connection() {
    let srv = start(app(), |s| {
        s.timeouts(
            grace_http::Timeouts::default()
                .header_read(Duration::from_millis(300))
                .idle(None),
        )
    })
    .await;
    let mut s = preface(srv.addr).await;
    // END_STREAM, no END_HEADERS.
    s.write_all(&frame(HEADERS, 0x1, 1, &get_headers("/")))
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut s).await,
        "a half-sent header block held the connection"
    );
}

/// Issue 9, item 2: an idle HTTP/2 connection (requests done, no stream open) is closed by
/// the idle timeout, as an idle HTTP/1 one is.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_by_the_idle_timeout() {
    let srv = start(app(), |s| {
        s.timeouts(grace_http::Timeouts::default().idle(Duration::from_millis(300)))
    })
    .await;
    let mut s = preface(srv.addr).await;
    s.write_all(&frame(HEADERS, 0x5, 1, &get_headers("/")))
        .await
        .unwrap();
    let mut got = Vec::new();
    let served = tokio::time::timeout(SOON, async {
        while let Some((kind, flags, stream, payload)) = read_frame(&mut s).await {
            if kind == DATA && stream == 1 {
                got.extend_from_slice(&payload);
                if flags & 1 == 1 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(served.is_ok());
    assert_eq!(got, b"hello");
    assert!(
        closed_by_server(&mut s).await,
        "an idle HTTP/2 connection stayed open"
    );
}

/// Issue 9, item 3: an idle HTTP/2 peer that never acknowledges the drain's PING (gone, or
/// behind a dropped NAT entry) does not hold the drain to its deadline: it is closed about
/// a second later, and nothing is reported as forced.
#[tokio::test]
async fn a_peer_that_never_answers_the_drain_ping_does_not_hold_the_drain() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(60)))
    })
    .await;
    let mut s = idle_h2(&srv).await;
    let t = std::time::Instant::now();
    srv.handle.shutdown();
    // The peer reads (so the server's writes do not block) but answers nothing.
    assert!(closed_by_server(&mut s).await, "the connection stayed open");
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert!(t.elapsed() < SOON, "the drain took {:?}", t.elapsed());
}

/// Issue 9, item 3: the bound on that wait never cuts an open stream: a stream still running
/// after it finishes, then the connection closes.
#[tokio::test]
async fn the_ping_bound_lets_an_open_stream_finish() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(60)))
    })
    .await;
    let mut s = preface(srv.addr).await;
    s.write_all(&frame(HEADERS, 0x5, 1, &get_headers("/sleep/1800")))
        .await
        .unwrap();
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    let mut data = Vec::new();
    let read = tokio::time::timeout(SOON, async {
        while let Some((kind, _, stream, payload)) = read_frame(&mut s).await {
            if kind == DATA && stream == 1 {
                data.extend_from_slice(&payload);
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    assert_eq!(String::from_utf8_lossy(&data), "slept 1800");
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

/// Issue 12: the soft drain for HTTP/2. During the pre-stop delay (the listener still
/// accepting), an HTTP/2 connection gets its GOAWAY at once, so its client opens its next
/// streams on another instance before this one's listener closes.
#[tokio::test]
async fn http2_gets_its_goaway_during_the_pre_stop_delay() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().pre_stop_delay(Duration::from_secs(2)))
    })
    .await;
    let mut s = idle_h2(&srv).await;
    let t = std::time::Instant::now();
    srv.handle.shutdown();
    let goaway = tokio::time::timeout(SOON, async {
        while let Some((kind, flags, _, payload)) = read_frame(&mut s).await {
            match kind {
                GOAWAY => return Some(payload),
                PING if flags & 1 == 0 => s.write_all(&frame(PING, 1, 0, &payload)).await.unwrap(),
                SETTINGS if flags & 1 == 0 => {
                    s.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap()
                }
                _ => {}
            }
        }
        None
    })
    .await
    .unwrap();
    assert!(goaway.is_some(), "no GOAWAY during the pre-stop delay");
    assert!(
        t.elapsed() < Duration::from_millis(1_500),
        "GOAWAY only after {:?}",
        t.elapsed()
    );
    // The listener still accepts meanwhile.
    assert!(TcpStream::connect(srv.addr).await.is_ok());
    drop(s);
    assert!(srv.report(Duration::from_secs(2)).await.is_clean());
}

const RST_STREAM: u8 = 0x3;

/// Issue 11: a rapid-reset attack (HEADERS then RST_STREAM, over and over, on one
/// connection) does not starve other clients: a normal request on another connection is
/// still answered promptly, and the attacking connection is cut (hyper's limit on pending
/// resets, which grace keeps on) instead of making the server work without end.
#[tokio::test]
async fn a_rapid_reset_attack_does_not_starve_other_clients() {
    let srv = start(app(), |s| s).await;
    let mut attack = preface(srv.addr).await;
    let mut attacker_cut = false;
    let mut sent = 0u32;
    for n in 0..20_000u32 {
        let id = 1 + 2 * n;
        let mut burst = frame(HEADERS, 0x5, id, &get_headers("/sleep/1000"));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
        if tokio::io::AsyncWriteExt::write_all(&mut attack, &burst)
            .await
            .is_err()
        {
            attacker_cut = true;
            break;
        }
        sent += 1;
        if n % 100 == 0 {
            // Meanwhile, an honest client.
            let t = std::time::Instant::now();
            let mut honest = common::Client::connect(srv.addr).await;
            let answer = tokio::time::timeout(SOON, honest.get("/")).await;
            assert!(
                matches!(answer, Ok(Some(ref r)) if r.status == 200),
                "{answer:?}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "answered after {:?}",
                t.elapsed()
            );
        }
    }
    if !attacker_cut {
        // The server must have said goodbye (GOAWAY) and closed, whatever we kept writing.
        attacker_cut = closed_by_server(&mut attack).await;
    }
    assert!(
        attacker_cut,
        "{sent} resets and the attacking connection is still open"
    );
}
