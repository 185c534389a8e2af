//! Real `grace-demo` processes, real signals: drain on SIGTERM/SIGINT, force on a second
//! signal or at the deadline, WebSocket goodbye, the JSON report, accept-error back-off.

mod common;

use std::time::{Duration, Instant};

use common::{Demo, Http, SOON, TempDir};
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
    use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
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

/// Runs the built demo to completion with `args` (it must fail at start-up).
fn run_demo(dir: &TempDir, a: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_grace-demo"))
        .current_dir(&dir.0)
        .args(a)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run grace-demo")
}

/// Issue 9, item 4: a shutdown timeout too large to add to a clock (from the flag or from
/// the config file) means "no deadline": SIGTERM drains, reports and exits 0, instead of
/// panicking with the audit buffer unflushed.
#[tokio::test]
async fn an_absurd_shutdown_timeout_still_drains_and_reports() {
    let huge = "10000000000000000000s";
    for from_config in [false, true] {
        let dir = TempDir::new();
        let a = if from_config {
            let config = format!("shutdown_timeout = \"{huge}\"\n");
            std::fs::write(dir.path("c.toml"), config).unwrap();
            args(&["--config", "c.toml"])
        } else {
            args(&["--shutdown-timeout", huge])
        };
        let demo = Demo::start(&dir, &a).await;
        let mut c = Http::connect(demo.addr).await.unwrap();
        c.send("GET", "/sleep/300", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        demo.signal(Signal::TERM);
        let resp = c.read().await.expect("the in-flight request was cut");
        assert_eq!(resp.status, 200);
        let exit = demo.wait_exit(SOON).await;
        assert_eq!(exit.code, 0, "{}", exit.stderr);
        assert_eq!(exit.report["trigger"], "SIGTERM", "{}", exit.stderr);
        assert!(!exit.stderr.contains("panicked"), "{}", exit.stderr);
        // The resources were closed (the audit file flushed), as in any clean stop.
        assert!(
            exit.stderr
                .contains("\"name\":\"audit-file\",\"outcome\":\"closed\""),
            "{}",
            exit.stderr
        );
    }
}

/// Issue 9, item 8: start-up errors exit 1, bad flags included (clap's own code is 2), and
/// absurd values are refused with a reason.
#[test]
fn bad_flags_and_an_unwritable_pid_file_are_start_up_errors() {
    let dir = TempDir::new();
    for bad in [
        &["--shutdown-timeout", "soon"][..],
        &["--no-such-flag"],
        &["--settle-interval", "0"],
        &["--db-max-connections", "0"],
    ] {
        let out = run_demo(&dir, bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {stderr}");
        assert!(!stderr.is_empty(), "{bad:?} gave no reason");
    }
    let out = run_demo(
        &dir,
        &[
            "--pid-file",
            "/nonexistent-dir/grace.pid",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stdout.contains("listening on"),
        "said it was listening: {stdout}"
    );
    assert!(stderr.contains("pid file"), "{stderr}");
    assert!(!stderr.contains("restart failed"), "{stderr}");
    // --help is not an error.
    assert_eq!(run_demo(&dir, &["--help"]).status.code(), Some(0));
}

/// Issue 9, item 8: `--header-read-timeout 0` turns the guard off (it meant about 4 ms, which
/// cut a request head sent in two parts 50 ms apart).
#[tokio::test]
async fn a_zero_header_read_timeout_turns_the_guard_off() {
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &args(&["--header-read-timeout", "0"])).await;
    let mut s = tokio::net::TcpStream::connect(demo.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(SOON, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out:?}");
    demo.signal(Signal::TERM);
    assert_eq!(demo.wait_exit(SOON).await.code, 0);
}

/// Issue 9, item 2: idle keep-alive connections cannot starve new clients of descriptors.
/// With more idle connections than the process has descriptors, a new client (a health
/// check) is still answered: running out of descriptors closes the connections idle longest.
#[tokio::test]
async fn idle_connections_give_way_when_descriptors_run_out() {
    let dir = TempDir::new();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_grace-demo"),
    ]);
    let demo = Demo::start_with(cmd, &dir, &[]).await;
    // Idle keep-alive connections (one request each) until the server runs out.
    let mut idle = Vec::new();
    for _ in 0..100 {
        let Ok(mut c) = Http::connect(demo.addr).await else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(2), c.request("GET", "/", None)).await {
            Ok(Ok(resp)) if resp.status == 200 => idle.push(c),
            _ => break,
        }
    }
    assert!(
        idle.len() > 20,
        "only {} connections were served",
        idle.len()
    );
    // A health check on a fresh connection is answered, while every idle one is held open.
    let t = Instant::now();
    loop {
        let mut c = Http::connect(demo.addr).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(3), c.request("GET", "/healthz", None)).await
        {
            Ok(Ok(resp)) => break assert_eq!(resp.status, 200),
            _ if t.elapsed() < SOON => {}
            other => panic!("the health check was never answered: {other:?}"),
        }
    }
    drop(idle);
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert!(exit.code == 0 || exit.code == 3, "{}", exit.stderr);
}

/// Issue 10: `--stop-deadline` bounds the whole stop; in-flight work is cut early enough to
/// leave the resources their time, and the report says which budget cut.
#[tokio::test]
async fn the_stop_deadline_cuts_work_but_leaves_the_resources_their_time() {
    let dir = TempDir::new();
    let demo = Demo::start(
        &dir,
        &args(&["--shutdown-timeout", "60s", "--stop-deadline", "3s"]),
    )
    .await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/sleep/60000", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    demo.signal(Signal::TERM);
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 3, "{}", exit.stderr);
    assert!(exit.took < Duration::from_secs(4), "took {:?}", exit.took);
    assert_eq!(exit.report["forced_by"], "stop deadline", "{}", exit.stderr);
    for (name, outcome) in exit.resources() {
        assert_eq!(outcome, "closed", "{name}: {}", exit.stderr);
    }
}

/// Issue 12: the event stream ends a drain with a `retry:` hint (a long one at a shutdown),
/// so EventSource clients do not hammer a service that is going away.
#[tokio::test]
async fn the_event_stream_ends_with_a_retry_hint() {
    use tokio::io::AsyncReadExt;
    let dir = TempDir::new();
    let demo = Demo::start(&dir, &[]).await;
    let mut c = Http::connect(demo.addr).await.unwrap();
    c.send("GET", "/events", None).await.unwrap();
    let head = c.read_head().await.unwrap();
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    demo.signal(Signal::TERM);
    let mut rest = Vec::new();
    tokio::time::timeout(SOON, c.raw().read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("data: tick 1"), "{rest}");
    assert!(rest.contains("event: goodbye\nretry: 5000\n"), "{rest}");
    let exit = demo.wait_exit(SOON).await;
    assert_eq!(exit.code, 0, "{}", exit.stderr);
}
