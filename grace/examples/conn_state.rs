//! Observe every connection's state, like Go's `Server.ConnState`, and read live counts.
//!
//! ```sh
//! cargo run -p grace-http --example conn_state
//! curl localhost:3000/slow & curl localhost:3000/   # watch New → Active → Idle → Closed
//! curl localhost:3000/counts
//! ```

use std::time::Duration;

use axum::routing::get;
use grace_http::{ConnInfo, ConnState, Server};

#[tokio::main]
async fn main() -> Result<(), grace_http::Error> {
    let server =
        Server::bind("127.0.0.1:3000")
            .await?
            .on_conn_state(|conn: &ConnInfo, state: ConnState| {
                println!("conn {} from {}: {state}", conn.id(), conn.peer());
            });
    let handle = server.handle();
    let app = axum::Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "slow\n"
            }),
        )
        .route(
            "/counts",
            get(move || {
                let handle = handle.clone();
                async move { format!("{:?}\n", handle.counts()) }
            }),
        );
    server.serve(app).with_signals().await?;
    Ok(())
}
