//! Zero-downtime upgrades of real `grace-demo` processes: SIGHUP hands the listening socket
//! to a new process; nothing is refused or fails meanwhile; failed new processes roll back;
//! the config file is re-read; systemd's protocols (socket activation, sd_notify).
//!
//! This test process makes itself a child subreaper, so generations orphaned when their
//! parent (the previous generation) exits are re-parented here: it can reap them and read
//! their exit status, and none is left behind.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Signal, WaitOptions};

mod common;

use common::{
    BIN, Gone, PATIENCE, Service, TempDir, alive, install_real_binary, pid, read, replace_file,
    signal, subreaper, wait_gone,
};

/// [`Service::start`] with a 10 s shutdown timeout.
fn start(scratch: TempDir, program: &Path, args: &[&str]) -> Service {
    Service::start(
        scratch,
        program,
        &[&["--shutdown-timeout", "10s"][..], args].concat(),
    )
}

impl Service {
    /// `GET /` on a fresh connection.
    fn get(&self) -> String {
        let mut conn = Conn::connect(self.addr).expect("connect");
        match conn.get(true) {
            Exchange::Ok { body, .. } => body,
            other => panic!("GET / failed: {other:?}"),
        }
    }
}

/// The result of one request on a connection.
#[derive(Debug)]
enum Exchange {
    Ok {
        body: String,
        close: bool,
    },
    /// The connection failed before a single byte of the response arrived: the only case
    /// an HTTP client may retry (when the connection was a reused idle one).
    NothingReceived(std::io::Error),
    Failed(String),
}

/// A minimal HTTP/1.1 client connection, so the test sees exactly what happened on the wire.
struct Conn {
    stream: BufReader<TcpStream>,
    served: usize,
}

impl Conn {
    fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
        stream.set_read_timeout(Some(PATIENCE))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(stream),
            served: 0,
        })
    }

    fn get(&mut self, close: bool) -> Exchange {
        self.request("/", close)
    }

    fn request(&mut self, path: &str, close: bool) -> Exchange {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{connection}\r\n");
        if let Err(e) = self.stream.get_mut().write_all(req.as_bytes()) {
            return Exchange::NothingReceived(e);
        }
        match self.stream.fill_buf() {
            Ok([]) => return Exchange::NothingReceived(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(e) => return Exchange::NothingReceived(e),
        }
        // From here on, any trouble is a failed request.
        match self.read_response() {
            Ok((200, body, close)) => {
                self.served += 1;
                Exchange::Ok { body, close }
            }
            Ok((status, body, _)) => Exchange::Failed(format!("status {status}: {body:?}")),
            Err(e) => Exchange::Failed(format!("after the first byte: {e}")),
        }
    }

    fn read_response(&mut self) -> std::io::Result<(u16, String, bool)> {
        let resp = common::read_response_blocking(&mut self.stream)?;
        let closes = resp.closes();
        Ok((resp.status, resp.body, closes))
    }
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// Requests retried because a reused idle connection closed before any response byte.
    retried: u64,
    /// Connections opened.
    connections: u64,
    refused: u64,
    failures: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.retried += other.retried;
        self.connections += other.connections;
        self.refused += other.refused;
        self.failures.extend(other.failures);
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        } else if self.failures.len() == 20 {
            self.failures.push("…".into());
        }
    }
}

/// Client threads sending requests until stopped: some over keep-alive connections (every
/// other one asks for `/sleep/20`, so requests are in flight whenever a drain starts), some
/// each on a fresh connection.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Load {
    fn start(addr: SocketAddr, keep_alive: usize, fresh: usize, bodies: &[&str]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut bodies: HashSet<String> = bodies.iter().map(|s| s.to_string()).collect();
        bodies.insert(SLEPT.into());
        let bodies = Arc::new(bodies);
        let mut threads = Vec::new();
        for i in 0..keep_alive + fresh {
            let (stop, bodies) = (Arc::clone(&stop), Arc::clone(&bodies));
            let reuse = i < keep_alive;
            let path = if reuse && i % 2 == 1 {
                "/sleep/20"
            } else {
                "/"
            };
            threads.push(std::thread::spawn(move || {
                client(addr, path, reuse, &stop, &bodies)
            }));
        }
        Load { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for t in self.threads {
            total.add(t.join().expect("client thread panicked"));
        }
        total
    }
}

/// What `/sleep/20` answers.
const SLEPT: &str = "slept 20 ms\n";

fn client(
    addr: SocketAddr,
    path: &str,
    reuse: bool,
    stop: &AtomicBool,
    bodies: &HashSet<String>,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    let pause = Duration::from_millis(if reuse { 1 } else { 3 });
    while !stop.load(Ordering::Relaxed) {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match Conn::connect(addr) {
                Ok(c) => {
                    tally.connections += 1;
                    c
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tally.refused += 1;
                    tally.fail(format!("connect: {e}"));
                    continue;
                }
                Err(e) => {
                    tally.fail(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match c.request(path, !reuse) {
            Exchange::Ok { body, close } => {
                if bodies.contains(&body) {
                    tally.ok += 1;
                } else {
                    tally.fail(format!("unexpected body {body:?}"));
                }
                if reuse && !close {
                    conn = Some(c);
                }
            }
            // A reused idle connection closed under us: retry on a new one, as HTTP
            // libraries do. Anywhere else this is a failure.
            Exchange::NothingReceived(_) if c.served > 0 => tally.retried += 1,
            Exchange::NothingReceived(e) => {
                tally.fail(format!("fresh connection, nothing received: {e}"))
            }
            Exchange::Failed(e) => tally.fail(e),
        }
        std::thread::sleep(pause);
    }
    tally
}

fn assert_clean(tally: &Tally, min_ok: u64) {
    assert!(
        tally.failures.is_empty() && tally.refused == 0,
        "{} refused, failures: {:#?}",
        tally.refused,
        tally.failures
    );
    assert!(
        tally.ok >= min_ok,
        "only {} requests succeeded: the load did not run",
        tally.ok
    );
}

#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    let mut service = start(TempDir::new(), Path::new(BIN), &[]);
    let load = Load::start(service.addr, 4, 2, &["hello"]);
    // Some traffic on keep-alive connections first, so the upgrades find idle ones.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut seen = HashSet::from([service.current()]);
    for _ in 0..20 {
        let new = service.upgrade();
        assert!(seen.insert(new), "pid {new} came back");
        // Let each generation serve a little before the next upgrade.
        std::thread::sleep(Duration::from_millis(50));
    }
    let upgrades = t.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let tally = load.finish();
    eprintln!("20 upgrades in {upgrades:?}: {tally:?}");
    assert_clean(&tally, 200);
    assert!(
        tally.connections > 40,
        "too few fresh connections: {tally:?}"
    );
    assert_eq!(service.pids.len(), 21);
    // Every old generation exited cleanly (0) on its own, before we stop the last.
    service.retire_old();
    assert!(alive(service.current()));
    assert_eq!(service.get(), "hello");
    service.stop();
}

#[test]
fn a_new_process_that_exits_or_never_gets_ready_is_rolled_back() {
    let scratch = TempDir::new();
    // Upgrades start whatever is at this path now, like a binary replaced on disk.
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let child_pid = scratch.path("child.pid");
    let exits = format!("#!/bin/sh\necho $$ > {}\nexit 7\n", child_pid.display());
    // Holds the inherited sockets and the readiness pipe (they survive the exec), never
    // accepts, never says it is ready.
    let hangs = format!(
        "#!/bin/sh\necho $$ > {}\nexec sleep 60\n",
        child_pid.display()
    );
    let mut service = start(scratch, &program, &["--ready-timeout", "3s"]);
    let first = service.current();
    let load = Load::start(service.addr, 2, 1, &["hello"]);
    std::thread::sleep(Duration::from_millis(200));

    // 1. The new binary exits at start.
    replace_file(&program, &exits, true);
    let line = service.failed_upgrade(1);
    assert!(line.contains("exited with status 7"), "{line}");
    let failed: u32 = read(&child_pid).trim().parse().unwrap();
    assert!(
        !alive(failed),
        "the failed process {failed} is left (or not reaped)"
    );

    // 2. The new binary adopts the sockets, then never becomes ready: killed at the
    //    timeout, while the old one serves from the same socket throughout.
    replace_file(&program, &hangs, true);
    let line = service.failed_upgrade(2);
    assert!(line.contains("not ready within"), "{line}");
    let hung: u32 = read(&child_pid).trim().parse().unwrap();
    assert_ne!(hung, failed);
    assert!(
        !alive(hung),
        "the hung process {hung} is left (or not reaped)"
    );

    // 3. A good binary again: the upgrade goes through.
    install_real_binary(&program);
    let new = service.upgrade();
    assert_ne!(new, first);
    std::thread::sleep(Duration::from_millis(200));
    let tally = load.finish();
    eprintln!("{tally:?}");
    assert_clean(&tally, 50);
    assert_eq!(service.get(), "hello");
    service.stop();
}

#[test]
fn an_edited_config_shows_in_the_next_generation_and_a_broken_one_rolls_back() {
    let scratch = TempDir::new();
    let config = scratch.path("grace-demo.toml");
    replace_file(&config, "greeting = \"one\"\n", false);
    let config_arg = config.display().to_string();
    let mut service = start(scratch, Path::new(BIN), &["--config", &config_arg]);
    assert_eq!(service.get(), "one");

    replace_file(
        &config,
        "greeting = \"two\"\nshutdown_timeout = \"5s\"\n",
        false,
    );
    service.upgrade();
    // Once the old generation is gone, every connection reaches the new one.
    service.retire_old();
    assert_eq!(service.get(), "two");

    // Broken: the new process exits before it is ready; the old one keeps serving "two".
    let two = service.current();
    replace_file(&config, "greeting = \n", false);
    let line = service.failed_upgrade(1);
    assert!(line.contains("exited with status 1"), "{line}");
    assert!(service.stderr().contains("parsing the config file"));
    assert_eq!(service.get(), "two");
    assert_eq!(service.current(), two);

    // Fixed: the next generation reads it.
    replace_file(&config, "greeting = \"three\"\n", false);
    service.upgrade();
    service.retire_old();
    assert_eq!(service.get(), "three");
    service.stop();
}

/// Receives notifications until one satisfies `until`; returns them all.
fn notifications(
    socket: &std::os::unix::net::UnixDatagram,
    until: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t = Instant::now();
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&msg);
                got.push(msg);
                if done {
                    return got;
                }
            }
            Err(e) if t.elapsed() < PATIENCE => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                );
            }
            Err(_) => panic!("no expected notification within {PATIENCE:?}; got {got:?}"),
        }
    }
}

#[test]
fn plays_by_systemds_rules() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    use std::os::unix::process::CommandExt;

    subreaper();
    let scratch = TempDir::new();
    let log = scratch.path("stderr.log");
    // systemd's side: a notification socket (abstract name) and a listening socket.
    let name = format!("grace-test-notify-{}", std::process::id());
    let notify =
        UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();

    let db = format!("sqlite://{}?mode=rwc", scratch.path("ledger.db").display());
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so LISTEN_PID=$$ is the demo's pid, as systemd sets it.
    cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\"", BIN])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--shutdown-timeout",
            "10s",
        ])
        .current_dir(&scratch.0)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: runs between fork and exec; dup2 is async-signal-safe and nothing allocates.
    // `fd` is open in the child (the parent keeps `listener` open across spawn); the target
    // 3 may not be open yet, which dup2 allows, and the OwnedFd is never dropped.
    unsafe {
        cmd.pre_exec(move || {
            let src = std::os::fd::BorrowedFd::borrow_raw(fd);
            let mut target = std::mem::ManuallyDrop::new(OwnedFd::from_raw_fd(3));
            rustix::io::dup2(src, &mut target)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let first = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    // It serves on the socket it was given, not on --listen.
    assert_eq!(line.trim(), format!("listening on {addr}"));
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let got = notifications(&notify, |m| m == "READY=1");
    assert_eq!(got, ["READY=1"]);
    let get = || {
        let mut c = Conn::connect(addr).unwrap();
        match c.get(true) {
            Exchange::Ok { body, .. } => body,
            other => panic!("{other:?}; log:\n{}", read(&log)),
        }
    };
    assert_eq!(get(), "hello");

    // Upgrade: RELOADING=1, the new process's READY=1, then MAINPID from the old one.
    signal(first, Signal::HUP);
    let got = notifications(&notify, |m| m.starts_with("MAINPID="));
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(
        got[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{got:?}"
    );
    assert_eq!(got[1], "READY=1");
    let second: u32 = got[2]
        .strip_prefix("MAINPID=")
        .and_then(|s| s.strip_suffix("\nREADY=1"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{got:?}"));
    assert_ne!(second, first);
    // systemd's LISTEN_PID (set for the first generation) does not leak to the second: the
    // upgrade sets the child's variables on its Command, from scratch.
    let environ = std::fs::read(format!("/proc/{second}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
    assert!(
        !vars.iter().any(|v| v.starts_with(b"LISTEN_PID=")),
        "LISTEN_PID leaked"
    );
    assert!(vars.iter().any(|v| v.starts_with(b"GRACE_LISTEN_PPID=")));
    assert_eq!(get(), "hello");
    // The old one drains and exits cleanly, without claiming the service stops.
    assert_eq!(wait_gone(first, PATIENCE), Gone::Exited(Some(0)));
    drop(child);
    assert_eq!(get(), "hello");
    let mut buf = [0u8; 256];
    notify.set_nonblocking(true).unwrap();
    if let Ok(n) = notify.recv(&mut buf) {
        panic!(
            "unexpected notification {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    notify.set_nonblocking(false).unwrap();
    // Both generations adopted it under the name systemd gave it.
    assert_eq!(
        read(&log)
            .matches("adopted inherited listener fd=3 name=web")
            .count(),
        2,
        "{}",
        read(&log)
    );

    // Stop: STOPPING=1 from the new main process.
    signal(second, Signal::TERM);
    let got = notifications(&notify, |m| m == "STOPPING=1");
    assert_eq!(got, ["STOPPING=1"]);
    assert_eq!(wait_gone(second, PATIENCE), Gone::Exited(Some(0)));
    drop(listener);
}

#[test]
fn a_long_response_on_the_old_process_finishes_while_the_new_one_takes_new_connections() {
    let scratch = TempDir::new();
    let config = scratch.path("grace-demo.toml");
    replace_file(&config, "greeting = \"old\"\n", false);
    let config_arg = config.display().to_string();
    let mut service = start(scratch, Path::new(BIN), &["--config", &config_arg]);
    let old = service.current();

    // A streamed response of 50 chunks, 100 ms apart: ~5 s on the old process.
    let mut stream = Conn::connect(service.addr).unwrap();
    stream
        .stream
        .get_mut()
        .write_all(b"GET /stream/50 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(!stream.stream.fill_buf().unwrap().is_empty());

    replace_file(&config, "greeting = \"new\"\n", false);
    service.upgrade();
    // Once the new process is ready, the old one stops accepting: every new connection
    // reaches the new process, while the old one still streams. (Both accept on the shared
    // socket until the old one has closed its listeners: a first "new" may come while the
    // old one still takes a connection or two, so the test waits for that point.)
    let t = Instant::now();
    while service.get() != "new" {
        assert!(
            t.elapsed() < PATIENCE,
            "the old process still takes connections"
        );
    }
    service.wait_log("listeners closed", 1);
    for _ in 0..20 {
        assert_eq!(service.get(), "new");
    }
    assert!(alive(old), "the old process did not wait for its response");

    let mut body = String::new();
    stream.stream.read_to_string(&mut body).unwrap();
    assert_eq!(body.matches("chunk ").count(), 50, "{body}");
    assert!(body.ends_with("0\r\n\r\n"), "the stream was cut: {body:?}");
    service.retire_old();
    service.stop();
}

/// Live processes (not zombies) whose command line mentions `dir`: every generation of a
/// service started in it (their `--db` and `--pid-file` are under it), and anything they
/// started with the same arguments.
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push(pid);
        }
    }
    found
}

/// Whether anything accepts on `addr`.
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

/// Issue 9, item 1: `kill -HUP $P; kill -TERM $P` (an upgrade racing a stop), many rounds,
/// with and without a pre-stop delay. After each: no process of the service is left,
/// nothing listens on its port, and the pid file is gone or names a live process. When the
/// upgrade won the race (the new process was ready before the stop arrived), the stop
/// reached a process that was already leaving: the new generation serves, and stopping
/// it must end the service the same way.
#[test]
fn a_stop_racing_an_upgrade_never_leaves_a_generation_behind() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut stopped_with_it, mut upgrade_won) = (0, 0);
    for round in 0..40 {
        let pre_stop = if round % 2 == 0 { "0s" } else { "300ms" };
        let service = start(
            TempDir::new(),
            Path::new(BIN),
            &["--pre-stop-delay", pre_stop, "--ready-timeout", "20s"],
        );
        let dir = service.scratch.0.clone();
        let (addr, old) = (service.addr, service.current());
        // Between the two signals: nothing, or a few milliseconds (the new process starts).
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let gap = Duration::from_millis(rng % 4 * 5);
        signal(old, Signal::HUP);
        std::thread::sleep(gap);
        signal(old, Signal::TERM);
        let gone = wait_gone(old, PATIENCE);
        assert_eq!(
            gone,
            Gone::Exited(Some(0)),
            "round {round}: {}",
            service.stderr()
        );
        // Whatever is left must be one live generation named by the pid file, or nothing.
        let left = processes_under(&dir);
        let log = service.stderr();
        match service.pid() {
            Some(p) if p != old => {
                // Only an upgrade that completed before the stop may leave a generation.
                assert!(
                    log.contains("\"trigger\":\"restart\""),
                    "round {round}: {log}"
                );
                assert!(
                    alive(p),
                    "round {round}: the pid file names {p}, which is gone"
                );
                assert_eq!(
                    left,
                    [p],
                    "round {round}: more than the new generation left"
                );
                assert!(
                    listening(addr),
                    "round {round}: the new generation does not serve"
                );
                upgrade_won += 1;
                signal(p, Signal::TERM);
                assert_eq!(
                    wait_gone(p, PATIENCE),
                    Gone::Exited(Some(0)),
                    "round {round}"
                );
            }
            Some(p) => panic!("round {round}: the pid file names the exited process {p}"),
            None => {
                assert!(
                    log.contains("\"trigger\":\"SIGTERM\""),
                    "round {round}: {log}"
                );
                stopped_with_it += 1;
            }
        }
        for p in processes_under(&dir) {
            let _ = wait_gone(p, PATIENCE);
        }
        assert!(
            processes_under(&dir).is_empty(),
            "round {round}: processes left: {:?}\n{}",
            processes_under(&dir),
            service.stderr()
        );
        assert!(
            !listening(addr),
            "round {round}: something still listens on {addr}"
        );
        assert_eq!(
            service.pid(),
            None,
            "round {round}: the pid file outlived the service"
        );
        let mut service = service;
        service.retired.insert(old);
    }
    eprintln!("stop won {stopped_with_it} rounds, the upgrade {upgrade_won}");
    assert!(stopped_with_it > 0, "the race was never run");
}

/// Issue 9, item 7: a new binary that starts a background process (which inherits the
/// listening socket) and exits is rolled back with its whole process group, so once the
/// service stops, clients are refused instead of hanging on a socket nobody serves.
#[test]
fn a_rollback_ends_what_the_failed_process_started() {
    let scratch = TempDir::new();
    let program = scratch.path("grace-demo");
    install_real_binary(&program);
    let bg_pid = scratch.path("bg.pid");
    let forks = format!(
        "#!/bin/sh\nsleep 60 &\necho $! > {}\nexit 1\n",
        bg_pid.display()
    );
    let mut service = start(scratch, &program, &["--ready-timeout", "10s"]);
    replace_file(&program, &forks, true);
    let line = service.failed_upgrade(1);
    assert!(line.contains("exited with status 1"), "{line}");
    let bg: u32 = read(&bg_pid).trim().parse().unwrap();
    // The background process was in the failed process's group: it is gone too (it is
    // our child now, as a subreaper, so reap it).
    let t = Instant::now();
    while alive(bg) {
        let _ = rustix::process::waitpid(Some(pid(bg)), WaitOptions::NOHANG);
        assert!(
            t.elapsed() < PATIENCE,
            "background process {bg} survived the rollback"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let addr = service.addr;
    assert_eq!(service.get(), "hello");
    let old = service.current();
    signal(old, Signal::TERM);
    service.retire(1);
    let refused = TcpStream::connect_timeout(&addr, PATIENCE);
    assert!(
        refused.is_err(),
        "a connection was accepted after the service stopped"
    );
}

/// Runs the demo as if an upgrade had started it: the listening socket at fd 3, the
/// readiness pipe at fd 4, `GRACE_LISTEN_PPID` naming `parent`. Returns its exit code and
/// what it printed on stderr.
fn run_as_new_generation(parent: u32, read_end_open: bool) -> (Option<i32>, String) {
    let scratch = TempDir::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (read_end, write_end) = rustix::pipe::pipe().unwrap();
    let reader = read_end_open.then_some(read_end);
    let db = format!("sqlite://{}?mode=rwc", scratch.path("ledger.db").display());
    // The shell lays the descriptors out (dup'ing stdin and stdout to 3 and 4), then execs.
    let mut out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec 3<&0 4>&1 0</dev/null 1>/dev/null; exec {BIN} --listen 127.0.0.1:0 --db '{db}'"
        ))
        .current_dir(&scratch.0)
        .env("LISTEN_FDS", "1")
        .env("GRACE_LISTEN_PPID", parent.to_string())
        .env("GRACE_READY_FD", "4")
        .env("RUST_LOG", "info")
        .stdin(std::os::fd::OwnedFd::from(listener))
        .stdout(write_end)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: one that serves instead of exiting fails the test rather than hanging it.
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(status) = out.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > PATIENCE {
            let _ = out.kill();
            let _ = out.wait();
            panic!("the new generation still runs after {PATIENCE:?}: it did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(reader);
    let mut stderr = String::new();
    out.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

/// Issue 9, item 1: a new process that cannot report ready (its starter gave up on it and
/// closed the pipe) exits instead of serving.
#[test]
fn a_new_generation_that_cannot_report_ready_exits() {
    let (code, stderr) = run_as_new_generation(std::process::id(), false);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("gave up on us"), "{stderr}");
}

/// Issue 9, item 1: a new process whose starter died before it adopted the sockets exits,
/// instead of binding `--listen` elsewhere and holding the inherited socket unserved.
#[test]
fn a_new_generation_whose_starter_is_gone_exits() {
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let (code, stderr) = run_as_new_generation(dead, true);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("which is gone"), "{stderr}");
}

/// Issue 12: under systemd's watchdog (`WATCHDOG_USEC`) the demo pings `WATCHDOG=1` at half
/// the interval; a stop says `STOPPING=1` and how long it may take (`EXTEND_TIMEOUT_USEC`),
/// so a drain longer than `TimeoutStopSec` is not killed half-way.
#[test]
fn pings_the_watchdog_and_extends_the_stop_timeout() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let scratch = TempDir::new();
    let name = format!("grace-test-watchdog-{}", std::process::id());
    let notify =
        UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let db = format!("sqlite://{}?mode=rwc", scratch.path("ledger.db").display());
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--shutdown-timeout",
            "20s",
        ])
        .current_dir(&scratch.0)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let got = notifications(&notify, |m| m == "READY=1");
    assert_eq!(got.last().map(String::as_str), Some("READY=1"));
    // Two pings, about 200 ms apart.
    let t = Instant::now();
    notifications(&notify, |m| m == "WATCHDOG=1");
    notifications(&notify, |m| m == "WATCHDOG=1");
    assert!(t.elapsed() < PATIENCE);
    signal(child.id(), Signal::TERM);
    let got = notifications(&notify, |m| m.starts_with("EXTEND_TIMEOUT_USEC="));
    assert!(got.iter().any(|m| m == "STOPPING=1"), "{got:?}");
    let usec: u64 = got.last().unwrap()["EXTEND_TIMEOUT_USEC=".len()..]
        .parse()
        .unwrap();
    // The 20 s shutdown timeout plus the resources' close timeouts.
    assert!((20_000_000..=60_000_000).contains(&usec), "{usec}");
    assert!(child.wait().unwrap().success());
}
