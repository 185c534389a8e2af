//! The receiving side: adopt listeners (and a readiness pipe) that systemd or the previous
//! generation of this program passed as inherited file descriptors.
//!
//! The variables, after systemd's socket activation:
//!
//! | variable            | meaning                                                         |
//! |---------------------|-----------------------------------------------------------------|
//! | `LISTEN_FDS`        | how many listening sockets, at descriptors 3, 4, …              |
//! | `LISTEN_FDNAMES`    | their names, `:`-separated (optional)                           |
//! | `LISTEN_PID`        | the process they are meant for (systemd sets it)                |
//! | `GRACE_LISTEN_PPID` | instead of `LISTEN_PID`: meant for the child of this process    |
//! | `GRACE_READY_FD`    | a pipe to write to once serving (a grace restart sets it)       |
//!
//! `LISTEN_PID` guards against a grandchild adopting descriptors that were never meant for
//! it. The old process of a restart cannot know its child's pid when it builds the child's
//! environment (that happens before `fork`, and setting a variable between `fork` and
//! `exec` is not async-signal-safe), so it sets `GRACE_LISTEN_PPID=<its own pid>` instead:
//! only a process whose parent has that pid accepts the descriptors. That is exactly as
//! strict, since a grandchild's parent is not the old process.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::listener::Listener;
use crate::lock;
use crate::sys;

pub(crate) const LISTEN_FDS: &str = "LISTEN_FDS";
pub(crate) const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
pub(crate) const LISTEN_PID: &str = "LISTEN_PID";
pub(crate) const GRACE_LISTEN_PPID: &str = "GRACE_LISTEN_PPID";
pub(crate) const GRACE_READY_FD: &str = "GRACE_READY_FD";

/// The first inherited descriptor, as in `SD_LISTEN_FDS_START`.
pub(crate) const FIRST_FD: RawFd = 3;

/// Reading, adopting and removing the variables happens under this lock, once.
static ENV: Mutex<()> = Mutex::new(());
/// The readiness pipe, once adopted; written to (and closed) when serving starts.
static READY: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// Names of adopted listeners by descriptor, so a restart passes them on unchanged.
static NAMES: Mutex<Option<HashMap<RawFd, String>>> = Mutex::new(None);

/// The variables as read from the environment.
#[derive(Debug, Default, Clone)]
pub(crate) struct Vars {
    pub(crate) listen_fds: Option<String>,
    pub(crate) listen_fdnames: Option<String>,
    pub(crate) listen_pid: Option<String>,
    pub(crate) listen_ppid: Option<String>,
    pub(crate) ready_fd: Option<String>,
}

/// What the variables say this process inherited.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Listening sockets at `FIRST_FD..FIRST_FD + count`.
    pub(crate) count: usize,
    /// One name per socket.
    pub(crate) names: Vec<String>,
    pub(crate) ready_fd: Option<RawFd>,
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
        }
    }

    fn is_empty(&self) -> bool {
        self.listen_fds.is_none() && self.ready_fd.is_none()
    }

    /// Removes the variables, so processes we start do not take them as theirs.
    fn remove() {
        for k in [
            LISTEN_FDS,
            LISTEN_FDNAMES,
            LISTEN_PID,
            GRACE_LISTEN_PPID,
            GRACE_READY_FD,
        ] {
            std::env::remove_var(k);
        }
    }

    /// Decides, without touching any descriptor. `None`: nothing is meant for `pid`.
    pub(crate) fn plan(&self, pid: u32, ppid: Option<u32>) -> Result<Option<Plan>> {
        let parse_pid = |s: &str| s.trim().parse::<u32>().ok();
        let for_us = match (&self.listen_pid, &self.listen_ppid) {
            (Some(p), _) => parse_pid(p) == Some(pid),
            (None, Some(pp)) => ppid.is_some() && parse_pid(pp) == ppid,
            (None, None) => false,
        };
        if !for_us {
            if !self.is_empty() {
                tracing::debug!(
                    pid,
                    listen_pid = ?self.listen_pid,
                    grace_listen_ppid = ?self.listen_ppid,
                    "inherited descriptors are meant for another process; ignored"
                );
            }
            return Ok(None);
        }
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
        let mut names: Vec<String> = match &self.listen_fdnames {
            Some(s) if !s.is_empty() => s.split(':').map(str::to_owned).collect(),
            _ => Vec::new(),
        };
        if names.len() != count {
            if !names.is_empty() {
                tracing::warn!(
                    count,
                    names = names.len(),
                    "{LISTEN_FDNAMES} does not name every descriptor; names ignored"
                );
            }
            names = vec![super::DEFAULT_NAME.to_owned(); count];
        }
        let ready_fd = match &self.ready_fd {
            None => None,
            Some(s) => match s.trim().parse::<RawFd>() {
                Ok(fd) if fd >= FIRST_FD + count as RawFd => Some(fd),
                _ => {
                    return Err(Error::Inherit(format!(
                        "{GRACE_READY_FD} is not a descriptor after the listeners: {s:?}"
                    )))
                }
            },
        };
        Ok(Some(Plan {
            count,
            names,
            ready_fd,
        }))
    }
}

fn ppid() -> Option<u32> {
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
}

/// Reads and removes the variables (once), adopts the readiness pipe, and returns the
/// listening descriptors with their names when `listeners` is true.
fn take(listeners: bool) -> Result<Option<Vec<(OwnedFd, String)>>> {
    let _env = lock(&ENV);
    let vars = Vars::read();
    if vars.is_empty() {
        return Ok(None);
    }
    let plan = vars.plan(std::process::id(), ppid());
    if listeners {
        Vars::remove();
    } else {
        // Serving starts: only the readiness pipe is taken here; listening descriptors are
        // left to whoever adopts them.
        if vars.ready_fd.is_none() {
            return Ok(None);
        }
        std::env::remove_var(GRACE_READY_FD);
    }
    let Some(plan) = plan? else { return Ok(None) };
    if let Some(fd) = plan.ready_fd {
        match sys::adopt_inherited(fd) {
            Some(fd) => *lock(&READY) = Some(fd),
            None => tracing::warn!(fd, "{GRACE_READY_FD} names a descriptor that is not open"),
        }
    }
    if !listeners {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(plan.count);
    for (i, name) in plan.names.into_iter().enumerate() {
        let fd = FIRST_FD + i as RawFd;
        let owned = sys::adopt_inherited(fd)
            .ok_or_else(|| Error::Inherit(format!("descriptor {fd} ({name}) is not open")))?;
        out.push((owned, name));
    }
    Ok(Some(out))
}

/// Adopts the listening sockets this process inherited, from systemd's socket activation
/// or from the previous generation of this program during a zero-downtime upgrade.
///
/// Returns `Ok(None)` when nothing was passed to this process (`LISTEN_FDS` unset, or meant
/// for another process: `LISTEN_PID` is not ours). The variables are removed from the
/// environment, so processes started later do not take them as theirs, and the adopted
/// descriptors are made close-on-exec. Names from `LISTEN_FDNAMES` are kept and passed on
/// by the next upgrade. Call it once, early (it changes the environment), within a tokio
/// runtime.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace::Error> {
/// let server = match grace::inherited_listeners()? {
///     Some(listeners) => grace::Server::from_listeners(listeners),
///     None => grace::Server::bind("127.0.0.1:8080").await?,
/// };
/// # let _ = server; Ok(()) }
/// ```
pub fn inherited_listeners() -> Result<Option<Vec<Listener>>> {
    let Some(fds) = take(true)? else {
        return Ok(None);
    };
    let mut listeners = Vec::with_capacity(fds.len());
    let mut names = lock(&NAMES);
    let names = names.get_or_insert_with(HashMap::new);
    for (fd, name) in fds {
        let raw = fd.as_raw_fd();
        let listener = Listener::from_fd(fd)
            .map_err(|e| Error::Inherit(format!("descriptor {raw} ({name}): {e}")))?;
        match listener.local_addr() {
            Ok(addr) => tracing::info!(fd = raw, %name, %addr, "adopted inherited listener"),
            Err(_) => tracing::info!(fd = raw, %name, "adopted inherited listener"),
        }
        names.insert(raw, name);
        listeners.push(listener);
    }
    Ok(Some(listeners))
}

/// The name a listener was inherited under, if it was.
pub(crate) fn name_of(fd: RawFd) -> Option<String> {
    lock(&NAMES).as_ref().and_then(|m| m.get(&fd).cloned())
}

/// Tells the process that started us (if one waits) that we are ready, and closes the pipe.
pub(crate) fn signal_ready() {
    if let Err(e) = take(false) {
        tracing::warn!(error = %e, "cannot adopt the readiness pipe");
    }
    let Some(fd) = lock(&READY).take() else {
        return;
    };
    let mut pipe = std::fs::File::from(fd);
    let msg = format!("ready {}\n", std::process::id());
    match pipe.write_all(msg.as_bytes()) {
        Ok(()) => tracing::debug!("told the previous generation we are ready"),
        // The old process gave up on us (timeout) and will kill us; nothing to do.
        Err(e) => tracing::warn!(error = %e, "cannot write to the readiness pipe"),
    }
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
