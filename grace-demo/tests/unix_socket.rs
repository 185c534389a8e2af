//! `grace-demo --listen unix:PATH` as a real process: the socket file goes when it stops
//! (SIGTERM, a failed start), a stale file left by `kill -9` is replaced at the next start,
//! a live socket or a file that is not a socket is never touched, `--socket-mode` sets the
//! file's permissions, and an upgrade (SIGHUP) keeps the file for the new generation, which
//! removes it when it stops.
//!
//! This test process makes itself a child subreaper, so the generation an upgrade starts
//! (orphaned when the old one exits) is re-parented here and can be reaped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};

mod common;

use common::{TempDir, signal, subreaper};

const BIN: &str = env!("CARGO_BIN_EXE_grace-demo");

/// Loose bound for what should take milliseconds, on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A `grace-demo` listening on a Unix socket.
struct Demo {
    child: Child,
    pid: u32,
    stderr: Arc<Mutex<String>>,
}

/// How a start went: serving, or the process exited first.
enum Started {
    Serving(Demo),
    Failed { status: ExitStatus, stderr: String },
}

/// Starts `grace-demo --listen unix:SOCK` with its ledger in `dir`, plus `args`.
fn start(dir: &TempDir, sock: &Path, args: &[&str]) -> Started {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&dir.0)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--audit-file")
        .arg(dir.path("audit.log"))
        .args(args);
    if !args.contains(&"--db") {
        cmd.arg("--db").arg(format!(
            "sqlite://{}?mode=rwc",
            dir.path("ledger.db").display()
        ));
    }
    start_cmd(cmd)
}

fn start_cmd(mut cmd: Command) -> Started {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn grace-demo");
    let pid = child.id();
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&stderr);
    let mut err = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    // The first line on stdout says it serves; keep reading so it never blocks on a pipe.
    let (tx, rx) = mpsc::channel();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    if line.starts_with("listening on unix:") {
        return Started::Serving(Demo { child, pid, stderr });
    }
    let status = wait_child(&mut child, PATIENCE);
    // The reader may still be copying the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let stderr = stderr.lock().unwrap().clone();
    Started::Failed { status, stderr }
}

fn wait_child(child: &mut Child, limit: Duration) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("grace-demo {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Started {
    fn serving(self) -> Demo {
        match self {
            Started::Serving(demo) => demo,
            Started::Failed { status, stderr } => {
                panic!("grace-demo did not start ({status}):\n{stderr}")
            }
        }
    }

    fn failed(self) -> (ExitStatus, String) {
        match self {
            Started::Failed { status, stderr } => (status, stderr),
            Started::Serving(mut demo) => {
                let _ = demo.child.kill();
                let _ = demo.child.wait();
                panic!("grace-demo started where it must not")
            }
        }
    }
}

impl Demo {
    fn stop(mut self) -> (ExitStatus, String) {
        signal(self.pid, Signal::TERM);
        let status = wait_child(&mut self.child, PATIENCE);
        std::thread::sleep(Duration::from_millis(50));
        let stderr = self.stderr.lock().unwrap().clone();
        (status, stderr)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `GET /` on a fresh connection: the response's body (it must be a 200).
fn get(sock: &Path) -> String {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut s = BufReader::new(s);
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: grace\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = common::read_response_blocking(&mut s).unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    resp.body
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{path:?}: {e}"))
        .ino()
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn sock(dir: &TempDir) -> PathBuf {
    dir.path("demo.sock")
}

#[test]
fn the_socket_file_goes_after_sigterm_and_takes_the_mode_asked_for() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    let demo = start(&dir, &sock, &["--socket-mode", "600"]).serving();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    get(&sock);
    let (status, stderr) = demo.stop();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!sock.exists(), "socket file left after SIGTERM:\n{stderr}");

    // Without --socket-mode: what the umask leaves (this test's umask: whatever it is).
    let demo = start(&dir, &sock, &["--socket-mode", "0660"]).serving();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660, "mode {mode:o}");
    demo.stop();
    assert!(!sock.exists());
}

#[test]
fn bad_socket_modes_are_refused() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    for bad in ["999", "rw", "1777", ""] {
        let (status, stderr) = start(&dir, &sock, &["--socket-mode", bad]).failed();
        assert!(!status.success(), "--socket-mode {bad:?} accepted");
        assert!(stderr.contains("--socket-mode"), "{stderr}");
        assert!(!sock.exists());
    }
    // And on a TCP listener it means nothing: said so.
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&dir.0)
        .args(["--listen", "127.0.0.1:0", "--socket-mode", "600"]);
    let (status, stderr) = start_cmd(cmd).failed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--socket-mode"), "{stderr}");
}

#[test]
fn a_stale_file_left_by_kill_9_is_replaced_at_the_next_start() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    let mut demo = start(&dir, &sock, &[]).serving();
    demo.child.kill().unwrap(); // SIGKILL: nothing runs
    demo.child.wait().unwrap();
    assert!(is_socket(&sock), "no stale file to replace");

    let demo = start(&dir, &sock, &[]).serving();
    get(&sock);
    let (status, stderr) = demo.stop();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("replaced a stale socket file"), "{stderr}");
    assert!(!sock.exists());
}

#[test]
fn a_live_socket_is_neither_replaced_nor_removed() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    let live = UnixListener::bind(&sock).unwrap();
    let before = inode(&sock);

    let (status, stderr) = start(&dir, &sock, &[]).failed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains(&*sock.to_string_lossy()), "{stderr}");
    assert_eq!(inode(&sock), before, "the live socket's file was replaced");
    // Its owner still gets connections (the demo's probe is in the queue first).
    let _client = UnixStream::connect(&sock).unwrap();
    live.set_nonblocking(true).unwrap();
    assert!(live.accept().is_ok());
}

#[test]
fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    std::fs::write(&sock, "precious").unwrap();
    let (status, stderr) = start(&dir, &sock, &[]).failed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
}

#[test]
fn a_failed_start_leaves_no_socket_file() {
    let dir = TempDir::new();
    let sock = sock(&dir);
    // The socket is bound before the ledger opens; the ledger cannot open.
    let (status, stderr) = start(
        &dir,
        &sock,
        &["--db", "sqlite:///nonexistent-dir/grace-demo.db?mode=rwc"],
    )
    .failed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("opening the ledger"), "{stderr}");
    assert!(
        !sock.exists(),
        "socket file left after a failed start:\n{stderr}"
    );
    // So the next start is not refused.
    let demo = start(&dir, &sock, &[]).serving();
    demo.stop();
    assert!(!sock.exists());
}

/// Reads the pid in `path` once it names a process other than `old`.
fn wait_new_pid(path: &Path, old: u32) -> u32 {
    let t = Instant::now();
    loop {
        let pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        match pid {
            Some(pid) if pid != old => return pid,
            _ => {}
        }
        assert!(t.elapsed() < PATIENCE, "no new pid in {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` (re-parented here) has exited, and reaps it.
fn reap(pid: u32) -> Option<i32> {
    let p = Pid::from_raw(pid as i32).expect("pid");
    let t = Instant::now();
    loop {
        match rustix::process::waitpid(Some(p), WaitOptions::NOHANG) {
            Ok(Some((_, status))) => return status.exit_status(),
            Ok(None) => {}
            // Not (yet) our child: its parent may still be exiting.
            Err(_) => {}
        }
        assert!(t.elapsed() < PATIENCE, "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_upgrade_keeps_the_file_and_the_last_generation_removes_it() {
    subreaper();
    let dir = TempDir::new();
    let sock = sock(&dir);
    let pid_file = dir.path("demo.pid");
    let pid_arg = pid_file.to_string_lossy().into_owned();
    let mut old = start(
        &dir,
        &sock,
        &["--pid-file", &pid_arg, "--socket-mode", "640"],
    )
    .serving();
    let file = inode(&sock);
    get(&sock);

    signal(old.pid, Signal::HUP);
    let new = wait_new_pid(&pid_file, old.pid);
    // The old generation drains and exits; the file stays, the new one serves on it.
    let status = wait_child(&mut old.child, PATIENCE);
    let old_stderr = old.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{old_stderr}");
    assert_eq!(
        inode(&sock),
        file,
        "the socket file changed across the upgrade"
    );
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640, "mode {mode:o}");
    get(&sock);

    // The new generation stops for good: the file goes.
    signal(new, Signal::TERM);
    let t = Instant::now();
    while sock.exists() {
        assert!(
            t.elapsed() < PATIENCE,
            "socket file left by the last generation\n{old_stderr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reap(new), Some(0));
    assert!(!pid_file.exists());
}
