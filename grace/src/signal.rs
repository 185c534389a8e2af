//! Signals: the first starts a drain, a second one during the drain forces everything closed.
//!
//! [`Signal`] names one portably: a Unix signal, or a Windows console event (Ctrl-C,
//! Ctrl-Break, and the close, logoff and shutdown events).

use std::future::poll_fn;
use std::task::{Context, Poll};

use crate::base::report::{ForceReason, Trigger};
use crate::error::{Error, Result};
use crate::shutdown::Shared;

/// The signals [`Serve::with_signals`](crate::Serve::with_signals) listens to:
/// [`Signal::terminate`] and [`Signal::interrupt`] (SIGTERM and SIGINT on Unix, Ctrl-Break
/// and Ctrl-C on Windows).
pub const DEFAULT_SIGNALS: [Signal; 2] = [Signal::terminate(), Signal::interrupt()];

/// A signal a server can drain on ([`Serve::with_signals_from`](crate::Serve::with_signals_from))
/// or, on Unix, restart on ([`Restart::signal`](crate::Restart::signal)).
///
/// On Unix it is a signal number (SIGTERM, SIGINT, SIGHUP…); on Windows a console event.
/// [`terminate`](Self::terminate) and [`interrupt`](Self::interrupt) exist on both, so the
/// usual set reads the same everywhere:
///
/// | constructor | Unix | Windows |
/// |---|---|---|
/// | [`terminate`](Self::terminate) | SIGTERM | Ctrl-Break (`CTRL_BREAK_EVENT`, what process managers send a console program to stop it) |
/// | [`interrupt`](Self::interrupt) | SIGINT | Ctrl-C (`CTRL_C_EVENT`) |
/// | `hangup`, `quit`, `user_defined1`, `user_defined2`, `from_raw` | SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, any number | – |
/// | `ctrl_close`, `ctrl_logoff`, `ctrl_shutdown` | – | the console's close, logoff and shutdown events |
///
/// ```
/// use grace_http::Signal;
/// assert_eq!(Signal::terminate().to_string(), if cfg!(unix) { "SIGTERM" } else { "Ctrl-Break" });
/// # #[cfg(unix)]
/// assert_eq!(Signal::user_defined1().to_string(), "SIGUSR1");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Signal(Kind);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    #[cfg(unix)]
    Unix(std::os::raw::c_int),
    #[cfg(windows)]
    CtrlC,
    #[cfg(windows)]
    CtrlBreak,
    #[cfg(windows)]
    CtrlClose,
    #[cfg(windows)]
    CtrlLogoff,
    #[cfg(windows)]
    CtrlShutdown,
}

#[cfg(unix)]
impl Signal {
    /// SIGTERM: what service managers and orchestrators send to stop a service.
    pub const fn terminate() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::terminate().as_raw_value())
    }

    /// SIGINT: Ctrl-C in a terminal.
    pub const fn interrupt() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::interrupt().as_raw_value())
    }

    /// SIGHUP: the restart signal by default (see [`Restart`](crate::Restart)).
    pub const fn hangup() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::hangup().as_raw_value())
    }

    /// SIGQUIT.
    pub const fn quit() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::quit().as_raw_value())
    }

    /// SIGUSR1.
    pub const fn user_defined1() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::user_defined1().as_raw_value())
    }

    /// SIGUSR2.
    pub const fn user_defined2() -> Signal {
        Signal::from_raw(tokio::signal::unix::SignalKind::user_defined2().as_raw_value())
    }

    /// Any signal, by its number on this system (as tokio's `SignalKind::from_raw`).
    pub const fn from_raw(signum: std::os::raw::c_int) -> Signal {
        Signal(Kind::Unix(signum))
    }

    /// The signal's number on this system.
    pub const fn as_raw_value(&self) -> std::os::raw::c_int {
        let Kind::Unix(signum) = self.0;
        signum
    }
}

#[cfg(unix)]
impl From<tokio::signal::unix::SignalKind> for Signal {
    fn from(kind: tokio::signal::unix::SignalKind) -> Signal {
        Signal::from_raw(kind.as_raw_value())
    }
}

#[cfg(unix)]
impl From<Signal> for tokio::signal::unix::SignalKind {
    fn from(signal: Signal) -> tokio::signal::unix::SignalKind {
        tokio::signal::unix::SignalKind::from_raw(signal.as_raw_value())
    }
}

#[cfg(windows)]
impl Signal {
    /// Ctrl-Break (`CTRL_BREAK_EVENT`): what a process manager sends a console program to
    /// stop it (`GenerateConsoleCtrlEvent`), the counterpart of SIGTERM.
    pub const fn terminate() -> Signal {
        Signal(Kind::CtrlBreak)
    }

    /// Ctrl-C (`CTRL_C_EVENT`), the counterpart of SIGINT.
    pub const fn interrupt() -> Signal {
        Signal(Kind::CtrlC)
    }

    /// Ctrl-C: the same as [`interrupt`](Self::interrupt).
    pub const fn ctrl_c() -> Signal {
        Signal(Kind::CtrlC)
    }

    /// Ctrl-Break: the same as [`terminate`](Self::terminate).
    pub const fn ctrl_break() -> Signal {
        Signal(Kind::CtrlBreak)
    }

    /// The console window is closing (`CTRL_CLOSE_EVENT`). Windows ends the process soon
    /// after the event, whatever it does: a drain gets only a few seconds.
    pub const fn ctrl_close() -> Signal {
        Signal(Kind::CtrlClose)
    }

    /// The user is logging off (`CTRL_LOGOFF_EVENT`; services receive it too).
    pub const fn ctrl_logoff() -> Signal {
        Signal(Kind::CtrlLogoff)
    }

    /// The system is shutting down (`CTRL_SHUTDOWN_EVENT`). As with
    /// [`ctrl_close`](Self::ctrl_close), the process is ended soon after.
    pub const fn ctrl_shutdown() -> Signal {
        Signal(Kind::CtrlShutdown)
    }
}

impl std::fmt::Display for Signal {
    /// The conventional name (`SIGTERM`, `Ctrl-C`…), as drain reports and logs give it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            #[cfg(unix)]
            Kind::Unix(signum) => {
                const KNOWN: [(Signal, &str); 6] = [
                    (Signal::terminate(), "SIGTERM"),
                    (Signal::interrupt(), "SIGINT"),
                    (Signal::hangup(), "SIGHUP"),
                    (Signal::quit(), "SIGQUIT"),
                    (Signal::user_defined1(), "SIGUSR1"),
                    (Signal::user_defined2(), "SIGUSR2"),
                ];
                match KNOWN.iter().find(|(k, _)| *k == *self) {
                    Some((_, name)) => f.write_str(name),
                    None => write!(f, "signal {signum}"),
                }
            }
            #[cfg(windows)]
            Kind::CtrlC => f.write_str("Ctrl-C"),
            #[cfg(windows)]
            Kind::CtrlBreak => f.write_str("Ctrl-Break"),
            #[cfg(windows)]
            Kind::CtrlClose => f.write_str("Ctrl-Close"),
            #[cfg(windows)]
            Kind::CtrlLogoff => f.write_str("Ctrl-Logoff"),
            #[cfg(windows)]
            Kind::CtrlShutdown => f.write_str("Ctrl-Shutdown"),
        }
    }
}

/// An installed handler: the stream of one signal's deliveries.
pub(crate) struct Stream(StreamKind);

enum StreamKind {
    #[cfg(unix)]
    Unix(tokio::signal::unix::Signal),
    #[cfg(windows)]
    CtrlC(tokio::signal::windows::CtrlC),
    #[cfg(windows)]
    CtrlBreak(tokio::signal::windows::CtrlBreak),
    #[cfg(windows)]
    CtrlClose(tokio::signal::windows::CtrlClose),
    #[cfg(windows)]
    CtrlLogoff(tokio::signal::windows::CtrlLogoff),
    #[cfg(windows)]
    CtrlShutdown(tokio::signal::windows::CtrlShutdown),
}

impl Stream {
    /// Installs the handler for `signal` now (within the current tokio runtime).
    pub(crate) fn install(signal: Signal) -> std::io::Result<Stream> {
        Ok(Stream(match signal.0 {
            #[cfg(unix)]
            Kind::Unix(_) => StreamKind::Unix(tokio::signal::unix::signal(signal.into())?),
            #[cfg(windows)]
            Kind::CtrlC => StreamKind::CtrlC(tokio::signal::windows::ctrl_c()?),
            #[cfg(windows)]
            Kind::CtrlBreak => StreamKind::CtrlBreak(tokio::signal::windows::ctrl_break()?),
            #[cfg(windows)]
            Kind::CtrlClose => StreamKind::CtrlClose(tokio::signal::windows::ctrl_close()?),
            #[cfg(windows)]
            Kind::CtrlLogoff => StreamKind::CtrlLogoff(tokio::signal::windows::ctrl_logoff()?),
            #[cfg(windows)]
            Kind::CtrlShutdown => {
                StreamKind::CtrlShutdown(tokio::signal::windows::ctrl_shutdown()?)
            }
        }))
    }

    /// Ready with `Some(())` at the next delivery; `None` if no more can come.
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        match &mut self.0 {
            #[cfg(unix)]
            StreamKind::Unix(s) => s.poll_recv(cx),
            #[cfg(windows)]
            StreamKind::CtrlC(s) => s.poll_recv(cx),
            #[cfg(windows)]
            StreamKind::CtrlBreak(s) => s.poll_recv(cx),
            #[cfg(windows)]
            StreamKind::CtrlClose(s) => s.poll_recv(cx),
            #[cfg(windows)]
            StreamKind::CtrlLogoff(s) => s.poll_recv(cx),
            #[cfg(windows)]
            StreamKind::CtrlShutdown(s) => s.poll_recv(cx),
        }
    }

    /// The next delivery; `None` if no more can come.
    #[cfg(unix)]
    pub(crate) async fn recv(&mut self) -> Option<()> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// A set of installed signal handlers.
pub(crate) struct Signals {
    streams: Vec<(Signal, Stream)>,
}

impl Signals {
    /// Installs the handlers now, so a signal that arrives before serving starts is not lost
    /// (and does not kill the process by its default action).
    pub(crate) fn install(signals: &[Signal]) -> Result<Signals> {
        let streams = signals
            .iter()
            .map(|&k| {
                Stream::install(k)
                    .map(|s| (k, s))
                    .map_err(|source| Error::Signal {
                        signal: k.to_string(),
                        source,
                    })
            })
            .collect::<Result<_>>()?;
        Ok(Signals { streams })
    }

    /// The next signal of the set, by name.
    pub(crate) async fn recv(&mut self) -> String {
        poll_fn(|cx| {
            for (signal, s) in &mut self.streams {
                if let Poll::Ready(Some(())) = s.poll_recv(cx) {
                    return Poll::Ready(signal.to_string());
                }
            }
            Poll::Pending
        })
        .await
    }

    /// First signal: drain. Second: force.
    pub(crate) async fn drive(mut self, shared: std::sync::Arc<Shared>) {
        let first = self.recv().await;
        tracing::info!(signal = %first, "signal received: draining (send it again to force)");
        shared.request_drain(Trigger::Signal(first));
        let second = self.recv().await;
        tracing::warn!(signal = %second, "second signal: forcing every connection closed");
        shared.request_force(ForceReason::Signal(second));
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::Signal;

    #[test]
    fn signals_are_named_as_before_and_convert_to_and_from_tokios() {
        use tokio::signal::unix::SignalKind;
        for (signal, name) in [
            (Signal::terminate(), "SIGTERM"),
            (Signal::interrupt(), "SIGINT"),
            (Signal::hangup(), "SIGHUP"),
            (Signal::quit(), "SIGQUIT"),
            (Signal::user_defined1(), "SIGUSR1"),
            (Signal::user_defined2(), "SIGUSR2"),
        ] {
            assert_eq!(signal.to_string(), name);
            assert_eq!(Signal::from(SignalKind::from(signal)), signal);
        }
        assert_eq!(
            Signal::from(SignalKind::window_change()).to_string(),
            "signal 28"
        );
        assert_eq!(
            SignalKind::from(Signal::terminate()),
            SignalKind::terminate()
        );
    }
}
