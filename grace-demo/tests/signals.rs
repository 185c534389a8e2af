//! Real `grace-demo` processes, real signals: drain on SIGTERM/SIGINT, force on a second
//! signal or at the deadline, WebSocket goodbye, the JSON report, accept-error back-off.

mod common;

use std::time::{Duration, Instant};

use common::{Demo, Http, TempDir, SOON};
use rustix::process::Signal;

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(ToString::to_string).collect()
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &args(&["--shutdown-timeout", "20s"])).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/700", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    demo.signal(Signal::TERM);
    let resp = c.read().await.expect("in-flight request was cut");
    assert_eq!(resp.status, 200);
    assert!(resp.closes(), "{:?}", resp.headers);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert!(
        exit.took < Duration::from_secs(20),
        "waited for the deadline"
    );
    let report = &exit.report;
    assert_eq!(report["trigger"], "SIGTERM");
    assert_eq!(report["at_start"]["active"], 1);
    assert_eq!(report["requests_completed"], 1);
    assert_eq!(report["forced"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn sigint_drains_too_and_new_connections_are_refused() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &[]).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/800", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    demo.signal(Signal::INT);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = Http::connect(demo.addr)
        .await
        .err()
        .expect("accepted during the drain");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(c.read().await.unwrap().status, 200);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert_eq!(exit.report["trigger"], "SIGINT");
}

#[tokio::test]
async fn a_second_signal_forces_at_once_and_exits_3() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &args(&["--shutdown-timeout", "60s"])).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/60000", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    demo.signal(Signal::TERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(exit.code, 3, "{}", exit.stderr);
    let report = &exit.report;
    assert_eq!(report["forced_by"], "second signal SIGTERM");
    assert_eq!(report["forced"][0]["request"]["path"], "/sleep/60000");
    assert_eq!(report["forced"][0]["state"], "active");
    assert!(
        c.read().await.is_err(),
        "the forced request must not get an answer"
    );
}

#[tokio::test]
async fn the_deadline_forces_a_stream_and_the_report_names_it() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &args(&["--shutdown-timeout", "1s"])).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/stream/100", None).await.unwrap(); // 10 s of chunks
    assert_eq!(c.read_head().await.unwrap().status, 200);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(Duration::from_secs(1) + SOON).await;
    // The whole shutdown fits in the 1 s deadline; connections are cut early enough to leave
    // the resources (database, files) up to half of it to close.
    assert!(
        exit.took >= Duration::from_millis(450),
        "forced too early: {:?}",
        exit.took
    );
    assert_eq!(exit.code, 3, "{}", exit.stderr);
    let report = &exit.report;
    assert_eq!(report["forced_by"], "deadline");
    assert_eq!(
        report["forced"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let forced = &report["forced"][0];
    assert_eq!(forced["request"]["method"], "GET", "{report}");
    assert_eq!(forced["request"]["path"], "/stream/100");
    assert!(forced["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(forced["age_ms"].as_f64().unwrap() >= 450.0);
}

#[tokio::test]
async fn websocket_clients_get_a_1001_close_frame() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{protocol::frame::coding::CloseCode, Message};
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", demo.addr))
        .await
        .unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    demo.signal(Signal::TERM);
    match tokio::time::timeout(SOON, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected close 1001, got {other:?}"),
    }
    // Finish the closing handshake; the server then closes the socket.
    while let Some(Ok(_)) = ws.next().await {}
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
    assert_eq!(exit.report["at_start"]["hijacked"], 1);
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn running_out_of_descriptors_backs_off_instead_of_spinning_or_exiting() {
    let dir = TempDir::new();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 48 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_grace-demo"),
    ]);
    let demo = Demo::start_with(cmd, &dir, &[]).await;
    // More connections than descriptors: accept fails with EMFILE for the rest.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::TcpStream::connect(demo.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(demo.pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_ticks(demo.pid) - before;
    // A spinning accept loop burns a whole core (about 100 ticks a second).
    assert!(spent < 30, "accept loop spun: {spent} ticks in 1 s");
    drop(held);
    // Descriptors are free again: the server serves.
    let t = Instant::now();
    loop {
        let answer = match Http::connect(demo.addr).await {
            Ok(mut c) => c.request("GET", "/", None).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(resp) => break assert_eq!(resp.status, 200),
            Err(_) if t.elapsed() < SOON => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("server did not recover: {e}"),
        }
    }
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert!(exit.code == 0 || exit.code == 3, "{}", exit.stderr);
}
