//! The service of `docs/from-axum.md`, converted from `axum::serve` to grace, run against a
//! real PostgreSQL (`GRACE_TEST_POSTGRES_URL`; skipped, and said so, without it): its
//! `Router` reads the client's address with `ConnectInfo` and queries the pool, its job is
//! written for a `CancellationToken`, its pool closes as a `Resource` once the job is done.
//! `app`, `hello`, `now` and `refresh` are the document's, word for word.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::{Router, routing::get};
use grace_http::{DrainPolicy, Outcome, Resource, Server, Trigger};
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

fn app(pool: PgPool) -> Router {
    Router::new()
        .route("/", get(hello))
        .route("/now", get(now))
        .with_state(pool)
}

async fn hello(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    format!("hello, {peer}\n")
}

async fn now(State(pool): State<PgPool>) -> Result<String, StatusCode> {
    sqlx::query_scalar::<_, String>("SELECT now()::text")
        .fetch_one(&pool)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
}

/// A unit of work every 10 s (a report, a cache refresh), until told to stop.
async fn refresh(pool: PgPool, stop: CancellationToken) -> Result<(), sqlx::Error> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        sqlx::query("SELECT 1").execute(&pool).await?; // the unit, always finished
    }
}

/// `GET path` on a fresh connection: the client's own address, the status and the body.
async fn fetch(addr: SocketAddr, path: &str) -> (SocketAddr, u16, String) {
    let mut c = grace_testkit::Client::connect(addr).await;
    let me = c.io.get_ref().local_addr().unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    c.write(req.as_bytes()).await;
    let resp = tokio::time::timeout(Duration::from_secs(10), c.read_response())
        .await
        .expect("no response")
        .unwrap();
    (me, resp.status, resp.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_converted_axum_service_serves_and_stops_in_order() {
    let url = match std::env::var("GRACE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            println!("skipped: GRACE_TEST_POSTGRES_URL not set");
            return;
        }
    };
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .unwrap();
    // What the test watches: the order in which the job and the pool are done.
    let order = Arc::new(Mutex::new(Vec::new()));

    // The document's `main`, on a free port, stopped by a future of the test's rather than
    // a signal.
    let server = Server::bind("127.0.0.1:0")
        .await
        .unwrap()
        .drain_policy(DrainPolicy::default().shutdown_timeout(Duration::from_secs(30)));
    let addr = server.local_addrs()[0].as_tcp().unwrap();
    let handle = server.handle();

    let (p, done) = (pool.clone(), Arc::clone(&order));
    handle.spawn_job("refresh", move |token| async move {
        let ended = refresh(p, token.cancellation_token()).await;
        done.lock().unwrap().push("job");
        ended
    });

    let (db, done) = (pool.clone(), Arc::clone(&order));
    handle.add_resource(
        Resource::new("db", move || async move {
            db.close().await;
            done.lock().unwrap().push("db");
            Ok::<_, std::convert::Infallible>(())
        })
        .timeout(Duration::from_secs(5)),
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(async move {
        server
            .serve(app(pool))
            .with_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });

    // `ConnectInfo<SocketAddr>` with no `into_make_service_with_connect_info`: the client's
    // own address.
    let (me, status, body) = fetch(addr, "/").await;
    assert_eq!((status, body), (200, format!("hello, {me}\n")));
    let (_, status, body) = fetch(addr, "/now").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("20"), "not a timestamp: {body}");
    assert!(order.lock().unwrap().is_empty());

    stop.send(()).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(40), served)
        .await
        .expect("the stop did not end")
        .unwrap()
        .unwrap();
    assert_eq!(report.trigger, Trigger::ShutdownFuture);
    assert!(report.is_clean(), "{}", report.to_json());
    let lines = |tasks: &[grace_http::TaskReport]| -> Vec<(String, Outcome)> {
        tasks.iter().map(|t| (t.name.clone(), t.outcome)).collect()
    };
    assert_eq!(
        lines(&report.jobs),
        [("refresh".to_owned(), Outcome::Closed)]
    );
    assert_eq!(
        lines(&report.resources),
        [("db".to_owned(), Outcome::Closed)]
    );
    // The job was done with the pool before the pool closed.
    assert_eq!(*order.lock().unwrap(), ["job", "db"]);
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}
