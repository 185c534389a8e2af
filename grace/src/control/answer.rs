//! The control socket's wire format, defined once: the requests, and the typed answers the
//! server serializes and the client ([`status`](super::status), [`upgrade`](super::upgrade),
//! [`drain`](super::drain)) reads back.
//!
//! Each answer is one line of JSON. A client of one version may talk to a server of another,
//! so fields a client does not know are ignored, and a phase or a failure kind it does not
//! know reads as `Other`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::base::conn::StateCounts;
use crate::error::RestartError;

/// A request: one line on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Request {
    Status,
    Upgrade,
    Drain,
}

impl Request {
    /// The line that asks for it (without its newline).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Upgrade => "upgrade",
            Request::Drain => "drain",
        }
    }

    /// The request a line asks for, if any.
    pub(crate) fn parse(line: &str) -> Option<Request> {
        [Request::Status, Request::Upgrade, Request::Drain]
            .into_iter()
            .find(|r| r.as_str() == line.trim())
    }
}

/// The answer to `status`: what a running server is doing.
///
/// On the wire: `{"pid":…,"generation":…,"phase":"serving","ready":true,"counts":{"new":…,
/// "active":…,"idle":…,"hijacked":…},"connections":…,"handed_over":{"received":…,"sent":…},
/// "last_upgrade":null}`. Its [`Display`](fmt::Display) is the text `grace-ctl status`
/// prints.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::control::RequestError> {
/// let status = grace_http::control::status("/run/app/control.sock").await?;
/// println!("generation {} (pid {}) serves {} connections", status.generation, status.pid, status.connections);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// The pid of the process that answered.
    pub pid: u32,
    /// Which generation of the service it is: 1 for the first, one more at each upgrade.
    pub generation: u32,
    /// Serving, or stopping.
    pub phase: ServerPhase,
    /// Whether its readiness holds (false from the moment a stop is asked for).
    pub ready: bool,
    /// Live connections per state.
    pub counts: StateCounts,
    /// All live connections.
    pub connections: usize,
    /// Connections handed over at upgrades.
    pub handed_over: HandedOver,
    /// The outcome of the last upgrade this process tried, if any.
    pub last_upgrade: Option<UpgradeOutcome>,
}

/// Where a server is in its life, as [`Status::phase`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerPhase {
    /// Accepting and serving.
    Serving,
    /// A stop was asked for; the listeners are still open (the pre-stop delay).
    Stopping,
    /// Draining: the listeners are closed, the connections finishing.
    Draining,
    /// A phase this client does not know (a newer server).
    #[serde(other)]
    Other,
}

impl ServerPhase {
    /// Its name on the wire: `serving`, `stopping`, `draining` (`other`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServerPhase::Serving => "serving",
            ServerPhase::Stopping => "stopping",
            ServerPhase::Draining => "draining",
            ServerPhase::Other => "other",
        }
    }
}

/// Connections handed over at upgrades (see [`Restart::hand_over_window`](crate::Restart::hand_over_window)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HandedOver {
    /// Received from the previous generation.
    pub received: u64,
    /// Sent to the next generation.
    pub sent: u64,
    /// Of `received`, the upgraded connections (WebSockets: see
    /// [`Movable`](crate::Movable)); on the wire only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upgraded_received: u64,
    /// Of `sent`, the upgraded connections; on the wire only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub upgraded_sent: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl HandedOver {
    pub(crate) fn new(received: u64, sent: u64) -> HandedOver {
        HandedOver {
            received,
            sent,
            ..HandedOver::default()
        }
    }

    pub(crate) fn with_upgraded(mut self, received: u64, sent: u64) -> HandedOver {
        self.upgraded_received = received;
        self.upgraded_sent = sent;
        self
    }
}

/// The outcome of an upgrade: the answer to `upgrade` (which waits for it), and
/// [`Status::last_upgrade`].
///
/// On the wire: `{"ok":true,"pid":<new>}` or `{"ok":false,"kind":"exited","error":"process 42
/// exited with status 1 before it was ready"}`.
///
/// ```no_run
/// # async fn doc() -> Result<(), grace_http::control::RequestError> {
/// use grace_http::control::UpgradeOutcome;
/// match grace_http::control::upgrade("/run/app/control.sock").await? {
///     UpgradeOutcome::Upgraded { pid } => println!("now served by {pid}"),
///     UpgradeOutcome::Failed { error, .. } => eprintln!("rolled back: {error}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OutcomeWire", into = "OutcomeWire")]
pub enum UpgradeOutcome {
    /// The new process serves (the old one drains).
    Upgraded {
        /// The new process's pid.
        pid: u32,
    },
    /// The upgrade failed: the new process is gone, the old one serves on (see
    /// [`RestartError`]).
    Failed {
        /// How it failed, for scripts; `None` where the server does not say (the last
        /// upgrade in a [`Status`]).
        kind: Option<FailureKind>,
        /// Why, for people: `process 42 exited with status 1 before it was ready`.
        error: String,
    },
}

impl UpgradeOutcome {
    /// The new process's pid, if the upgrade succeeded.
    pub fn pid(&self) -> Option<u32> {
        match self {
            UpgradeOutcome::Upgraded { pid } => Some(*pid),
            UpgradeOutcome::Failed { .. } => None,
        }
    }

    /// Whether the upgrade succeeded.
    pub fn is_ok(&self) -> bool {
        self.pid().is_some()
    }
}

impl From<&Result<u32, RestartError>> for UpgradeOutcome {
    fn from(result: &Result<u32, RestartError>) -> Self {
        match result {
            Ok(pid) => UpgradeOutcome::Upgraded { pid: *pid },
            Err(e) => UpgradeOutcome::Failed {
                kind: Some(FailureKind::of(e)),
                error: e.to_string(),
            },
        }
    }
}

/// A short name for each way an upgrade can fail, for scripts: one per [`RestartError`]
/// variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// [`RestartError::NotEnabled`].
    NotEnabled,
    /// [`RestartError::AlreadyRunning`].
    AlreadyRunning,
    /// [`RestartError::Draining`].
    Draining,
    /// [`RestartError::Spawn`].
    Spawn,
    /// [`RestartError::Exited`].
    Exited,
    /// [`RestartError::HandOver`].
    HandOver,
    /// [`RestartError::NotReady`].
    NotReady,
    /// [`RestartError::NotReported`].
    NotReported,
    /// [`RestartError::Stopped`].
    Stopped,
    /// [`RestartError::Io`].
    Io,
    /// A kind this client does not know (a newer server).
    #[serde(other)]
    Other,
}

impl FailureKind {
    /// The kind of `e`.
    pub fn of(e: &RestartError) -> FailureKind {
        match e {
            RestartError::NotEnabled => FailureKind::NotEnabled,
            RestartError::AlreadyRunning => FailureKind::AlreadyRunning,
            RestartError::Draining => FailureKind::Draining,
            RestartError::Spawn { .. } => FailureKind::Spawn,
            RestartError::Exited { .. } => FailureKind::Exited,
            RestartError::HandOver { .. } => FailureKind::HandOver,
            RestartError::NotReady { .. } => FailureKind::NotReady,
            RestartError::NotReported { .. } => FailureKind::NotReported,
            RestartError::Stopped { .. } => FailureKind::Stopped,
            RestartError::Io(_) => FailureKind::Io,
        }
    }
}

/// The answer to `drain`: the drain was asked for (the server stops once it has drained; a
/// server already stopping answers the same). On the wire: `{"ok":true}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Ack", into = "Ack")]
pub struct DrainStarted;

/// The answer to a request the server did not take (an unknown one, or no request line):
/// `{"ok":false,"error":…}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Refused {
    ok: bool,
    pub(crate) error: String,
}

impl Refused {
    pub(crate) fn new(error: String) -> Refused {
        Refused { ok: false, error }
    }

    /// `Some` if `answer` is a refusal.
    pub(crate) fn read(answer: &str) -> Option<Refused> {
        serde_json::from_str::<Refused>(answer)
            .ok()
            .filter(|r| !r.ok)
    }
}

/// Any answer, as the server writes it.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Answer {
    Status(Box<Status>),
    Upgrade(UpgradeOutcome),
    Drain(DrainStarted),
    Refused(Refused),
}

/// [`UpgradeOutcome`] as it travels.
#[derive(Serialize, Deserialize)]
struct OutcomeWire {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<FailureKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<UpgradeOutcome> for OutcomeWire {
    fn from(o: UpgradeOutcome) -> Self {
        match o {
            UpgradeOutcome::Upgraded { pid } => OutcomeWire {
                ok: true,
                pid: Some(pid),
                kind: None,
                error: None,
            },
            UpgradeOutcome::Failed { kind, error } => OutcomeWire {
                ok: false,
                pid: None,
                kind,
                error: Some(error),
            },
        }
    }
}

impl TryFrom<OutcomeWire> for UpgradeOutcome {
    type Error = &'static str;
    fn try_from(w: OutcomeWire) -> Result<Self, Self::Error> {
        match (w.ok, w.pid, w.error) {
            (true, Some(pid), _) => Ok(UpgradeOutcome::Upgraded { pid }),
            (true, None, _) => Err("an upgrade said to succeed without a pid"),
            (false, _, Some(error)) => Ok(UpgradeOutcome::Failed {
                kind: w.kind,
                error,
            }),
            (false, _, None) => Err("an upgrade said to fail without an error"),
        }
    }
}

/// [`DrainStarted`] as it travels.
#[derive(Serialize, Deserialize)]
struct Ack {
    ok: bool,
}

impl From<DrainStarted> for Ack {
    fn from(_: DrainStarted) -> Self {
        Ack { ok: true }
    }
}

impl TryFrom<Ack> for DrainStarted {
    type Error = &'static str;
    fn try_from(a: Ack) -> Result<Self, Self::Error> {
        match a.ok {
            true => Ok(DrainStarted),
            false => Err("the drain was not started"),
        }
    }
}

impl fmt::Display for UpgradeOutcome {
    /// `ok, pid 42`, or `failed: <error>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeOutcome::Upgraded { pid } => write!(f, "ok, pid {pid}"),
            UpgradeOutcome::Failed { error, .. } => write!(f, "failed: {error}"),
        }
    }
}

impl fmt::Display for Status {
    /// Six lines, for people: pid, generation, phase, connections per state, connections
    /// handed over, the last upgrade.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(f, "pid {}", self.pid)?;
        writeln!(f, "generation {}", self.generation)?;
        writeln!(f, "phase {}", self.phase.as_str())?;
        writeln!(
            f,
            "connections {} (new {}, active {}, idle {}, hijacked {})",
            self.connections, c.new, c.active, c.idle, c.hijacked
        )?;
        let h = &self.handed_over;
        let upgraded = |n: u64| match n {
            0 => String::new(),
            n => format!(" ({n} upgraded)"),
        };
        writeln!(
            f,
            "handed over: received {}{} from the previous generation, sent {}{} to the next",
            h.received,
            upgraded(h.upgraded_received),
            h.sent,
            upgraded(h.upgraded_sent)
        )?;
        match &self.last_upgrade {
            None => writeln!(f, "last upgrade none"),
            Some(outcome) => writeln!(f, "last upgrade {outcome}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(last_upgrade: Option<UpgradeOutcome>) -> Status {
        Status {
            pid: 42,
            generation: 2,
            phase: ServerPhase::Draining,
            ready: false,
            counts: StateCounts {
                new: 1,
                active: 2,
                idle: 3,
                hijacked: 4,
            },
            connections: 10,
            handed_over: HandedOver::new(5, 6),
            last_upgrade,
        }
    }

    /// The wire format is the one the server wrote before these types (issue 12): a client
    /// of either side reads the other.
    #[test]
    fn upgraded_counts_are_on_the_wire_only_when_there_are_some() {
        let h = HandedOver::new(5, 6).with_upgraded(2, 3);
        let wire = serde_json::to_string(&h).unwrap();
        assert_eq!(
            wire,
            r#"{"received":5,"sent":6,"upgraded_received":2,"upgraded_sent":3}"#
        );
        assert_eq!(serde_json::from_str::<HandedOver>(&wire).unwrap(), h);
        // An older server's answer reads as none upgraded.
        let old: HandedOver = serde_json::from_str(r#"{"received":5,"sent":6}"#).unwrap();
        assert_eq!(old, HandedOver::new(5, 6));
    }

    #[test]
    fn the_wire_format_is_unchanged() {
        let s = serde_json::to_string(&status(None)).unwrap();
        assert_eq!(
            s,
            r#"{"pid":42,"generation":2,"phase":"draining","ready":false,"counts":{"new":1,"active":2,"idle":3,"hijacked":4},"connections":10,"handed_over":{"received":5,"sent":6},"last_upgrade":null}"#
        );
        let ok = UpgradeOutcome::Upgraded { pid: 7 };
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"ok":true,"pid":7}"#
        );
        let failed = UpgradeOutcome::from(&Err(RestartError::NotReady {
            pid: 9,
            timeout: std::time::Duration::from_secs(3),
        }));
        assert_eq!(
            serde_json::to_string(&failed).unwrap(),
            r#"{"ok":false,"kind":"not_ready","error":"process 9 was not ready within 3s (killed)"}"#
        );
        assert_eq!(
            serde_json::to_string(&DrainStarted).unwrap(),
            r#"{"ok":true}"#
        );
        // What an older server says of its last upgrade (no kind) reads back.
        let old = r#"{"pid":42,"generation":2,"phase":"serving","ready":true,"counts":{"new":0,"active":0,"idle":0,"hijacked":0},"connections":0,"handed_over":{"received":0,"sent":0},"last_upgrade":{"ok":false,"error":"boom"}}"#;
        let read: Status = serde_json::from_str(old).unwrap();
        assert_eq!(
            read.last_upgrade,
            Some(UpgradeOutcome::Failed {
                kind: None,
                error: "boom".into()
            })
        );
    }

    #[test]
    fn every_answer_reads_back_and_a_newer_servers_words_are_tolerated() {
        for last in [
            None,
            Some(UpgradeOutcome::Upgraded { pid: 3 }),
            Some(UpgradeOutcome::Failed {
                kind: Some(FailureKind::HandOver),
                error: "x".into(),
            }),
        ] {
            let s = status(last);
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), s);
        }
        let newer = r#"{"ok":false,"kind":"moon_phase","error":"e","since":3}"#;
        let read: UpgradeOutcome = serde_json::from_str(newer).unwrap();
        assert_eq!(
            read,
            UpgradeOutcome::Failed {
                kind: Some(FailureKind::Other),
                error: "e".into()
            }
        );
        let phase: ServerPhase = serde_json::from_str(r#""hibernating""#).unwrap();
        assert_eq!(phase, ServerPhase::Other);
        // Not answers of their kind.
        assert!(serde_json::from_str::<UpgradeOutcome>(r#"{"ok":true}"#).is_err());
        assert!(serde_json::from_str::<DrainStarted>(r#"{"ok":false,"error":"x"}"#).is_err());
        assert!(serde_json::from_str::<Status>(r#"{"ok":false,"error":"x"}"#).is_err());
        assert_eq!(
            Refused::read(r#"{"ok":false,"error":"unknown"}"#).map(|r| r.error),
            Some("unknown".into())
        );
        assert!(Refused::read(r#"{"ok":true}"#).is_none());
    }

    #[test]
    fn requests_are_one_word_each() {
        for r in [Request::Status, Request::Upgrade, Request::Drain] {
            assert_eq!(Request::parse(&format!("{}\n", r.as_str())), Some(r));
        }
        assert_eq!(Request::parse("reboot"), None);
    }

    #[test]
    fn the_text_for_people() {
        let text = status(Some(UpgradeOutcome::Upgraded { pid: 8 })).to_string();
        assert_eq!(
            text,
            "pid 42\ngeneration 2\nphase draining\nconnections 10 (new 1, active 2, idle 3, hijacked 4)\n\
             handed over: received 5 from the previous generation, sent 6 to the next\nlast upgrade ok, pid 8\n"
        );
    }
}
