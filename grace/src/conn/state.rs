//! The connection state machine, apart from any I/O: one pure function from a state and an
//! event to the next state. The tracker applies it atomically (see `Conn::apply`); the
//! socket wrapper, the request wrappers and the tracker only report events.
//! The diagram is in `docs/architecture.md` ("The state machine").

use super::ConnState;

/// What can happen to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The socket delivered bytes: a first byte, or (HTTP/1) the next request's first byte.
    Bytes,
    /// The bytes were HTTP/2's connection preface: no stream is open yet.
    Preface,
    /// A request (HTTP/1) or a stream (HTTP/2) began.
    RequestStarted,
    /// Every response is written (HTTP/1: flushed to the socket; HTTP/2: the last open
    /// stream ended).
    ResponseDone,
    /// `101 Switching Protocols`: the handler owns the byte stream now.
    Upgraded,
    /// The socket is closing.
    Close,
}

/// Where `event` takes a connection in state `from`; `None` when it stays where it is.
/// `Closed` is final, `Hijacked` is left only for `Closed`.
#[inline]
pub(crate) fn transition(from: ConnState, event: Event) -> Option<ConnState> {
    use ConnState::*;
    use Event::*;
    let to = match (from, event) {
        (Closed, _) => return None,
        (_, Close) => Closed,
        (Hijacked, _) => return None,
        (New | Idle, Bytes | RequestStarted) => Active,
        (Active, Preface | ResponseDone) => Idle,
        (New | Active | Idle, Upgraded) => Hijacked,
        (New | Idle, Preface | ResponseDone) | (Active, Bytes | RequestStarted) => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnState::*;
    use Event::*;

    const STATES: [ConnState; 5] = [New, Active, Idle, Hijacked, Closed];
    const EVENTS: [Event; 6] = [
        Bytes,
        Preface,
        RequestStarted,
        ResponseDone,
        Upgraded,
        Close,
    ];

    /// Every edge of the machine, and every pair that must not move.
    #[test]
    fn every_state_and_event() {
        let expected = |from: ConnState, event: Event| -> Option<ConnState> {
            match (from, event) {
                (New, Bytes) | (New, RequestStarted) => Some(Active),
                (Idle, Bytes) | (Idle, RequestStarted) => Some(Active),
                (Active, Preface) | (Active, ResponseDone) => Some(Idle),
                (New, Upgraded) | (Active, Upgraded) | (Idle, Upgraded) => Some(Hijacked),
                (New | Active | Idle | Hijacked, Close) => Some(Closed),
                _ => None,
            }
        };
        let mut moves = 0;
        for from in STATES {
            for event in EVENTS {
                let got = transition(from, event);
                assert_eq!(got, expected(from, event), "{from:?} on {event:?}");
                moves += usize::from(got.is_some());
            }
        }
        assert_eq!(moves, 13, "the machine has 13 edges");
    }

    #[test]
    fn closed_is_final_and_hijacked_only_closes() {
        for event in EVENTS {
            assert_eq!(transition(Closed, event), None);
            let expect = (event == Close).then_some(Closed);
            assert_eq!(transition(Hijacked, event), expect);
        }
    }
}
