//! The same server and drain over a Unix-domain socket.

use std::future::IntoFuture;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

#[tokio::test]
async fn serves_and_drains_over_a_unix_socket() {
    let path = std::env::temp_dir().join(format!("grace-test-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let server = grace::Server::bind_unix(&path).unwrap();
    assert!(matches!(
        server.local_addrs()[0],
        grace::Addr::Unix(Some(_))
    ));
    let handle = server.handle();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "over unix"
        }),
    );
    let served = tokio::spawn(server.serve(app).into_future());

    let mut s = UnixStream::connect(&path).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    while handle.counts().active == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    handle.shutdown();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut response))
        .await
        .expect("connection not closed after its response")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"));
    assert!(response.ends_with("over unix"));
    let report = served.await.unwrap().unwrap();
    assert!(report.is_clean());
    assert!(
        UnixStream::connect(&path).await.is_err(),
        "still accepting after the drain"
    );
    let _ = std::fs::remove_file(&path);
}
