//! `GET /lines` with `Upgrade: lines`: a protocol of the demo's own after `101 Switching
//! Protocols`, to show an upgraded connection other than a WebSocket moving at an upgrade
//! (`grace_http::Movable::raw`). Each line the client sends is answered with
//! `"<pid> <line>\n"`; a line is answered once it is whole. At an upgrade the handler moves
//! between two reads, its state the start of a line not finished yet, which the new
//! generation completes.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use grace_http::{Movable, ShutdownNotice};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upgraded::{Moves, asked, drained};

/// The kind it moves as.
const KIND: &str = "lines";

/// The longest line kept (a longer one is cut into pieces of this length).
const MAX_LINE: usize = 4096;

/// Registers, on `restart`, the handler that resumes these connections.
pub fn resume(restart: grace_http::Restart) -> grace_http::Restart {
    restart.resume(KIND, |socket, state| async move {
        let notice = socket.notice();
        serve(socket, state.to_vec(), Some(notice)).await;
    })
}

/// `GET /lines` with `Upgrade: lines`.
pub async fn route(mut req: Request) -> Response {
    let asks = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("lines"));
    if !asks {
        return (StatusCode::UPGRADE_REQUIRED, [(header::UPGRADE, "lines")]).into_response();
    }
    let notice = req.extensions().get::<ShutdownNotice>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        match Movable::raw(upgraded, KIND) {
            Ok(socket) => serve(socket, Vec::new(), notice).await,
            // Through TLS, or over HTTP/2: served here to the end.
            Err(upgraded) => serve(TokioIo::new(upgraded), Vec::new(), notice).await,
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("lines"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response
}

/// Answers each whole line; moves when asked (with the line begun as its state); ends at
/// the drain (the client sees the connection close).
async fn serve<S: Moves>(mut io: S, mut line: Vec<u8>, notice: Option<ShutdownNotice>) {
    let mover = io.mover();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            n = io.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let answers = take_lines(&mut line, &buf[..n]);
                    // Flushed: through TLS the records would wait in the session otherwise.
                    let written = async {
                        io.write_all(&answers).await?;
                        io.flush().await
                    };
                    if !answers.is_empty() && written.await.is_err() {
                        return;
                    }
                }
            },
            () = asked(mover.as_ref()) => {
                // On failure it stays here, read as before (the line is at most 4 KiB, far
                // below the 64 KiB a state may carry).
                if io.hand_over(&line).await.is_ok() {
                    return;
                }
            }
            () = drained(notice.as_ref()) => return,
        }
    }
}

/// Adds `bytes` to the line begun; returns the answers to the lines they complete.
fn take_lines(line: &mut Vec<u8>, bytes: &[u8]) -> Vec<u8> {
    let pid = std::process::id().to_string();
    let mut answers = Vec::new();
    for &b in bytes {
        if b == b'\n' || line.len() == MAX_LINE {
            answers.extend_from_slice(pid.as_bytes());
            answers.push(b' ');
            answers.append(line);
            answers.push(b'\n');
            if b == b'\n' {
                continue;
            }
        }
        line.push(b);
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_answered_once_whole_and_long_ones_in_pieces() {
        let pid = std::process::id();
        let mut line = b"he".to_vec();
        assert_eq!(
            take_lines(&mut line, b"llo\nwor"),
            format!("{pid} hello\n").into_bytes()
        );
        assert_eq!(line, b"wor");
        assert_eq!(
            take_lines(&mut line, b"ld\n\n"),
            format!("{pid} world\n{pid} \n").into_bytes()
        );
        assert!(line.is_empty());
        let long = vec![b'x'; MAX_LINE + 1];
        let answers = take_lines(&mut line, &long);
        assert_eq!(answers.len(), pid.to_string().len() + 1 + MAX_LINE + 1);
        assert_eq!(line, b"x");
    }
}
