//! The WebSocket routes, handed to the next generation at an upgrade (see
//! `grace_http::Movable`): the client keeps its connection, and never sees a close frame.
//!
//! - `/ws`: echoes text and binary messages.
//! - `/ws/counter`: answers each text message with `"<seq> <pid> <message>"`: a
//!   per-connection sequence number (1, 2, …, continued across upgrades: it travels as the
//!   connection's state) and the pid of the process that answered.
//!
//! Both speak HTTP/1.1's `Upgrade: websocket` and HTTP/2's extended CONNECT (RFC 8441). What
//! moves at an upgrade: HTTP/1.1 connections without TLS, when the new generation resumes
//! them (it does unless its config says `websocket_handover = false`). The others say
//! goodbye when the process drains: close 1012 (service restart: come back) at an upgrade,
//! 1001 (going away) at a stop.

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use grace_http::{Movable, ShutdownNotice};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};

use crate::upgraded::{Moves, asked, drained};

/// WebSocket close code 1001: the server is going away.
const GOING_AWAY: u16 = 1001;
/// WebSocket close code 1012 (RFC 6455's registry): the service restarts; come back.
const SERVICE_RESTART: u16 = 1012;

/// tungstenite's settings: a 4 KiB read buffer (its default, 128 KiB, is allocated up front
/// for every socket: an `mmap` each, and 1.3 GB of address space for 10,000 sockets, which
/// tungstenite's docs advise against when connections are many and messages small).
fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4 * 1024)
}

/// What a socket does with each message; its name is the kind it moves as.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Echo,
    Counter,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Echo, Kind::Counter];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Echo => "ws-echo",
            Kind::Counter => "ws-counter",
        }
    }
}

/// Registers, on `restart`, the handlers that resume both kinds in this generation.
pub fn resume(restart: grace_http::Restart) -> grace_http::Restart {
    Kind::ALL.into_iter().fold(restart, |restart, kind| {
        restart.resume(kind.name(), move |socket, state| async move {
            let seq = state[..].try_into().map_or(0, u64::from_le_bytes);
            let notice = socket.notice();
            let ws = WebSocketStream::from_raw_socket(socket, Role::Server, Some(config())).await;
            serve(ws, kind, seq, Some(notice)).await;
        })
    })
}

/// `GET /ws` (or `/ws/counter`): the handshake, then the socket on a task of its own.
pub async fn route(kind: Kind, mut req: Request) -> Response {
    let notice = req.extensions().get::<ShutdownNotice>().cloned();
    let response = handshake(&req);
    if !matches!(
        response.status(),
        StatusCode::SWITCHING_PROTOCOLS | StatusCode::OK
    ) {
        return response; // refused
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => return tracing::debug!(error = %e, "WebSocket upgrade failed"),
        };
        // Movable over HTTP/1.1 without TLS; otherwise served as it is.
        match Movable::websocket(upgraded, kind.name()) {
            Ok(socket) => {
                let ws =
                    WebSocketStream::from_raw_socket(socket, Role::Server, Some(config())).await;
                serve(ws, kind, 0, notice).await;
            }
            Err(upgraded) => {
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await;
                serve(ws, kind, 0, notice).await;
            }
        }
    });
    response
}

/// The server's side of the handshake: HTTP/1.1's `101 Switching Protocols`, HTTP/2's
/// `200` to an extended CONNECT; a request that is neither is refused (any other status).
fn handshake(req: &Request) -> Response {
    let headers = req.headers();
    if !header_is(headers, header::SEC_WEBSOCKET_VERSION, "13") {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::SEC_WEBSOCKET_VERSION, "13")],
            "a WebSocket handshake (version 13) is expected",
        )
            .into_response();
    }
    let h2 = req.version() == Version::HTTP_2
        && req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if h2 {
        return StatusCode::OK.into_response();
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let h1 = req.method() == Method::GET
        && header_is(headers, header::UPGRADE, "websocket")
        && header_is(headers, header::CONNECTION, "upgrade");
    let accept = key.map(|k| derive_accept_key(k.as_bytes()));
    match (h1, accept.and_then(|a| HeaderValue::from_str(&a).ok())) {
        (true, Some(accept)) => {
            let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
            let h = response.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
            response
        }
        _ => (StatusCode::BAD_REQUEST, "not a WebSocket handshake").into_response(),
    }
}

/// Whether a header's comma-separated tokens include `token` (case-insensitive).
fn header_is(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Serves one socket: answers each message; moves at an upgrade that wants it; says goodbye
/// when the process drains.
async fn serve<S: Moves>(
    mut ws: WebSocketStream<S>,
    kind: Kind,
    mut seq: u64,
    notice: Option<ShutdownNotice>,
) {
    let mover = ws.get_ref().mover();
    let draining = drained(notice.as_ref());
    tokio::pin!(draining);
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    let reply = match (kind, m) {
                        (Kind::Echo, m) => m,
                        (Kind::Counter, m) => {
                            seq += 1;
                            let text = m.to_text().unwrap_or("");
                            Message::text(format!("{seq} {} {text}", std::process::id()))
                        }
                    };
                    if ws.send(reply).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            () = asked(mover.as_ref()) => {
                // Anything queued (a pong) goes out whole before the socket moves.
                if ws.flush().await.is_err() {
                    return;
                }
                match ws.get_mut().hand_over(&seq.to_le_bytes()).await {
                    Ok(()) => return,
                    Err(e) => tracing::debug!(error = %e, "WebSocket stays here"),
                }
            }
            _ = &mut draining => break,
        }
    }
    goodbye(ws, notice.as_ref().is_some_and(ShutdownNotice::is_restart)).await;
}

/// Close 1012 (an upgrade: come back) or 1001 (going away), saying which process closed,
/// then the client's reply.
async fn goodbye<S: Moves>(mut ws: WebSocketStream<S>, restart: bool) {
    let (code, reason) = match restart {
        true => (SERVICE_RESTART, "service restart"),
        false => (GOING_AWAY, "server shutting down"),
    };
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: format!("{reason} (pid {})", std::process::id()).into(),
    };
    if ws.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    // Wait (briefly) for the client's close reply, as the protocol asks.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
