//! Signals: the first starts a drain, a second one during the drain forces everything closed.

use std::future::poll_fn;
use std::task::Poll;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::base::report::{ForceReason, Trigger};
use crate::error::{Error, Result};
use crate::shutdown::Shared;

/// The signals [`Serve::with_signals`](crate::Serve::with_signals) listens to: SIGTERM and SIGINT.
pub const DEFAULT_SIGNALS: [SignalKind; 2] = [SignalKind::terminate(), SignalKind::interrupt()];

/// A set of installed signal handlers.
pub(crate) struct Signals {
    streams: Vec<(SignalKind, Signal)>,
}

impl Signals {
    /// Installs the handlers now, so a signal that arrives before serving starts is not lost
    /// (and does not kill the process by its default action).
    pub(crate) fn install(kinds: &[SignalKind]) -> Result<Signals> {
        let streams = kinds
            .iter()
            .map(|&k| {
                signal(k).map(|s| (k, s)).map_err(|source| Error::Signal {
                    signal: name(k),
                    source,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Signals { streams })
    }

    /// The next signal of the set, by name.
    pub(crate) async fn recv(&mut self) -> String {
        poll_fn(|cx| {
            for (kind, s) in &mut self.streams {
                if let Poll::Ready(Some(())) = s.poll_recv(cx) {
                    return Poll::Ready(name(*kind));
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

/// The conventional name of a signal.
pub(crate) fn name(kind: SignalKind) -> String {
    const KNOWN: [(SignalKind, &str); 6] = [
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::hangup(), "SIGHUP"),
        (SignalKind::quit(), "SIGQUIT"),
        (SignalKind::user_defined1(), "SIGUSR1"),
        (SignalKind::user_defined2(), "SIGUSR2"),
    ];
    KNOWN.iter().find(|(k, _)| *k == kind).map_or_else(
        || format!("signal {}", kind.as_raw_value()),
        |(_, n)| n.to_string(),
    )
}
