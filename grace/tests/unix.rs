//! The same server and drain over a Unix-domain socket, and the life of its file: removed
//! when the server stops, stale files replaced, live sockets and other files left alone,
//! the mode set whatever the umask.

use std::future::IntoFuture;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A path of its own for each test (they run in parallel in one process).
fn sock_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("grace-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn app() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| async { "over unix" }))
}

async fn get(path: &Path) -> String {
    let mut s = UnixStream::connect(path).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut response))
        .await
        .expect("no response")
        .unwrap();
    response
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).unwrap().ino()
}

#[tokio::test]
async fn serves_and_drains_over_a_unix_socket() {
    let path = sock_path("drain");
    let server = grace_http::Server::bind(format!("unix:{}", path.display()))
        .await
        .unwrap();
    assert!(matches!(
        server.local_addrs()[0],
        grace_http::Addr::Unix(Some(_))
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
    assert!(!path.exists(), "socket file left after the server stopped");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let path = sock_path("stale");
    // A socket file whose process is gone: std's listener leaves its file when closed.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = grace_http::Server::bind(format!("unix:{}", path.display()))
        .await
        .expect("a stale socket file must be replaced");
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());
    assert!(get(&path).await.ends_with("over unix"));
    handle.shutdown();
    served.await.unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn a_live_socket_is_neither_replaced_nor_touched() {
    let path = sock_path("live");
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let before = inode(&path);

    let err = grace_http::Listener::bind_unix(&path).expect_err("bound over a live socket");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    let err = grace_http::Server::bind_unix_with_mode(&path, 0o600)
        .expect_err("bound over a live socket");
    assert!(err.to_string().contains("in use"), "{err}");

    // Still the same file, still served by its owner.
    assert_eq!(inode(&path), before);
    let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
    live.set_nonblocking(true).unwrap();
    assert!(live.accept().is_ok(), "the live listener no longer accepts");
    drop(live);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let path = sock_path("regular");
    std::fs::write(&path, "precious").unwrap();
    let err = grace_http::Listener::bind_unix(&path).expect_err("bound over a regular file");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

    // Nor is a symlink followed, even to a stale socket.
    std::fs::remove_file(&path).unwrap();
    let target = sock_path("regular-target");
    drop(std::os::unix::net::UnixListener::bind(&target).unwrap());
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let err = grace_http::Listener::bind_unix(&path).expect_err("bound over a symlink");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
    assert!(target.exists());
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&target).unwrap();
}

#[tokio::test]
async fn the_mode_is_set_whatever_the_umask() {
    for (name, mode) in [("mode600", 0o600), ("mode666", 0o666)] {
        let path = sock_path(name);
        let server = grace_http::Server::bind_unix_with_mode(&path, mode).unwrap();
        let got = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(got, mode, "{got:o} instead of {mode:o}");
        let handle = server.handle();
        let served = tokio::spawn(server.serve(app()).into_future());
        assert!(get(&path).await.ends_with("over unix"));
        handle.shutdown();
        served.await.unwrap().unwrap();
        assert!(!path.exists());
    }

    let path = sock_path("badmode");
    let err = grace_http::Listener::bind_unix_with_mode(&path, 0o4755).expect_err("setuid mode");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(!path.exists());
}

#[test]
fn a_server_that_never_served_removes_its_file_when_the_runtime_ends() {
    let path = sock_path("failed-start");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = grace_http::Server::bind(format!("unix:{}", path.display()))
            .await
            .unwrap();
        assert!(path.exists());
        // A start-up step fails: the server is dropped without serving.
        drop(server);
    });
    drop(runtime);
    assert!(!path.exists(), "socket file left after a failed start");
}

#[tokio::test]
async fn an_adopted_socket_file_is_not_ours_to_remove() {
    // As under systemd's socket activation: the socket comes as a descriptor, its file
    // belongs to whoever made it.
    let path = sock_path("adopted");
    let std_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let listener = grace_http::Listener::from_fd(std::os::fd::OwnedFd::from(std_listener)).unwrap();
    let server = grace_http::Server::from_listener(listener);
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());
    assert!(get(&path).await.ends_with("over unix"));
    handle.shutdown();
    served.await.unwrap().unwrap();
    assert!(path.exists(), "an adopted socket's file was removed");
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn a_file_replaced_meanwhile_is_not_removed() {
    let path = sock_path("replaced");
    let server = grace_http::Server::bind(format!("unix:{}", path.display()))
        .await
        .unwrap();
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app()).into_future());
    // Someone else takes the path over while we serve.
    std::fs::remove_file(&path).unwrap();
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let theirs = inode(&path);
    handle.shutdown();
    served.await.unwrap().unwrap();
    assert_eq!(
        inode(&path),
        theirs,
        "another process's socket file was removed"
    );
    drop(other);
    std::fs::remove_file(&path).unwrap();
}
