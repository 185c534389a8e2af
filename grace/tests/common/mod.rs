//! Helpers shared by the integration tests: a server on 127.0.0.1:0 and a raw HTTP/1 client
//! that shows exactly what went over the socket.
#![allow(dead_code)]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grace_http::{ConnState, Handle, Server, ShutdownReport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A loose bound for anything that should be immediate: never flakes, still catches a hang.
pub const SOON: Duration = Duration::from_secs(5);

pub struct Running {
    pub addr: SocketAddr,
    pub handle: Handle,
    pub served: JoinHandle<grace_http::Result<ShutdownReport>>,
    pub states: Arc<Mutex<Vec<(u64, ConnState)>>>,
}

impl Running {
    /// Waits for `serve` to return, within `SOON` after the given budget.
    pub async fn report(&mut self, budget: Duration) -> ShutdownReport {
        tokio::time::timeout(budget + SOON, &mut self.served)
            .await
            .expect("serve did not return in time")
            .expect("serve task panicked")
            .expect("serve failed")
    }

    /// The states seen by the hook for one connection, in order.
    pub fn states_of(&self, id: u64) -> Vec<ConnState> {
        self.states
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| *i == id)
            .map(|(_, s)| *s)
            .collect()
    }

    /// Waits until the live counts satisfy `f`.
    pub async fn wait_counts(&self, f: impl Fn(grace_http::StateCounts) -> bool) {
        let h = self.handle.clone();
        tokio::time::timeout(SOON, async move {
            while !f(h.counts()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("counts never matched: {:?}", self.handle.counts()));
    }
}

/// Starts a grace server for `app` with `configure` applied to the builder.
pub async fn start<S, B>(app: S, configure: impl FnOnce(Server) -> Server) -> Running
where
    S: tower::Service<http::Request<grace_http::RequestBody>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let server = Server::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addrs()[0].as_tcp().unwrap();
    let states = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&states);
    let server = configure(server).on_conn_state(move |info, state| {
        seen.lock().unwrap().push((info.id(), state));
    });
    let handle = server.handle();
    let served = tokio::spawn(server.serve(app).into_future());
    Running {
        addr,
        handle,
        served,
        states,
    }
}

/// The app most tests use: `/`, `/sleep/{ms}`, `/panic`.
pub fn app() -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/sleep/{ms}",
            get(
                |axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    format!("slept {ms}")
                },
            ),
        )
        .route(
            "/echo",
            axum::routing::post(|body: String| async move { body }),
        )
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("handler bug");
                }
                "unreachable"
            }),
        )
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A raw HTTP/1.1 connection, over TCP or any other stream (TLS).
pub struct Client<S = TcpStream> {
    pub io: BufReader<S>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::over(TcpStream::connect(addr).await.unwrap())
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    pub fn over(stream: S) -> Client<S> {
        Client {
            io: BufReader::new(stream),
        }
    }

    pub async fn send(&mut self, path: &str) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.io.get_mut().write_all(req.as_bytes()).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
    }

    /// Reads one response; `None` if the server closed the connection first.
    pub async fn read(&mut self) -> Option<Resp> {
        let mut line = String::new();
        if self.io.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let status = line.split_whitespace().nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.io.read_line(&mut line).await.ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':')?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut resp = Resp {
            status,
            headers,
            body: String::new(),
        };
        if let Some(len) = resp.header("content-length") {
            let mut body = vec![0; len.parse().ok()?];
            self.io.read_exact(&mut body).await.ok()?;
            resp.body = String::from_utf8_lossy(&body).into_owned();
        } else if resp.header("transfer-encoding") == Some("chunked") {
            loop {
                line.clear();
                self.io.read_line(&mut line).await.ok()?;
                let n = usize::from_str_radix(line.trim(), 16).ok()?;
                let mut chunk = vec![0; n + 2];
                self.io.read_exact(&mut chunk).await.ok()?;
                if n == 0 {
                    break;
                }
                resp.body.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
        Some(resp)
    }

    pub async fn get(&mut self, path: &str) -> Option<Resp> {
        self.send(path).await;
        self.read().await
    }

    /// True once the server has closed the connection (EOF or reset), within `SOON`.
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(SOON, self.io.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
