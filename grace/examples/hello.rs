//! The smallest graceful server: SIGTERM or SIGINT drains, a second signal forces.
//!
//! ```sh
//! cargo run -p grace-http --example hello
//! curl localhost:3000/        # then Ctrl-C: the report is printed as JSON
//! ```

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), grace_http::Error> {
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
    let report = grace_http::Server::bind("127.0.0.1:3000")
        .await?
        .drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(10)))
        .serve(app)
        .with_signals()
        .await?;
    println!("{}", report.to_json());
    Ok(())
}
