//! Life after the HTTP drain, on a real server: background jobs stop after the last request
//! and finish their unit of work; resources close in dependency order, each within its
//! timeout; one that hangs is cut and the others still close; the report says which.
//! Readiness fails the moment a drain is asked for while in-flight requests finish.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, SOON, app, start};
use grace_http::{JobToken, Outcome, Resource};
use tower::ServiceExt as _;

/// Who closed, in order, and when.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Instant)>>>);

impl Log {
    fn push(&self, what: &str) {
        self.0
            .lock()
            .unwrap()
            .push((what.to_owned(), Instant::now()));
    }

    fn names(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn at(&self, what: &str) -> Instant {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(n, _)| n == what)
            .unwrap_or_else(|| panic!("{what} never happened"))
            .1
    }
}

/// A resource that logs its close.
fn logged(name: &'static str, log: &Log) -> Resource {
    let log = log.clone();
    Resource::new(name, move || async move {
        log.push(name);
        Ok::<_, std::io::Error>(())
    })
}

/// A resource whose close never returns; logs when its close future is dropped (cut).
fn hanging(name: &'static str, log: &Log) -> Resource {
    struct OnDrop(Log, &'static str);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.push(self.1);
        }
    }
    let log = log.clone();
    Resource::new(name, move || async move {
        let _cut = OnDrop(log, "hang-cut");
        std::future::pending::<Result<(), std::io::Error>>().await
    })
}

/// Each line of a report's jobs or resources: its name and how it ended.
fn outcomes(lines: &[grace_http::TaskReport]) -> Vec<(&str, Outcome)> {
    lines.iter().map(|l| (l.name.as_str(), l.outcome)).collect()
}

#[tokio::test]
async fn a_hanging_resource_is_cut_at_its_timeout_and_the_others_still_close() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(20)))
    })
    .await;
    let log = Log::default();
    // Registered "db" first; the other two use it, so it must close last.
    srv.handle
        .add_resource(logged("db", &log).timeout(Duration::from_secs(2)));
    srv.handle.add_resource(
        hanging("cache", &log)
            .timeout(Duration::from_millis(300))
            .depends_on(["db"]),
    );
    srv.handle
        .add_resource(logged("audit", &log).depends_on(["db"]));

    let t = Instant::now();
    srv.handle.shutdown();
    let report = srv.report(Duration::from_secs(3)).await;
    let took = t.elapsed();

    let lines = outcomes(&report.resources);
    assert_eq!(
        lines,
        [
            ("audit", Outcome::Closed),
            ("cache", Outcome::TimedOut),
            ("db", Outcome::Closed)
        ],
        "{}",
        report.to_json()
    );
    let cache = &report.resources[1];
    assert!(
        cache.took >= Duration::from_millis(290) && cache.took < Duration::from_millis(1_500),
        "cut after {:?}, timeout 300 ms",
        cache.took
    );
    assert!(cache.error.as_deref().unwrap_or("").contains("cut after"));
    // The hanging close was really stopped (its future dropped) before "db" closed.
    assert_eq!(log.names(), ["audit", "hang-cut", "db"]);
    assert!(log.at("db") >= log.at("hang-cut"));
    assert!(!report.is_clean(), "a cut resource is not a clean shutdown");
    assert!(
        report
            .to_json()
            .contains(r#""name":"cache","outcome":"timed_out""#)
    );
    // Far from the 20 s deadline: it waited 300 ms for the hanging one, not more.
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
}

#[tokio::test]
async fn the_stop_deadline_holds_over_resource_timeouts_and_later_resources_still_close() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().stop_deadline(Duration::from_secs(2)))
    })
    .await;
    let log = Log::default();
    srv.handle
        .add_resource(logged("after", &log).timeout(Duration::from_secs(10)));
    // Closes first (last registered) and hangs: its own 10 s timeout does not fit in 2 s.
    srv.handle
        .add_resource(hanging("hang", &log).timeout(Duration::from_secs(10)));

    let t = Instant::now();
    srv.handle.shutdown();
    let report = srv.report(Duration::from_secs(2)).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(2_500),
        "stop deadline 2 s, shutdown took {took:?}"
    );
    let hang = &report.resources[0];
    assert_eq!(
        (hang.name.as_str(), hang.outcome),
        ("hang", Outcome::TimedOut)
    );
    // It got its share of the time left (half: 10 s of 20 s of timeouts), not all of it.
    assert!(
        hang.took >= Duration::from_millis(800) && hang.took < Duration::from_millis(1_600),
        "cut after {:?}",
        hang.took
    );
    let after = &report.resources[1];
    assert_eq!(
        (after.name.as_str(), after.outcome),
        ("after", Outcome::Closed),
        "{}",
        report.to_json()
    );
    assert_eq!(log.names(), ["hang-cut", "after"]);
}

#[tokio::test]
async fn jobs_stop_after_the_last_request_finish_their_unit_and_stragglers_are_cut() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(2)))
    })
    .await;
    let log = Log::default();

    // Works in 400 ms units with 10 ms between them; a unit once started is finished.
    let l = log.clone();
    srv.handle
        .spawn_job("worker", move |token: JobToken| async move {
            let t = token.clone();
            let tl = l.clone();
            tokio::spawn(async move {
                t.stopping().await;
                tl.push("token");
            });
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                    _ = token.stopping() => break,
                }
                l.push("unit-start");
                tokio::time::sleep(Duration::from_millis(400)).await;
                l.push("unit-end");
                if token.is_stopping() {
                    break;
                }
            }
            Ok::<_, std::io::Error>(())
        });
    // Ignores its token: cut at the deadline.
    srv.handle
        .spawn_job("straggler", |_token: JobToken| async move {
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(())
        });
    // A resource the jobs use closes only after them.
    srv.handle.add_resource(logged("db", &log));

    let mut c = Client::connect(srv.addr).await;
    let sent = Instant::now();
    c.send("/sleep/300").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    let resp = c.read().await.expect("in-flight request was cut");
    assert_eq!(resp.status, 200);

    let report = srv.report(Duration::from_secs(2)).await;
    let jobs = outcomes(&report.jobs);
    assert_eq!(
        jobs,
        [
            ("worker", Outcome::Closed),
            ("straggler", Outcome::TimedOut)
        ],
        "{}",
        report.to_json()
    );
    let names = log.names();
    // Jobs are told only after the HTTP drain: the request finished first.
    assert!(
        log.at("token") >= sent + Duration::from_millis(300),
        "jobs were stopped before the in-flight request finished"
    );
    // Every unit that started also ended: the one running at the notice was finished.
    let starts = names.iter().filter(|n| *n == "unit-start").count();
    let ends = names.iter().filter(|n| *n == "unit-end").count();
    assert!(starts >= 1);
    assert_eq!(starts, ends, "a unit of work was cut half-way: {names:?}");
    // The resource closed after both jobs.
    assert_eq!(names.last().map(String::as_str), Some("db"));
    // The straggler was cut at the drain deadline (2 s, minus the resources' reserve),
    // and the whole shutdown kept the deadline.
    assert!(
        report.total < Duration::from_millis(2_500),
        "{:?}",
        report.total
    );
}

#[tokio::test]
async fn readiness_fails_at_once_while_in_flight_requests_finish() {
    let mut srv = start(app(), |s| s).await;
    let ready = srv.handle.readiness();
    let probe = |r: grace_http::Readiness| async move {
        r.oneshot(http::Request::new(())).await.unwrap().status()
    };
    assert_eq!(probe(ready.clone()).await, 200);
    assert_eq!(
        grace_http::Liveness
            .oneshot(http::Request::new(()))
            .await
            .unwrap()
            .status(),
        200
    );

    let mut c = Client::connect(srv.addr).await;
    c.send("/sleep/500").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    // Nothing else has run since the request (single-threaded runtime): 503 from the
    // moment the drain is asked for, not from when the drain task gets to it.
    assert_eq!(probe(ready.clone()).await, 503);
    assert_eq!(
        grace_http::Liveness
            .oneshot(http::Request::new(()))
            .await
            .unwrap()
            .status(),
        200,
        "liveness stays 200 during the drain"
    );
    let resp = tokio::time::timeout(SOON, c.read())
        .await
        .unwrap()
        .expect("in-flight request was cut");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept 500"));
    assert_eq!(probe(ready).await, 503);
    let report = srv.report(Duration::ZERO).await;
    assert!(report.is_clean(), "{}", report.to_json());
}

#[tokio::test]
async fn a_force_during_the_resource_phase_cuts_what_is_still_closing() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(60)))
    })
    .await;
    let log = Log::default();
    srv.handle.add_resource(logged("db", &log));
    srv.handle.add_resource(
        hanging("cache", &log)
            .timeout(Duration::from_secs(30))
            .depends_on(["db"]),
    );
    let t = Instant::now();
    srv.handle.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.handle.force(); // e.g. a second SIGTERM
    let report = srv.report(Duration::ZERO).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "force did not cut the hanging close"
    );
    assert_eq!(report.forced_by, Some(grace_http::ForceReason::Handle));
    let outcomes = outcomes(&report.resources);
    assert_eq!(
        outcomes,
        [("cache", Outcome::TimedOut), ("db", Outcome::TimedOut)]
    );
    assert_eq!(
        log.names(),
        ["hang-cut"],
        "db must not be closed after a force"
    );
}

/// Issue 10: the shutdown timeout is the time in-flight work gets, all of it, as in Go's
/// `Shutdown(ctx)`: registered resources no longer take half of it.
#[tokio::test]
async fn a_request_shorter_than_the_shutdown_timeout_completes_though_resources_are_registered() {
    let mut srv = start(app(), |s| {
        s.drain_policy(grace_http::DrainPolicy::default().shutdown_timeout(Duration::from_secs(2)))
    })
    .await;
    let log = Log::default();
    srv.handle
        .add_resource(logged("db", &log).timeout(Duration::from_secs(5)));
    let mut client = Client::connect(srv.addr).await;
    client.send("/sleep/1500").await;
    srv.wait_counts(|c| c.active == 1).await;
    srv.handle.shutdown();
    let resp = tokio::time::timeout(SOON, client.read()).await.unwrap();
    let resp = resp.expect("the request was cut");
    assert_eq!((resp.status, resp.body.as_str()), (200, "slept 1500"));
    let report = srv.report(Duration::from_secs(2)).await;
    assert!(report.is_clean(), "{}", report.to_json());
    assert_eq!(log.names(), ["db"]);
}

/// Issue 10: with an overall stop deadline, in-flight work is cut early enough that the
/// resources still close inside it, and the report says which budget cut.
#[tokio::test]
async fn with_a_stop_deadline_resources_still_close_inside_it() {
    let mut srv = start(app(), |s| {
        s.drain_policy(
            grace_http::DrainPolicy::default()
                .shutdown_timeout(Duration::from_secs(30))
                .stop_deadline(Duration::from_millis(1_500)),
        )
    })
    .await;
    let log = Log::default();
    srv.handle.add_resource(
        Resource::new("slow-db", {
            let log = log.clone();
            move || async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                log.push("slow-db");
                Ok::<_, std::io::Error>(())
            }
        })
        .timeout(Duration::from_millis(700)),
    );
    let mut client = Client::connect(srv.addr).await;
    client.send("/sleep/60000").await;
    srv.wait_counts(|c| c.active == 1).await;
    let t = Instant::now();
    srv.handle.shutdown();
    let report = srv.report(Duration::from_millis(1_500)).await;
    let took = t.elapsed();
    assert_eq!(
        report.forced_by,
        Some(grace_http::ForceReason::StopDeadline)
    );
    assert_eq!(report.forced.len(), 1, "{}", report.to_json());
    assert_eq!(outcomes(&report.resources), [("slow-db", Outcome::Closed)]);
    // The request was cut 700 ms before the deadline, which left the resource its time.
    let cut = log.at("slow-db");
    assert!(cut.duration_since(t) < Duration::from_millis(1_500) + Duration::from_millis(300));
    assert!(
        took < Duration::from_secs(3),
        "stop deadline 1.5 s, took {took:?}"
    );
}
