//! [`Frames`]: where a WebSocket client's messages end, in the bytes read from its socket
//! (RFC 6455 §5.2), so that a [`Movable`](crate::Movable) hands a WebSocket over only
//! between two messages: everything given to the reader (the WebSocket library) then makes
//! whole messages, and everything after goes along unread.
//!
//! The reader is given one frame at a time, never the bytes of the next: a read ends at the
//! end of the frame under way. Only the frame headers are looked at; payloads pass through.

/// The state of the bytes given to the reader so far.
#[derive(Debug, Default)]
pub(crate) struct Frames {
    /// Bytes of the frame under way (header and payload) not given to the reader yet.
    left: u64,
    /// A data message has begun and its last frame (FIN) has not: the reader holds part of
    /// it.
    in_message: bool,
}

/// A frame header, read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// The header's length and the payload's: the frame's (saturating at `u64::MAX`).
    pub(crate) frame_len: u64,
    fin: bool,
    control: bool,
}

impl Frames {
    /// Whether the bytes given so far are whole messages (none under way).
    pub(crate) fn at_boundary(&self) -> bool {
        self.left == 0 && !self.in_message
    }

    /// Bytes of the frame under way still to give; 0 when the next header is due.
    pub(crate) fn left(&self) -> u64 {
        self.left
    }

    /// The next frame begins with `header`.
    pub(crate) fn start(&mut self, header: &Header) {
        self.left = header.frame_len;
        // Control frames (close, ping, pong) may come between the frames of a message and
        // neither begin nor end one.
        if !header.control {
            self.in_message = !header.fin;
        }
    }

    /// `n` bytes of the frame under way were given to the reader.
    pub(crate) fn gave(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
    }
}

/// Reads a frame header at the start of `bytes`: `None` while it is not all there.
pub(crate) fn header(bytes: &[u8]) -> Option<Header> {
    let (&b0, rest) = bytes.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let (payload, ext) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            2,
        ),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8),
        n => (u64::from(n), 0),
    };
    let masked = b1 & 0x80 != 0;
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    if bytes.len() < header_len {
        return None;
    }
    Some(Header {
        frame_len: payload.saturating_add(header_len as u64),
        fin: b0 & 0x80 != 0,
        control: b0 & 0x08 != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: `fin`, `opcode`, `payload`.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![u8::from(fin) << 7 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_header_is_read_only_once_whole_at_every_length_form() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let f = frame(true, 2, &vec![0; len]);
            let header_len = f.len() - len;
            for cut in 0..header_len {
                assert_eq!(header(&f[..cut]), None, "len {len}, cut {cut}");
            }
            let h = header(&f[..header_len]).unwrap();
            assert_eq!(h.frame_len, f.len() as u64);
        }
        // Unmasked (as a server sends), and a length at the limit of arithmetic.
        assert_eq!(header(&[0x81, 0x03]).unwrap().frame_len, 5);
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(header(&huge).unwrap().frame_len, u64::MAX);
    }

    #[test]
    fn a_boundary_is_only_between_whole_messages_pings_included() {
        let mut frames = Frames::default();
        assert!(frames.at_boundary());
        // A text message in two frames, a ping between them.
        let first = frame(false, 1, b"hel");
        let ping = frame(true, 9, b"p");
        let last = frame(true, 0, b"lo");
        for (f, boundary_after) in [(&first, false), (&ping, false), (&last, true)] {
            frames.start(&header(f).unwrap());
            assert!(!frames.at_boundary());
            frames.gave(f.len() - 1);
            assert!(!frames.at_boundary(), "one byte of the frame left");
            assert_eq!(frames.left(), 1);
            frames.gave(1);
            assert_eq!(frames.at_boundary(), boundary_after);
        }
        // A ping on its own is a whole message.
        frames.start(&header(&ping).unwrap());
        frames.gave(ping.len());
        assert!(frames.at_boundary());
    }
}
