//! `axum-serve-example`: a plain `axum::serve` server with graceful shutdown on SIGTERM and
//! Ctrl-C, as axum's own example writes it, with the routes grace-check drives. It is what
//! docs/check.md compares grace-demo with.
//!
//! `axum-serve-example --listen 127.0.0.1:8080`

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

async fn stream(Path(n): Path<u32>) -> Response {
    let chunks = futures_util::stream::unfold(0u32, move |i| async move {
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

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Text(_) | Message::Binary(_)) && socket.send(m).await.is_err() {
                return;
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:8080".to_string();
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--listen", Some(v)) => listen = v,
            _ => {
                eprintln!("usage: axum-serve-example [--listen ADDR]");
                std::process::exit(1);
            }
        }
    }
    let app = Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route("/sleep/{ms}", get(sleep))
        .route("/stream/{n}", get(stream))
        .route("/ws", get(ws));
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("axum-serve-example: binding {listen}: {e}");
            std::process::exit(1);
        }
    };
    if let Ok(addr) = listener.local_addr() {
        println!("listening on {addr}");
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        eprintln!("axum-serve-example: {e}");
        std::process::exit(1);
    }
}
