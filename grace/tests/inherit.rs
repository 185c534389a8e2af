//! Issue 22, item 5: `inherited_listeners` in real processes started as `systemfd --no-pid`
//! starts them (`LISTEN_FDS=1`, no `LISTEN_PID`): a listening socket at fd 3 is adopted; a
//! descriptor there that is not one is refused with a typed error, left open and
//! untouched, and the process goes on (no abort).
//!
//! The processes are this test binary again, running only [`child`] (with `CHILD` set); the
//! shell lays out fd 3 before it execs them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// Set in the processes the tests start: what [`child`] is to do.
const CHILD: &str = "GRACE_TEST_INHERIT_CHILD";

/// Not a test of its own: the body of the processes the tests below start. Adopts what was
/// inherited and prints what it got, then what fd 3 is afterwards.
#[test]
fn child() {
    let Ok(mode) = std::env::var(CHILD) else {
        return;
    };
    // "own": fd 3 is a file this process opened itself (close-on-exec, as Rust opens every
    // descriptor), as a runtime's epoll is when nothing was passed at all.
    let own = (mode == "own").then(|| {
        // The lowest free number: 3, as nothing is open there.
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(null.as_raw_fd(), 3, "fd 3 was not free");
        null
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(async { grace_http::inherited_listeners() }) {
        Ok(Some(inherited)) => {
            for (listener, name) in inherited.listeners() {
                println!("adopted {name} {}", listener.local_addr().unwrap());
            }
        }
        Ok(None) => println!("nothing"),
        Err(e) => {
            println!("error: {e}");
            if let grace_http::Error::InheritedFd { fd, source, .. } = &e {
                println!("refused {fd}: {source:?}");
            }
        }
    }
    let fd3 = std::fs::read_link("/proc/self/fd/3");
    println!(
        "fd3 {}",
        fd3.map_or("closed".into(), |p| p.display().to_string())
    );
    // Closing our own descriptor: had the adoption closed it already, this would abort
    // (a debug build checks: "IO Safety violation: owned file descriptor already closed").
    drop(own);
    drop(runtime);
    println!("clean");
}

/// Runs [`child`] in a new process as `mode`, after `setup` (shell) laid out fd 3 from
/// `stdin`, with `LISTEN_FDS=1` and `LISTEN_PID` set to its pid if `listen_pid`: its exit
/// status and what it printed.
fn run(
    mode: &str,
    setup: &str,
    stdin: Stdio,
    listen_pid: bool,
) -> (std::process::ExitStatus, String) {
    let pid = if listen_pid {
        "; export LISTEN_PID=$$"
    } else {
        ""
    };
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{setup}{pid}; exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"]);
    for var in [
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "GRACE_LISTEN_PPID",
        "GRACE_READY_FD",
        "GRACE_HANDOVER_FD",
        "GRACE_CONTROL_FD",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd
        .env(CHILD, mode)
        .env("LISTEN_FDS", "1")
        .stdin(stdin)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status, said)
}

#[test]
fn without_listen_pid_a_listening_socket_at_fd_3_is_adopted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stdin = Stdio::from(OwnedFd::from(listener));
    let (status, said) = run("adopt", "exec 3<&0 0</dev/null", stdin, false);
    assert!(status.success(), "{status}: {said}");
    assert!(said.contains(&format!("adopted grace {addr}\n")), "{said}");
    assert!(said.contains("clean"), "{said}");
}

#[test]
fn a_file_at_fd_3_is_refused_with_a_typed_error_and_left_open() {
    let path = std::env::temp_dir().join(format!("grace-inherit-file-{}", std::process::id()));
    std::fs::write(&path, "data\n").unwrap();
    let setup = format!("exec 3<'{}'", path.display());
    let (status, said) = run("file", &setup, Stdio::null(), false);
    std::fs::remove_file(&path).unwrap();
    assert!(status.success(), "{status}: {said}");
    assert!(
        said.contains(
            "error: cannot adopt inherited descriptor 3 (listener \"grace\" of LISTEN_FDS): \
             it is a regular file, not a socket\n"
        ),
        "{said}"
    );
    assert!(said.contains("refused 3: NotASocket"), "{said}");
    // Still open, still the file.
    assert!(
        said.contains(&format!("fd3 {}\n", path.display())),
        "{said}"
    );
}

/// The reported abort: `LISTEN_FDS=1` (with `LISTEN_PID`, so it was taken before too) and
/// fd 3 the process's own. It was taken, found not to be a socket and closed, and its owner's
/// close then aborted the process.
#[test]
fn a_descriptor_the_process_opened_itself_is_refused_not_closed() {
    for listen_pid in [true, false] {
        let (status, said) = run("own", "exec 3<&-", Stdio::null(), listen_pid);
        assert!(status.success(), "{status}: {said}");
        assert!(
            said.contains("it was opened by this process (it is close-on-exec), not passed to it"),
            "{said}"
        );
        assert!(said.contains("refused 3: NotInherited"), "{said}");
        assert!(said.contains("fd3 /dev/null\nclean"), "{said}");
    }
}

#[test]
fn a_listen_pid_naming_another_process_leaves_fd_3_alone() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stdin = Stdio::from(OwnedFd::from(listener));
    // `$PPID`: the shell's parent, this test process.
    let setup = "exec 3<&0 0</dev/null; export LISTEN_PID=$PPID";
    let (status, said) = run("other", setup, stdin, false);
    assert!(status.success(), "{status}: {said}");
    assert!(said.contains("nothing\n"), "{said}");
    assert!(said.contains("fd3 socket:"), "{said}");
}
