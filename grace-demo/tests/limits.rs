//! `--max-connections` and `--max-connection-age` on a real `grace-demo` process.

mod common;

use std::time::Duration;

use common::{Demo, Http, SOON, TempDir};
use rustix::process::Signal;

#[tokio::test]
async fn max_connections_queues_new_connections_instead_of_refusing_them() {
    let dir = TempDir::new();
    let args = ["--max-connections", "1"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut first = Http::connect(demo.addr).await.unwrap();
    first.send("GET", "/", None).await.unwrap();
    assert_eq!(first.read().await.unwrap().status, 200);

    let mut second = Http::connect(demo.addr)
        .await
        .expect("refused at the limit");
    second.send("GET", "/", None).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(400), second.read()).await;
    assert!(early.is_err(), "served over the limit");
    drop(first);
    let resp = tokio::time::timeout(SOON, second.read())
        .await
        .expect("never served")
        .unwrap();
    assert_eq!(resp.status, 200);
    drop(second);

    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(
        exit.stderr.contains("max_connections reached"),
        "{}",
        exit.stderr
    );
}

#[tokio::test]
async fn max_connection_age_closes_old_keep_alive_connections() {
    let dir = TempDir::new();
    let args = ["--max-connection-age", "300ms"].map(String::from);
    let demo = Demo::start(&dir, &args).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/500", None).await.unwrap();
    let resp = c.read().await.expect("cut at its age");
    assert_eq!(resp.status, 200);
    assert!(resp.closes(), "{:?}", resp.headers);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}
