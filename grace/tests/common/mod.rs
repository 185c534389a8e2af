//! Helpers shared by the integration tests: a server on 127.0.0.1:0, and from the
//! workspace's test kit a raw HTTP/1 client that shows exactly what went over the socket.
#![allow(dead_code)]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grace_http::{ConnState, Handle, Server, ShutdownReport};
// Each test uses some of these, as with `dead_code` above.
#[allow(unused_imports)]
pub use grace_testkit::{BoxError, Client, Response as Resp, SOON};
use tokio::task::JoinHandle;

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
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
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
