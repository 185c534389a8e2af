//! The receiving side: adopt listeners (and a readiness pipe) that systemd or the previous
//! generation of this program passed as inherited file descriptors.
//!
//! The variables, after systemd's socket activation:
//!
//! | variable            | meaning                                                         |
//! |---------------------|-----------------------------------------------------------------|
//! | `LISTEN_FDS`        | how many listening sockets, at descriptors 3, 4, …              |
//! | `LISTEN_FDNAMES`    | their names, `:`-separated (optional)                           |
//! | `LISTEN_PID`        | the process they are meant for (systemd sets it; see below)     |
//! | `GRACE_LISTEN_PPID` | instead of `LISTEN_PID`: meant for the child of this process    |
//! | `GRACE_READY_FD`    | a pipe to write to once serving (a grace restart sets it)       |
//! | `GRACE_HANDOVER_FD` | a socket on which connections are handed over (see `handover`)  |
//! | `GRACE_CONTROL_FD`  | the control socket's listening socket (see `control`)           |
//!
//! Without `LISTEN_PID` nor `GRACE_LISTEN_PPID`, `LISTEN_FDS` (and `LISTEN_FDNAMES`) are
//! taken as this process's, as listenfd does: `systemfd --no-pid` starts `cargo watch`,
//! which starts cargo, which starts the program, so no pid can be named. The other
//! variables come only with a restart's `GRACE_LISTEN_PPID` (or `LISTEN_PID`).
//!
//! `LISTEN_PID` guards against a grandchild adopting descriptors that were never meant for
//! it. The old process of a restart cannot know its child's pid when it builds the child's
//! environment (that happens before `fork`, and setting a variable between `fork` and
//! `exec` is not async-signal-safe), so it sets `GRACE_LISTEN_PPID=<its own pid>` instead:
//! only a process whose parent has that pid accepts the descriptors. That is exactly as
//! strict, since a grandchild's parent is not the old process.

use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::SocketType;

use crate::error::{Error, InheritedFdError, Result};
use crate::listener::{self, Listener};
use crate::sys;

pub(crate) const LISTEN_FDS: &str = "LISTEN_FDS";
pub(crate) const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
pub(crate) const LISTEN_PID: &str = "LISTEN_PID";
pub(crate) const GRACE_LISTEN_PPID: &str = "GRACE_LISTEN_PPID";
pub(crate) const GRACE_READY_FD: &str = "GRACE_READY_FD";
/// The socket on which the previous generation hands its idle connections over (see
/// `crate::handover`); this generation says it takes them in its ready message.
pub(crate) const GRACE_HANDOVER_FD: &str = "GRACE_HANDOVER_FD";
/// The control socket's listener, passed apart from the others (it is not served as HTTP).
pub(crate) const GRACE_CONTROL_FD: &str = "GRACE_CONTROL_FD";
/// The listeners (by index, comma-separated) whose socket files go with them: the receiving
/// generation removes them when it stops for good.
pub(crate) const GRACE_SOCKET_FILES: &str = "GRACE_SOCKET_FILES";
/// Which generation of the service the new process is (the old one's plus one).
pub(crate) const GRACE_GENERATION: &str = "GRACE_GENERATION";

/// Said after "ready <pid>" by a generation that receives connections on the hand-over
/// socket. A program built with an older grace does not say it, and is handed none.
pub(crate) const TAKES_CONNECTIONS: &str = "takes-connections";

/// The first inherited descriptor, as in `SD_LISTEN_FDS_START`.
pub(crate) const FIRST_FD: RawFd = 3;

/// Set by the first call that adopts the inherited descriptors. They are a fact of the
/// whole process (numbers named in its environment), so this one flag is process-wide: a
/// second adoption would make two owners of one descriptor. The environment itself is never
/// changed (that is not sound once threads run); processes we start are given their own
/// variables on their `Command`, and a grandchild is told apart by its pid or parent.
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// The variables as read from the environment.
#[derive(Debug, Default, Clone)]
pub(crate) struct Vars {
    pub(crate) listen_fds: Option<String>,
    pub(crate) listen_fdnames: Option<String>,
    pub(crate) listen_pid: Option<String>,
    pub(crate) listen_ppid: Option<String>,
    pub(crate) ready_fd: Option<String>,
    pub(crate) handover_fd: Option<String>,
    pub(crate) control_fd: Option<String>,
    pub(crate) socket_files: Option<String>,
}

/// What the variables say this process inherited.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Listening sockets at `FIRST_FD..FIRST_FD + count`.
    pub(crate) count: usize,
    /// One name per socket.
    pub(crate) names: Vec<String>,
    pub(crate) ready_fd: Option<RawFd>,
    /// The hand-over socket (only with a readiness pipe: an upgrade).
    pub(crate) handover_fd: Option<RawFd>,
    /// The control socket (only with a readiness pipe: an upgrade).
    pub(crate) control_fd: Option<RawFd>,
    /// Per socket: its file goes with it (see [`GRACE_SOCKET_FILES`]).
    pub(crate) owns_file: Vec<bool>,
}

impl Vars {
    fn read() -> Vars {
        let var = |k| std::env::var(k).ok();
        Vars {
            listen_fds: var(LISTEN_FDS),
            listen_fdnames: var(LISTEN_FDNAMES),
            listen_pid: var(LISTEN_PID),
            listen_ppid: var(GRACE_LISTEN_PPID),
            ready_fd: var(GRACE_READY_FD),
            handover_fd: var(GRACE_HANDOVER_FD),
            control_fd: var(GRACE_CONTROL_FD),
            socket_files: var(GRACE_SOCKET_FILES),
        }
    }

    fn is_empty(&self) -> bool {
        self.listen_fds.is_none() && self.ready_fd.is_none()
    }

    /// Who the variables say the descriptors are for, as it concerns `pid`.
    fn sender(&self, pid: u32, ppid: Option<u32>) -> Option<Sender> {
        let parse_pid = |s: &str| s.trim().parse::<u32>().ok();
        match (&self.listen_pid, &self.listen_ppid) {
            (Some(p), _) => (parse_pid(p) == Some(pid)).then_some(Sender::Named),
            (None, Some(pp)) => (ppid.is_some() && parse_pid(pp) == ppid).then_some(Sender::Named),
            // `systemfd --no-pid`: no one named, so the process that reads them, as
            // listenfd takes them. Only the listening sockets: the rest is a restart's.
            (None, None) => self.listen_fds.is_some().then_some(Sender::Unnamed),
        }
    }

    /// Decides, without touching any descriptor. `None`: nothing is meant for `pid`.
    pub(crate) fn plan(&self, pid: u32, ppid: Option<u32>) -> Result<Option<Plan>> {
        let Some(sender) = self.sender(pid, ppid) else {
            if !self.is_empty() {
                tracing::debug!(
                    pid,
                    listen_pid = ?self.listen_pid,
                    grace_listen_ppid = ?self.listen_ppid,
                    "inherited descriptors are meant for another process; ignored"
                );
            }
            return Ok(None);
        };
        let count = match &self.listen_fds {
            None => 0,
            Some(n) => n
                .trim()
                .parse::<usize>()
                .map_err(|_| Error::Inherit(format!("{LISTEN_FDS} is not a number: {n:?}")))?,
        };
        if count > sys::MAX_PASSED_FDS {
            return Err(Error::Inherit(format!(
                "{LISTEN_FDS}={count} is more than this library adopts ({})",
                sys::MAX_PASSED_FDS
            )));
        }
        let (mut ready_fd, mut handover_fd, mut control_fd) = (None, None, None);
        if sender == Sender::Named {
            ready_fd = after_listeners(GRACE_READY_FD, &self.ready_fd, count, &[])?;
        }
        // The hand-over and control sockets come only with a readiness pipe: an upgrade.
        if let Some(ready) = ready_fd {
            handover_fd = after_listeners(GRACE_HANDOVER_FD, &self.handover_fd, count, &[ready])?;
            let taken: Vec<RawFd> = [Some(ready), handover_fd].into_iter().flatten().collect();
            control_fd = after_listeners(GRACE_CONTROL_FD, &self.control_fd, count, &taken)?;
        }
        let socket_files = match sender {
            Sender::Named => self.socket_files.as_deref(),
            Sender::Unnamed => None,
        };
        Ok(Some(Plan {
            count,
            names: names(self.listen_fdnames.as_deref(), count),
            ready_fd,
            handover_fd,
            control_fd,
            owns_file: owns_file(socket_files, count),
        }))
    }
}

/// Who passed the descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// systemd (`LISTEN_PID` is our pid) or a grace upgrade (`GRACE_LISTEN_PPID` is our
    /// parent's).
    Named,
    /// Neither variable: `systemfd --no-pid` and the like.
    Unnamed,
}

/// The descriptor `value` of `var` names, which must come after the `count` listeners and
/// be none of `taken`.
fn after_listeners(
    var: &str,
    value: &Option<String>,
    count: usize,
    taken: &[RawFd],
) -> Result<Option<RawFd>> {
    let Some(s) = value else { return Ok(None) };
    match s.trim().parse::<RawFd>() {
        Ok(fd) if fd >= FIRST_FD + count as RawFd && !taken.contains(&fd) => Ok(Some(fd)),
        _ => Err(Error::Inherit(format!(
            "{var} is not a descriptor after the listeners: {s:?}"
        ))),
    }
}

/// One name per listener, from `LISTEN_FDNAMES` if it names every one.
fn names(listen_fdnames: Option<&str>, count: usize) -> Vec<String> {
    let names: Vec<String> = match listen_fdnames {
        Some(s) if !s.is_empty() => s.split(':').map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    if names.len() == count {
        return names;
    }
    if !names.is_empty() {
        tracing::warn!(
            count,
            names = names.len(),
            "{LISTEN_FDNAMES} does not name every descriptor; names ignored"
        );
    }
    vec![super::DEFAULT_NAME.to_owned(); count]
}

/// Per listener: whether its socket file goes with it (see [`GRACE_SOCKET_FILES`]).
fn owns_file(socket_files: Option<&str>, count: usize) -> Vec<bool> {
    let mut owns_file = vec![false; count];
    for i in socket_files.iter().flat_map(|s| s.split(',')) {
        if let Some(owned) = i
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|i| owns_file.get_mut(i))
        {
            *owned = true;
        }
    }
    owns_file
}

fn ppid() -> Option<u32> {
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
}

fn alive(pid: u32) -> bool {
    rustix::process::Pid::from_raw(pid as i32)
        .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
}

/// What this process inherited: listening sockets, each with its name (`LISTEN_FDNAMES`),
/// and, when a grace upgrade started it, the pipe on which the previous generation waits
/// to hear that this one is ready. Hand it whole to [`Server::from_inherited`](crate::Server::from_inherited):
/// the server reports ready on the pipe when it starts serving, and passes the names on at
/// the next upgrade.
#[derive(Debug)]
pub struct Inherited {
    pub(crate) listeners: Vec<(Listener, String, bool)>,
    pub(crate) ready: Option<OwnedFd>,
    /// The hand-over socket, from an upgrade whose old generation passes connections.
    pub(crate) handover: Option<OwnedFd>,
    /// Set by a grace upgrade: the old generation's plus one.
    pub(crate) generation: Option<u32>,
    /// The previous generation's control socket (see `control`).
    pub(crate) control: Option<tokio::net::UnixListener>,
}

impl Inherited {
    /// The listeners and their names.
    pub fn listeners(&self) -> impl Iterator<Item = (&Listener, &str)> {
        self.listeners.iter().map(|(l, n, _)| (l, n.as_str()))
    }

    /// Takes the first listener named `name` out, for a service of its own
    /// ([`Serve::also_serve`](crate::Serve::also_serve)): the server made
    /// [`from_inherited`](crate::Server::from_inherited) serves the others. `None` if no
    /// listener has that name (the first generation, or a socket systemd was not told to
    /// pass): bind it then.
    ///
    /// The file of a Unix-domain socket taken out stays where it is when the service stops
    /// for good: it is the caller's, as for any listener given to `also_serve`.
    ///
    /// ```no_run
    /// # async fn doc() -> Result<(), Box<dyn std::error::Error>> {
    /// use grace_http::{Listener, Server};
    /// let mut inherited = grace_http::inherited_listeners()?;
    /// // The admin socket of the previous generation, or a new one the first time.
    /// let admin = match inherited.as_mut().and_then(|i| i.take("admin")) {
    ///     Some(listener) => listener,
    ///     None => Listener::bind("127.0.0.1:9090".parse()?)?,
    /// };
    /// let server = match inherited {
    ///     Some(inherited) => Server::from_inherited(inherited),
    ///     None => Server::bind("0.0.0.0:8080").await?,
    /// };
    /// # let _ = (admin, server); Ok(()) }
    /// ```
    pub fn take(&mut self, name: &str) -> Option<Listener> {
        let i = self.listeners.iter().position(|(_, n, _)| n == name)?;
        let (listener, _, _) = self.listeners.remove(i);
        Some(listener)
    }

    /// True when a grace upgrade started this process (the previous generation waits for
    /// it to be ready), false under systemd's socket activation.
    pub fn is_upgrade(&self) -> bool {
        self.ready.is_some()
    }
}

/// Adopts the listening sockets this process inherited, from systemd's socket activation,
/// from `systemfd` (`systemfd --no-pid -s http::8080 -- cargo watch -x run`), or from the
/// previous generation of this program during a zero-downtime upgrade.
///
/// Returns `Ok(None)` when nothing was passed to this process (`LISTEN_FDS` unset, or meant
/// for another process: `LISTEN_PID` is not ours), or when an earlier call adopted them.
/// Without `LISTEN_PID` (nor a restart's `GRACE_LISTEN_PPID`), the sockets are taken as
/// this process's, as listenfd does: that is what `systemfd --no-pid` passes.
///
/// Each descriptor is checked before it is taken: open, inherited (not close-on-exec: this
/// process did not open it itself), and a listening stream socket, TCP or Unix-domain. One
/// that is not fails the call with [`Error::InheritedFd`], saying what it is instead, and is
/// left as it is (whoever owns it keeps it intact). The adopted descriptors are made
/// close-on-exec; the environment is left as it is. Fails too when the variables are
/// malformed, or when this process was started by an upgrade whose old process is gone (it
/// would otherwise serve on a socket nobody waits for).
///
/// A process started by this one inherits the variables (not the descriptors, which are
/// close-on-exec once adopted): with `LISTEN_PID` or a restart's variables it does not take
/// them as its own, but without (`systemfd --no-pid`), a child that adopts inherited
/// sockets too (one built with grace or listenfd) would find a number that is not a
/// listener and refuse to start: remove `LISTEN_FDS` from its environment
/// (`Command::env_remove`).
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::Error> {
/// let server = match grace_http::inherited_listeners()? {
///     Some(inherited) => grace_http::Server::from_inherited(inherited),
///     None => grace_http::Server::bind("127.0.0.1:8080").await?,
/// };
/// # let _ = server; Ok(()) }
/// ```
pub fn inherited_listeners() -> Result<Option<Inherited>> {
    let vars = Vars::read();
    if vars.is_empty() {
        return Ok(None);
    }
    let Some(plan) = vars.plan(std::process::id(), ppid())? else {
        // Meant for the child of `old`, which we are not. A grandchild (started by a later
        // generation) does not have the readiness pipe open: it was close-on-exec there.
        // An orphan whose starting process died before it got here does: it must not serve.
        let old = vars
            .listen_ppid
            .as_deref()
            .and_then(|p| p.trim().parse().ok());
        let pipe = vars.ready_fd.as_deref().and_then(|p| p.trim().parse().ok());
        if let (Some(old), Some(pipe), None) = (old, pipe, &vars.listen_pid) {
            if !alive(old) && sys::is_open(pipe) {
                return Err(Error::Inherit(format!(
                    "started by an upgrade of process {old}, which is gone: not serving"
                )));
            }
        }
        return Ok(None);
    };
    // Acquire/Release would add nothing: the flag guards ownership of numbers, not data.
    if ADOPTED.swap(true, Ordering::Relaxed) {
        return Ok(None);
    }
    let ready = match plan.ready_fd {
        Some(fd) => Some(adopt(fd, || GRACE_READY_FD.to_owned(), is_pipe)?.0),
        None => None,
    };
    // Not passed after all, or not of its kind: no hand-over, nothing worse.
    let handover = plan.handover_fd.and_then(adopt_handover);
    // Likewise: no control socket passed, this one binds its own.
    let control = plan.control_fd.and_then(adopt_control);
    let listeners = adopt_listeners(plan.names, plan.owns_file)?;
    let generation = ready.as_ref().and_then(|_| {
        let g = std::env::var(GRACE_GENERATION).ok()?;
        g.trim().parse().ok()
    });
    Ok(Some(Inherited {
        listeners,
        ready,
        handover,
        generation,
        control,
    }))
}

/// Takes descriptor `fd`, passed as `what`, once `check` has accepted it (see
/// [`sys::adopt_inherited`]: a refused one is left as it is).
fn adopt<T>(
    fd: RawFd,
    what: impl FnOnce() -> String,
    check: impl FnOnce(BorrowedFd<'_>) -> std::result::Result<T, InheritedFdError>,
) -> Result<(OwnedFd, T)> {
    sys::adopt_inherited(fd, check).map_err(|source| Error::InheritedFd {
        fd,
        what: what(),
        source,
    })
}

/// A descriptor a restart may pass or not (the hand-over and control sockets): not open, or
/// not what it should be, means none was passed (the latter is logged).
fn optional<T>(adopted: Result<(OwnedFd, T)>) -> Option<(OwnedFd, T)> {
    match adopted {
        Ok(a) => Some(a),
        Err(Error::InheritedFd {
            source: InheritedFdError::NotOpen,
            ..
        }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignored");
            None
        }
    }
}

/// The hand-over socket (see `crate::handover`), if it is one.
fn adopt_handover(fd: RawFd) -> Option<OwnedFd> {
    let check = |fd: BorrowedFd<'_>| {
        let expected = "a Unix-domain seqpacket socket";
        listener::check_socket(fd, SocketType::SEQPACKET, expected)?;
        match listener::address_family(fd) {
            Ok(rustix::net::AddressFamily::UNIX) => Ok(()),
            Ok(_) => Err(InheritedFdError::WrongKind {
                found: "a seqpacket socket of another domain".to_owned(),
                expected,
            }),
            Err(e) => Err(InheritedFdError::Inspect(e.into())),
        }
    };
    optional(adopt(fd, || GRACE_HANDOVER_FD.to_owned(), check)).map(|(fd, ())| fd)
}

/// The previous generation's control socket, if it is a listening Unix socket.
fn adopt_control(fd: RawFd) -> Option<tokio::net::UnixListener> {
    let check = |fd: BorrowedFd<'_>| listener::check_listening(fd, true);
    let (fd, _) = optional(adopt(fd, || GRACE_CONTROL_FD.to_owned(), check))?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    let adopted = listener.set_nonblocking(true);
    match adopted.and_then(|()| tokio::net::UnixListener::from_std(listener)) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "{GRACE_CONTROL_FD}: ignored");
            None
        }
    }
}

/// The readiness pipe is the write end of a pipe.
fn is_pipe(fd: BorrowedFd<'_>) -> std::result::Result<(), InheritedFdError> {
    match listener::file_type(fd)? {
        rustix::fs::FileType::Fifo => Ok(()),
        other => Err(InheritedFdError::WrongKind {
            found: listener::describe(other).to_owned(),
            expected: "a pipe",
        }),
    }
}

/// The listening sockets at 3, 4, …, each checked before it is taken.
fn adopt_listeners(names: Vec<String>, owns: Vec<bool>) -> Result<Vec<(Listener, String, bool)>> {
    let mut listeners = Vec::with_capacity(names.len());
    for ((i, name), owns_file) in names.into_iter().enumerate().zip(owns) {
        let fd = FIRST_FD + i as RawFd;
        let what = || format!("listener {name:?} of {LISTEN_FDS}");
        let (owned, family) = adopt(fd, what, |fd| listener::check_listening(fd, false))?;
        let listener = Listener::from_checked(owned, family)
            .map_err(|e| Error::Inherit(format!("descriptor {fd} ({name}): {e}")))?;
        match listener.local_addr() {
            Ok(addr) => tracing::info!(fd, %name, %addr, "adopted inherited listener"),
            Err(_) => tracing::info!(fd, %name, "adopted inherited listener"),
        }
        listeners.push((listener, name, owns_file));
    }
    Ok(listeners)
}

/// Passes this server's control socket, if it answers on one, to the new process `cmd` of
/// an upgrade, after the descriptors already in `fds`. Returns the socket: keep it until
/// the process has started.
pub(crate) fn pass_control(
    shared: &crate::shutdown::Shared,
    fds: &mut Vec<RawFd>,
    cmd: &mut std::process::Command,
) -> Option<std::sync::Arc<tokio::net::UnixListener>> {
    cmd.env_remove(GRACE_CONTROL_FD);
    let socket = shared.control.to_pass()?;
    cmd.env(
        GRACE_CONTROL_FD,
        (FIRST_FD + fds.len() as RawFd).to_string(),
    );
    fds.push(socket.as_raw_fd());
    Some(socket)
}

/// Tells the process that started us that we are ready, and closes the pipe. An error
/// means it no longer listens (it gave up on us and is killing us): we must not serve.
/// `takes_connections`: we receive connections on the hand-over socket (see `handover`), so
/// the previous generation may pass its idle ones rather than close them.
pub(crate) fn signal_ready(pipe: OwnedFd, takes_connections: bool) -> Result<()> {
    let mut pipe = std::fs::File::from(pipe);
    let pid = std::process::id();
    // One write, shorter than PIPE_BUF: read whole by the other side.
    let msg = match takes_connections {
        true => format!("ready {pid} {TAKES_CONNECTIONS}\n"),
        false => format!("ready {pid}\n"),
    };
    pipe.write_all(msg.as_bytes()).map_err(|e| {
        Error::Inherit(format!(
            "cannot tell the previous generation that we are ready ({e}): it gave up on us"
        ))
    })?;
    tracing::debug!(
        fd = pipe.as_raw_fd(),
        "told the previous generation we are ready"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(fds: &str, names: Option<&str>, pid: Option<&str>, ppid: Option<&str>) -> Vars {
        Vars {
            listen_fds: Some(fds.into()),
            listen_fdnames: names.map(Into::into),
            listen_pid: pid.map(Into::into),
            listen_ppid: ppid.map(Into::into),
            ready_fd: None,
            handover_fd: None,
            control_fd: None,
            socket_files: None,
        }
    }

    #[test]
    fn a_control_socket_comes_only_with_an_upgrade_and_apart_from_the_others() {
        let mut v = vars("1", None, None, Some("7"));
        v.control_fd = Some("6".into());
        // Without a readiness pipe (not an upgrade): ignored.
        assert_eq!(v.plan(42, Some(7)).unwrap().unwrap().control_fd, None);
        v.ready_fd = Some("4".into());
        v.handover_fd = Some("5".into());
        assert_eq!(v.plan(42, Some(7)).unwrap().unwrap().control_fd, Some(6));
        // Not one of the other descriptors.
        for bad in ["3", "4", "5", "x"] {
            v.control_fd = Some(bad.into());
            assert!(v.plan(42, Some(7)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_handover_socket_comes_only_with_an_upgrade_and_after_the_listeners() {
        let mut v = vars("1", None, None, Some("7"));
        v.handover_fd = Some("5".into());
        // Without a readiness pipe (not an upgrade): ignored.
        assert_eq!(v.plan(9, Some(7)).unwrap().unwrap().handover_fd, None);
        v.ready_fd = Some("4".into());
        assert_eq!(v.plan(9, Some(7)).unwrap().unwrap().handover_fd, Some(5));
        for bad in ["3", "4", "x"] {
            v.handover_fd = Some(bad.into());
            assert!(v.plan(9, Some(7)).is_err(), "{bad}");
        }
    }

    #[test]
    fn systemd_style_needs_our_pid() {
        let v = vars("2", Some("http:admin"), Some("42"), None);
        let plan = v.plan(42, Some(1)).unwrap().unwrap();
        assert_eq!(plan.count, 2);
        assert_eq!(plan.names, ["http", "admin"]);
        assert_eq!(v.plan(43, Some(1)).unwrap(), None);
    }

    #[test]
    fn restart_style_needs_our_parent() {
        let mut v = vars("1", None, None, Some("7"));
        v.ready_fd = Some("4".into());
        let plan = v.plan(42, Some(7)).unwrap().unwrap();
        assert_eq!(plan.ready_fd, Some(4));
        assert_eq!(plan.names, [super::super::DEFAULT_NAME]);
        // A grandchild (parent 42) must not take them.
        assert_eq!(v.plan(50, Some(42)).unwrap(), None);
        // LISTEN_PID, when present, wins.
        let v = vars("1", None, Some("9"), Some("7"));
        assert_eq!(v.plan(42, Some(7)).unwrap(), None);
    }

    /// `systemfd --no-pid`: no `LISTEN_PID`, no `GRACE_LISTEN_PPID`: the listeners are ours,
    /// as listenfd takes them; a restart's variables are not (they come with its own).
    #[test]
    fn without_listen_pid_the_listeners_are_ours() {
        let mut v = vars("2", Some("http:admin"), None, None);
        v.ready_fd = Some("5".into());
        v.handover_fd = Some("6".into());
        v.control_fd = Some("7".into());
        v.socket_files = Some("0".into());
        let plan = v.plan(42, Some(1)).unwrap().unwrap();
        assert_eq!(plan.count, 2);
        assert_eq!(plan.names, ["http", "admin"]);
        assert_eq!(
            (plan.ready_fd, plan.handover_fd, plan.control_fd),
            (None, None, None)
        );
        assert_eq!(plan.owns_file, [false, false]);
        // A LISTEN_PID naming another process still means: not ours.
        let v = vars("1", None, Some("43"), None);
        assert_eq!(v.plan(42, Some(1)).unwrap(), None);
        // Without LISTEN_FDS, nothing.
        let v = Vars {
            ready_fd: Some("4".into()),
            ..Vars::default()
        };
        assert_eq!(v.plan(42, Some(1)).unwrap(), None);
    }

    /// Issue 22, item 5: a descriptor that is not a listening socket is refused before
    /// anything takes it: whoever owns it keeps it, open and unchanged.
    #[test]
    fn a_descriptor_that_is_not_a_listener_is_refused_and_left_alone() {
        use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsFd;
        let check = |fd: BorrowedFd<'_>| listener::check_listening(fd, false);
        let inherited = |fd: &dyn AsFd| {
            fcntl_setfd(fd.as_fd(), FdFlags::empty()).unwrap();
        };
        // A regular file.
        let path = std::env::temp_dir().join(format!("grace-inherit-{}", std::process::id()));
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        // Its own, close-on-exec (as every descriptor Rust opens): not inherited.
        let err = adopt(file.as_raw_fd(), || "test".into(), check).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InheritedFd {
                    source: InheritedFdError::NotInherited,
                    ..
                }
            ),
            "{err}"
        );
        inherited(&file);
        let err = adopt(file.as_raw_fd(), || "listener".into(), check).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InheritedFd {
                    source: InheritedFdError::NotASocket {
                        found: "a regular file"
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("it is a regular file, not a socket")
        );
        // Still open, still the file, its flags as they were.
        file.write_all(b"intact").unwrap();
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "intact");
        assert_eq!(fcntl_getfd(&file).unwrap(), FdFlags::empty());

        // A connected socket, and a datagram one.
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        inherited(&client);
        let err = adopt(client.as_raw_fd(), || "c".into(), check).unwrap_err();
        assert!(err.to_string().contains("does not listen"), "{err}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        inherited(&udp);
        let err = adopt(udp.as_raw_fd(), || "u".into(), check).unwrap_err();
        assert!(err.to_string().contains("a datagram socket"), "{err}");
        // Both still work.
        assert!(client.peer_addr().is_ok() && udp.local_addr().is_ok());
        // A listening TCP socket where only a Unix one will do (the control socket).
        inherited(&server);
        let unix_only = |fd: BorrowedFd<'_>| listener::check_listening(fd, true);
        let err = adopt(server.as_raw_fd(), || "s".into(), unix_only).unwrap_err();
        assert!(err.to_string().contains("an IP socket"), "{err}");

        // A listening socket is taken: one owner from now on, made close-on-exec.
        let raw = std::os::fd::IntoRawFd::into_raw_fd(server);
        let (owned, family) = adopt(raw, || "l".into(), check).unwrap();
        assert_eq!(family, listener::Family::Tcp);
        assert_eq!(owned.as_raw_fd(), raw);
        assert!(fcntl_getfd(&owned).unwrap().contains(FdFlags::CLOEXEC));
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(vars("x", None, Some("1"), None).plan(1, None).is_err());
        assert!(vars("1000", None, Some("1"), None).plan(1, None).is_err());
        let mut v = vars("2", None, Some("1"), None);
        v.ready_fd = Some("4".into()); // inside the listeners' range
        assert!(v.plan(1, None).is_err());
        // Names that do not match the count are replaced.
        let plan = vars("2", Some("a"), Some("1"), None).plan(1, None);
        assert_eq!(plan.unwrap().unwrap().names.len(), 2);
        // Nothing for anyone.
        assert_eq!(Vars::default().plan(1, None).unwrap(), None);
    }
}
