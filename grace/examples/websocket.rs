//! A WebSocket echo that says goodbye (close code 1001, going away) when the server drains,
//! instead of being cut at the deadline.
//!
//! ```sh
//! cargo run -p grace-http --example websocket
//! websocat ws://127.0.0.1:3000/ws     # then Ctrl-C the server: the client sees 1001
//! ```

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::routing::get;
use grace_http::ShutdownNotice;

#[tokio::main]
async fn main() -> Result<(), grace_http::Error> {
    let app = axum::Router::new().route(
        "/ws",
        get(
            |ws: WebSocketUpgrade, Extension(notice): Extension<ShutdownNotice>| async move {
                ws.on_upgrade(move |mut socket| async move {
                loop {
                    tokio::select! {
                        msg = socket.recv() => match msg {
                            Some(Ok(Message::Text(text))) => {
                                if socket.send(Message::Text(text)).await.is_err() { return; }
                            }
                            Some(Ok(_)) => {}
                            _ => return,
                        },
                        _ = notice.wait() => {
                            let bye = CloseFrame { code: 1001, reason: "server restarting".into() };
                            let _ = socket.send(Message::Close(Some(bye))).await;
                            return;
                        }
                    }
                }
            })
            },
        ),
    );
    let report = grace_http::Server::bind("127.0.0.1:3000")
        .await?
        .serve(app)
        .with_signals()
        .await?;
    println!("{}", report.to_json());
    Ok(())
}
