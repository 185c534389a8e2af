//! The demo's HTTP routes.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::Path;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::stream;
use grace::ShutdownNotice;

/// WebSocket close code 1001: the server is going away.
const GOING_AWAY: u16 = 1001;

pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/sleep/{ms}", get(sleep))
        .route("/stream/{n}", get(stream_chunks))
        .route("/ws", get(ws))
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

/// `n` chunks, 100 ms apart.
async fn stream_chunks(Path(n): Path<u32>) -> Response {
    let chunks = stream::unfold(0u32, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(format!("chunk {i}\n")),
            i + 1,
        ))
    });
    Response::new(axum::body::Body::from_stream(chunks))
}

async fn ws(upgrade: WebSocketUpgrade, notice: Option<Extension<ShutdownNotice>>) -> Response {
    upgrade.on_upgrade(move |socket| echo(socket, notice.map(|Extension(n)| n)))
}

/// Echoes text and binary messages; when the server drains, says goodbye with 1001.
async fn echo(mut socket: WebSocket, notice: Option<ShutdownNotice>) {
    let draining = async {
        match &notice {
            Some(n) => n.wait().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(draining);
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    if socket.send(m).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
            _ = &mut draining => break,
        }
    }
    let goodbye = Message::Close(Some(CloseFrame {
        code: GOING_AWAY,
        reason: "server shutting down".into(),
    }));
    if socket.send(goodbye).await.is_err() {
        return;
    }
    // Wait (briefly) for the client's close reply, as the protocol asks.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
