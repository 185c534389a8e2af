//! Serve on a Unix-domain socket (HTTP/1 and HTTP/2 alike).
//!
//! ```sh
//! cargo run -p grace-http --example unix_socket
//! curl --unix-socket /tmp/grace-example.sock http://localhost/
//! ```

#[tokio::main]
async fn main() -> Result<(), grace_http::Error> {
    let path = std::env::temp_dir().join("grace-example.sock");
    let _ = std::fs::remove_file(&path);
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello over unix\n" }));
    grace_http::Server::bind(format!("unix:{}", path.display()))
        .await?
        .serve(app)
        .with_signals()
        .await?;
    Ok(())
}
