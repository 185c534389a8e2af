//! The server under test: the user's command, started afresh for each scenario with `sh -c`
//! in a process group of its own, signalled by pid, timed by blocking on it (waitpid), and
//! killed with its whole group (and anything it left behind) when the scenario ends.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions};
use tokio::sync::watch;

use crate::duration::format_duration;

/// How the server process ended.
#[derive(Clone, Copy, Debug)]
pub struct Exit {
    pub at: Instant,
    /// The exit status, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended".into(),
        }
    }
}

/// Makes this process the reaper of orphans, so that a generation started by the server
/// (an upgrade's new process, in its own process group) is found and ended when the old
/// one has gone.
pub fn become_subreaper() {
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
}

/// The command template: `{port}`, `{timeout}` and `{tmp}` replaced.
#[derive(Clone, Debug)]
pub struct CommandTemplate {
    pub cmd: String,
    pub timeout: Duration,
    pub start_timeout: Duration,
}

/// A free port on 127.0.0.1: bind port 0, read it, close.
fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A command run with `sh -c` gets `exec` in front when it is one simple command, so the
/// signals reach the server itself rather than a shell waiting for it.
fn shell_text(cmd: &str, prefix: &str) -> String {
    let simple = !cmd.contains([';', '&', '|', '\n', '(', ')', '`']);
    let cmd = cmd.trim();
    if simple && !cmd.starts_with("exec ") {
        format!("{prefix}exec {cmd}")
    } else {
        format!("{prefix}{cmd}")
    }
}

/// Keeps the last bytes a stream wrote (the server's stdout and stderr).
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<Vec<u8>>>);

impl Tail {
    const KEEP: usize = 16 * 1024;

    fn collect(&self, mut r: impl Read + Send + 'static) {
        let tail = self.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut t = tail.0.lock().unwrap_or_else(|e| e.into_inner());
                t.extend_from_slice(&buf[..n]);
                if t.len() > 2 * Self::KEEP {
                    let cut = t.len() - Self::KEEP;
                    t.drain(..cut);
                }
            }
        });
    }

    /// The last `lines` lines.
    pub fn last_lines(&self, lines: usize) -> String {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&t);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A running server.
pub struct Server {
    pub pid: i32,
    pub addr: SocketAddr,
    exit: watch::Receiver<Option<Exit>>,
    pub output: Tail,
    tmp: PathBuf,
    killed: bool,
}

impl Server {
    /// Starts the command (behind `prefix`, e.g. `ulimit -n 64 && `) on a free port and
    /// waits until the port accepts connections.
    pub async fn start(t: &CommandTemplate, prefix: &str) -> Result<Server, String> {
        let port = free_port().map_err(|e| format!("finding a free port: {e}"))?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tmp = std::env::temp_dir().join(format!(
            "grace-check-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let cmd = t
            .cmd
            .replace("{port}", &port.to_string())
            .replace("{timeout}", &format_duration(t.timeout))
            .replace("{tmp}", &tmp.display().to_string());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(shell_text(&cmd, prefix))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting sh -c: {e}"))?;
        let pid = child.id() as i32;
        let output = Tail::default();
        if let Some(out) = child.stdout.take() {
            output.collect(out);
        }
        if let Some(err) = child.stderr.take() {
            output.collect(err);
        }
        let (tx, exit) = watch::channel(None);
        std::thread::spawn(move || {
            // Blocks in waitpid: the exit is timed when it happens, never by polling.
            let status = child.wait();
            let at = Instant::now();
            let (code, signal) = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    (s.code(), s.signal())
                }
                Err(_) => (None, None),
            };
            let _ = tx.send(Some(Exit { at, code, signal }));
        });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = Server {
            pid,
            addr,
            exit,
            output,
            tmp,
            killed: false,
        };
        let deadline = Instant::now() + t.start_timeout;
        loop {
            if let Some(e) = server.exited() {
                return Err(format!(
                    "the server ended before accepting connections ({}): {}",
                    e.describe(),
                    server.output.last_lines(5)
                ));
            }
            let attempt = tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            if let Ok(Ok(_)) = attempt {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nothing accepted connections on {addr} within {:?} (does the command use {{port}}?): {}",
                    t.start_timeout,
                    server.output.last_lines(5)
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `sig` to the server process; returns when it was sent.
    pub fn signal(&self, sig: Signal) -> Instant {
        if let Some(pid) = Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, sig);
        }
        Instant::now()
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit until `until`.
    pub async fn wait_exit(&self, until: Instant) -> Option<Exit> {
        let mut rx = self.exit.clone();
        let wait = rx.wait_for(|e| e.is_some());
        match tokio::time::timeout_at(until.into(), wait).await {
            Ok(Ok(e)) => *e,
            _ => None,
        }
    }

    /// CPU time (user + system) used so far by the processes of the server's group.
    pub fn cpu_time(&self) -> Duration {
        let ticks = rustix::param::clock_ticks_per_second().max(1);
        let total: u64 = procs()
            .into_iter()
            .filter(|p| p.pgrp == self.pid)
            .map(|p| p.cpu_ticks)
            .sum();
        Duration::from_secs_f64(total as f64 / ticks as f64)
    }

    /// Ends the server's process group and any process it left to us (an orphaned
    /// generation), and reaps them.
    pub async fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        kill_group(self.pid);
        kill_orphans(self.pid);
        let _ = self
            .wait_exit(Instant::now() + Duration::from_secs(5))
            .await;
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.killed {
            kill_group(self.pid);
            kill_orphans(self.pid);
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn kill_group(pgid: i32) {
    if let Some(p) = Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(p, Signal::KILL);
    }
}

/// A process as `/proc/PID/stat` tells.
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub cpu_ticks: u64,
}

pub fn procs() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // "pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime …": comm may hold spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(Proc {
            pid,
            ppid: f.get(1)?.parse().ok()?,
            pgrp: f.get(2)?.parse().ok()?,
            cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
        })
    })
    .collect()
}

/// Children of this process other than `started` (which a `std::process::Child` owns):
/// generations orphaned by a server (this process is their subreaper).
pub fn orphans(started: i32) -> Vec<Proc> {
    let me = rustix::process::getpid().as_raw_nonzero().get();
    procs()
        .into_iter()
        .filter(|p| p.ppid == me && p.pid != started)
        .collect()
}

fn kill_orphans(started: i32) {
    for p in orphans(started) {
        kill_group(p.pgrp);
        if let Some(pid) = Pid::from_raw(p.pid) {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        reap(p.pid, Duration::from_secs(2));
    }
}

/// Reaps an orphan we adopted (not one a `std::process::Child` owns). Bounded.
pub fn reap(pid: i32, within: Duration) -> Option<Instant> {
    let pid = Pid::from_raw(pid)?;
    let deadline = Instant::now() + within;
    loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
            Ok(Some(_)) | Err(_) => return Some(Instant::now()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return None,
        }
    }
}

/// A signal and its name (`SIGHUP`).
#[derive(Clone, Debug)]
pub struct NamedSignal {
    pub sig: Signal,
    pub name: String,
}

/// Parses a signal name: `TERM`, `SIGHUP`, `usr2`…
pub fn parse_signal(s: &str) -> Result<NamedSignal, String> {
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let sig = match name {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "TERM" => Signal::TERM,
        "QUIT" => Signal::QUIT,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "WINCH" => Signal::WINCH,
        _ => {
            return Err(format!(
                "unknown signal {s:?} (HUP, INT, TERM, QUIT, USR1, USR2, WINCH)"
            ));
        }
    };
    Ok(NamedSignal {
        sig,
        name: format!("SIG{name}"),
    })
}
