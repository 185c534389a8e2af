//! Real `grace-demo` processes, real signals: drain on SIGTERM/SIGINT, force on a second
//! signal or at the deadline, WebSocket goodbye, the JSON report, accept-error back-off.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Loose bound for "promptly": never flakes on a loaded machine, still catches a hang.
const SOON: Duration = Duration::from_secs(5);

struct Demo {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

/// A scratch directory for the demo's files, removed afterwards.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        Demo::start_with(Command::new(env!("CARGO_BIN_EXE_grace-demo")), args)
    }

    fn start_with(mut cmd: Command, args: &[&str]) -> Demo {
        let dir = std::env::temp_dir().join(format!(
            "grace-demo-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = cmd
            .current_dir(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn grace-demo");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Demo {
            child,
            addr,
            _dir: TempDir(dir),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the exit (within `budget + SOON`); returns the code and the JSON report.
    fn wait(mut self, budget: Duration) -> (i32, serde_json::Value, Duration) {
        let t = Instant::now();
        let limit = budget + SOON;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!("grace-demo did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = t.elapsed();
        let mut stderr = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let report = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON report on stderr:\n{stderr}"));
        (
            status.code().expect("killed by a signal"),
            serde_json::from_str(report).unwrap(),
            took,
        )
    }

    fn connect(&self) -> Conn {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Conn(BufReader::new(s))
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Conn(BufReader<TcpStream>);

impl Conn {
    fn send(&mut self, path: &str) {
        write!(self.0.get_mut(), "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    }

    /// Status line and headers, lower-cased, or `None` if the connection closed first.
    fn head(&mut self) -> Option<String> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                return Some(head.to_ascii_lowercase());
            }
            head.push_str(&line);
        }
    }
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    let demo = Demo::start(&["--shutdown-timeout", "20s"]);
    let mut c = demo.connect();
    c.send("/sleep/700");
    std::thread::sleep(Duration::from_millis(200));
    demo.signal("TERM");
    let head = c.head().expect("in-flight request was cut");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let (code, report, took) = demo.wait(Duration::ZERO);
    assert_eq!(code, 0, "{report}");
    assert!(took < Duration::from_secs(20), "waited for the deadline");
    assert_eq!(report["trigger"], "SIGTERM");
    assert_eq!(report["at_start"]["active"], 1);
    assert_eq!(report["requests_completed"], 1);
    assert_eq!(report["forced"].as_array().unwrap().len(), 0);
}

#[test]
fn sigint_drains_too_and_new_connections_are_refused() {
    let demo = Demo::start(&[]);
    let mut c = demo.connect();
    c.send("/sleep/800");
    std::thread::sleep(Duration::from_millis(200));
    demo.signal("INT");
    std::thread::sleep(Duration::from_millis(200));
    let refused = TcpStream::connect(demo.addr).expect_err("accepted during the drain");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(c.head().unwrap().starts_with("http/1.1 200"));
    let (code, report, _) = demo.wait(Duration::ZERO);
    assert_eq!(code, 0);
    assert_eq!(report["trigger"], "SIGINT");
}

#[test]
fn a_second_signal_forces_at_once_and_exits_3() {
    let demo = Demo::start(&["--shutdown-timeout", "60s"]);
    let mut c = demo.connect();
    c.send("/sleep/60000");
    std::thread::sleep(Duration::from_millis(200));
    demo.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    demo.signal("TERM");
    let (code, report, took) = demo.wait(Duration::ZERO);
    assert!(took < Duration::from_secs(30), "did not force: {took:?}");
    assert_eq!(code, 3);
    assert_eq!(report["forced_by"], "second signal SIGTERM");
    assert_eq!(report["forced"][0]["request"]["path"], "/sleep/60000");
    assert_eq!(report["forced"][0]["state"], "active");
    assert!(
        c.head().is_none(),
        "the forced request must not get an answer"
    );
}

#[test]
fn the_deadline_forces_a_stream_and_the_report_names_it() {
    let demo = Demo::start(&["--shutdown-timeout", "1s"]);
    let mut c = demo.connect();
    c.send("/stream/100"); // 10 s of chunks
    assert!(c.head().unwrap().starts_with("http/1.1 200"));
    demo.signal("TERM");
    let (code, report, took) = demo.wait(Duration::from_secs(1));
    // The whole shutdown fits in the 1 s deadline; connections are cut early enough to leave
    // the resources (database, files) up to half of it to close.
    assert!(
        took >= Duration::from_millis(450),
        "forced too early: {took:?}"
    );
    assert_eq!(code, 3);
    assert_eq!(report["forced_by"], "deadline");
    let forced = &report["forced"][0];
    assert_eq!(
        report["forced"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(forced["request"]["method"], "GET", "{report}");
    assert_eq!(forced["request"]["path"], "/stream/100");
    assert!(forced["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(forced["age_ms"].as_f64().unwrap() >= 450.0);
}

#[test]
fn websocket_clients_get_a_1001_close_frame() {
    use tokio_tungstenite::tungstenite::{self, protocol::frame::coding::CloseCode, Message};
    let demo = Demo::start(&[]);
    let (mut ws, _) = tungstenite::connect(format!("ws://{}/ws", demo.addr)).unwrap();
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    demo.signal("TERM");
    match ws.read().unwrap() {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode::Away);
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    // Finish the closing handshake; the server then closes the socket.
    while ws.read().is_ok() {}
    let (code, report, _) = demo.wait(Duration::ZERO);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["at_start"]["hijacked"], 1);
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn running_out_of_descriptors_backs_off_instead_of_spinning_or_exiting() {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -n 48 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_grace-demo"),
    ]);
    let demo = Demo::start_with(cmd, &[]);
    // More connections than descriptors: accept fails with EMFILE for the rest.
    let held: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(demo.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(demo.child.id());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(demo.child.id()) - before;
    // A spinning accept loop burns a whole core (about 100 ticks a second).
    assert!(spent < 30, "accept loop spun: {spent} ticks in 1 s");
    drop(held);
    // Descriptors are free again: the server serves.
    let t = Instant::now();
    let served = loop {
        let mut c = demo.connect();
        c.send("/");
        match c.head() {
            Some(head) => break head,
            None if t.elapsed() < SOON => std::thread::sleep(Duration::from_millis(50)),
            None => panic!("server did not recover"),
        }
    };
    assert!(served.starts_with("http/1.1 200"));
    demo.signal("TERM");
    let (code, _, _) = demo.wait(Duration::ZERO);
    assert!(code == 0 || code == 3);
}
