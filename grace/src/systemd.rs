//! systemd's notification protocol (`sd_notify`), spoken without libsystemd.
//!
//! When `NOTIFY_SOCKET` is set (a `Type=notify` service), grace tells the service manager
//! about its life on its own:
//!
//! | when                                        | who             | message                  |
//! |---------------------------------------------|-----------------|--------------------------|
//! | serving starts (listeners up, `serve` runs) | every process   | `READY=1`                |
//! | an upgrade starts                           | the old process | `RELOADING=1`            |
//! | the new process is ready                    | the old process | `MAINPID=<new>`,`READY=1`|
//! | an upgrade fails and is rolled back         | the old process | `READY=1`, `STATUS=…`    |
//! | a drain starts (not for a restart)          | the process     | `STOPPING=1`             |
//!
//! The old process of an upgrade does not send `STOPPING=1` when it drains: by then it is no
//! longer the main process, and with `NotifyAccess=all` systemd would take it as the
//! service stopping. The unit needs `NotifyAccess=all`, since the new main process is a
//! child of the old one; see `docs/grace-demo.service`.
//!
//! [`notify`] sends any other state you need (`STATUS=…`, `WATCHDOG=1`, …).

use std::io;
use std::os::unix::net::UnixDatagram;

/// The environment variable systemd sets to the socket that takes notifications.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager.
///
/// Returns `Ok(false)` when `NOTIFY_SOCKET` is not set (not run by systemd as
/// `Type=notify`), `Ok(true)` once the datagram is sent. Abstract socket names (`@name`)
/// and paths both work. The variable is left in the environment: a new process started by
/// an upgrade must be able to notify as well.
///
/// ```
/// let sent = grace_http::systemd::notify("STATUS=warming up caches").unwrap();
/// // Outside systemd this does nothing.
/// assert_eq!(sent, std::env::var_os("NOTIFY_SOCKET").is_some());
/// ```
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    send(&target, state)?;
    Ok(true)
}

/// Sends one datagram to a notification socket, named as in `NOTIFY_SOCKET`.
pub(crate) fn send(target: &str, state: &str) -> io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = name;
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "abstract notification sockets exist on Linux only",
            ));
        }
    }
    if !target.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{NOTIFY_SOCKET} must be an absolute path or an @abstract name: {target:?}"),
        ));
    }
    socket.send_to(state.as_bytes(), target)?;
    Ok(())
}

/// Notifies, logging a failure instead of returning it: notifications are best effort, a
/// service manager that cannot be told must not stop the service.
pub(crate) fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state = %state.replace('\n', " "), "notified systemd"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, state = %state.replace('\n', " "), "cannot notify systemd")
        }
    }
}

/// `RELOADING=1` with the `MONOTONIC_USEC` that `Type=notify-reload` asks for.
pub(crate) fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
    notify_logged(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// Called when a drain starts: `STOPPING=1`, unless a restart handed the service over.
pub(crate) fn drain_started(trigger: &crate::Trigger) {
    if *trigger != crate::Trigger::Restart {
        notify_logged("STOPPING=1");
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this process when
/// `WATCHDOG_PID` names it), halved as `sd_watchdog_enabled(3)` advises.
pub(crate) fn watchdog_interval() -> Option<std::time::Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    me: u32,
) -> Option<std::time::Duration> {
    if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(std::time::Duration::from_micros(usec) / 2)
}

/// Pings systemd's watchdog (`WATCHDOG=1`) at `every`, for as long as the server runs: a
/// process that hangs stops pinging, and systemd restarts it.
pub(crate) async fn watchdog(every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        notify_logged("WATCHDOG=1");
    }
}

/// Tells systemd the stop will take up to `needed` from now (`EXTEND_TIMEOUT_USEC`), so a
/// drain longer than the unit's `TimeoutStopSec` is not killed half-way.
pub(crate) fn extend_timeout(needed: std::time::Duration) {
    let usec = u64::try_from(needed.as_micros()).unwrap_or(u64::MAX);
    notify_logged(&format!("EXTEND_TIMEOUT_USEC={usec}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn the_watchdog_pings_at_half_its_timeout_and_only_for_its_process() {
        use std::time::Duration;
        let w = watchdog_interval_from;
        assert_eq!(w(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(
            w(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            w(Some("30000000"), Some("8"), 7),
            None,
            "meant for another process"
        );
        assert_eq!(w(Some("0"), None, 7), None);
        assert_eq!(w(Some("soon"), None, 7), None);
        assert_eq!(w(None, None, 7), None);
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_name() {
        let dir = std::env::temp_dir().join(format!("grace-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();

        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("grace-notify-test-{}", std::process::id());
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            let rx = UnixDatagram::bind_addr(&addr).unwrap();
            send(&format!("@{name}"), "STOPPING=1").unwrap();
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"STOPPING=1");
        }
    }

    #[test]
    fn rejects_a_relative_path() {
        assert!(send("relative.sock", "READY=1").is_err());
    }
}
