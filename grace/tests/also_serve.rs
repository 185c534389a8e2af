//! Issue 22, item 2: several listeners in one server, each with a service of its own
//! (`Serve::also_serve`), under one stop: each answers its own routes, and one drain (one
//! deadline) ends the connections of both into one report.

mod common;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use common::{Client, SOON, app};
use grace_http::{DrainPolicy, Error, ForceReason, Listener, Server, ShutdownReport, Trigger};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The admin service: its own routes, none of the public ones.
fn admin_app() -> Router {
    Router::new()
        .route("/metrics", get(|| async { "admin metrics" }))
        .route(
            "/slow/{ms}",
            get(
                |axum::extract::Path(ms): axum::extract::Path<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    format!("admin slept {ms}")
                },
            ),
        )
        // A streamed body (chunks of another type than the main service's) comes through.
        .route(
            "/chunks",
            get(|| async {
                let chunks = futures_util::stream::iter(
                    ["a", "b", "c"].map(Ok::<_, std::convert::Infallible>),
                );
                axum::body::Body::from_stream(chunks)
            }),
        )
}

struct Two {
    public: SocketAddr,
    admin: SocketAddr,
    handle: grace_http::Handle,
    served: JoinHandle<grace_http::Result<ShutdownReport>>,
}

impl Two {
    async fn start(policy: DrainPolicy) -> Two {
        let server = Server::bind("127.0.0.1:0")
            .await
            .unwrap()
            .drain_policy(policy);
        let public = server.local_addrs()[0].as_tcp().unwrap();
        let admin = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let admin_addr = admin.local_addr().unwrap().as_tcp().unwrap();
        let handle = server.handle();
        let serve = server.serve(app()).also_serve("admin", admin, admin_app());
        let served = tokio::spawn(serve.into_future());
        Two {
            public,
            admin: admin_addr,
            handle,
            served,
        }
    }

    async fn report(self) -> ShutdownReport {
        tokio::time::timeout(SOON * 2, self.served)
            .await
            .expect("serve did not return in time")
            .expect("serve task panicked")
            .expect("serve failed")
    }

    async fn wait_active(&self, n: usize) {
        let h = self.handle.clone();
        tokio::time::timeout(SOON, async move {
            while h.counts().active != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("never {n} active: {:?}", self.handle.counts()));
    }
}

async fn status(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = tokio::time::timeout(SOON, Client::connect(addr).await.get(path))
        .await
        .expect("no answer")
        .expect("connection closed");
    (resp.status, resp.body)
}

#[tokio::test]
async fn each_listener_answers_its_own_routes_and_one_stop_drains_both_into_one_report() {
    let two = Two::start(DrainPolicy::default().shutdown_timeout(Duration::from_secs(30))).await;
    // Each service on its own listener, and only there.
    assert_eq!(status(two.public, "/").await, (200, "hello".into()));
    assert_eq!(status(two.public, "/metrics").await.0, 404);
    assert_eq!(
        status(two.admin, "/metrics").await,
        (200, "admin metrics".into())
    );
    assert_eq!(status(two.admin, "/").await.0, 404);
    assert_eq!(status(two.admin, "/chunks").await, (200, "abc".into()));

    // Work in flight on both, an idle keep-alive connection on the admin port.
    let mut public_busy = Client::connect(two.public).await;
    public_busy.send("/sleep/400").await;
    let mut admin_busy = Client::connect(two.admin).await;
    admin_busy.send("/slow/400").await;
    let mut admin_idle = Client::connect(two.admin).await;
    assert_eq!(admin_idle.get("/metrics").await.unwrap().status, 200);
    two.wait_active(2).await;
    assert_eq!(two.handle.counts().idle, 1, "{:?}", two.handle.counts());

    two.handle.shutdown();
    // Both listeners close; the idle admin connection closes at once; both requests finish.
    assert!(
        admin_idle.closed().await,
        "the idle admin connection stayed"
    );
    let public_answer = public_busy.read().await.expect("public request cut");
    assert_eq!(
        (public_answer.status, &*public_answer.body),
        (200, "slept 400")
    );
    assert_eq!(public_answer.header("connection"), Some("close"));
    let admin_answer = admin_busy.read().await.expect("admin request cut");
    assert_eq!(
        (admin_answer.status, &*admin_answer.body),
        (200, "admin slept 400")
    );
    assert_eq!(admin_answer.header("connection"), Some("close"));
    for addr in [two.public, two.admin] {
        let err = TcpStream::connect(addr).await.expect_err("still accepting");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}");
    }
    let report = two.report().await;
    assert_eq!(report.trigger, Trigger::Handle);
    assert_eq!(
        (report.at_start.active, report.at_start.idle),
        (2, 1),
        "{report:?}"
    );
    assert_eq!(report.requests_completed, 2, "{report:?}");
    assert_eq!(report.closed, 3, "{report:?}");
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test]
async fn one_deadline_forces_what_is_left_on_either_listener() {
    let two = Two::start(DrainPolicy::default().shutdown_timeout(Duration::from_millis(500))).await;
    let mut public_quick = Client::connect(two.public).await;
    public_quick.send("/sleep/100").await;
    let mut admin_stuck = Client::connect(two.admin).await;
    admin_stuck.send("/slow/60000").await;
    two.wait_active(2).await;
    two.handle.shutdown();
    assert_eq!(public_quick.read().await.expect("cut").status, 200);
    assert!(
        admin_stuck.closed().await,
        "the admin request outlived the deadline"
    );
    let report = two.report().await;
    assert_eq!(report.forced_by, Some(ForceReason::Deadline), "{report:?}");
    assert_eq!(report.forced.len(), 1, "{report:?}");
    assert_eq!(report.closed, 1, "{report:?}");
}

#[tokio::test]
async fn a_name_that_cannot_be_passed_on_or_is_taken_is_refused() {
    for name in ["grace", "a:b", "", "two words"] {
        let server = Server::bind("127.0.0.1:0").await.unwrap();
        let admin = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let served = server
            .serve(app())
            .also_serve(name, admin, admin_app())
            .await;
        assert!(
            matches!(served, Err(Error::ListenerName { .. })),
            "{name:?}: {served:?}"
        );
    }
    let server = Server::bind("127.0.0.1:0").await.unwrap();
    let [a, b] = ["127.0.0.1:0"; 2].map(|a| Listener::bind(a.parse().unwrap()).unwrap());
    let served = server
        .serve(app())
        .also_serve("admin", a, admin_app())
        .also_serve("admin", b, admin_app())
        .await;
    assert!(
        matches!(served, Err(Error::ListenerName { .. })),
        "{served:?}"
    );
}
