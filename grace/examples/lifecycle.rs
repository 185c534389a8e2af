//! Beyond HTTP: a background job, resources closed in order, readiness for load balancers,
//! and a pre-stop delay.
//!
//! ```sh
//! cargo run -p grace-http --example lifecycle
//! curl -i localhost:3000/readyz       # 200; after Ctrl-C: 503 for the 2 s pre-stop delay
//! ```

use std::time::Duration;

use axum::routing::get;
use grace_http::{JobToken, Liveness, Resource, Server};

#[tokio::main]
async fn main() -> Result<(), grace_http::Error> {
    let server = Server::bind("127.0.0.1:3000").await?.drain_policy(
        grace_http::DrainPolicy::default()
            .pre_stop_delay(Duration::from_secs(2))
            .shutdown_timeout(Duration::from_secs(20)),
    );
    let handle = server.handle();

    handle.spawn_job("ticker", |token: JobToken| async move {
        let mut ticks = 0u64;
        while !token.is_stopping() {
            ticks += 1; // one unit of work, never abandoned half-way
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = token.stopping() => {}
            }
        }
        println!("ticker stopped after {ticks} ticks");
        Ok::<_, std::io::Error>(())
    });
    // Closed last-registered first, unless `depends_on` says otherwise.
    handle.add_resource(Resource::new("database", || async {
        println!("database pool closed");
        Ok::<_, std::io::Error>(())
    }));
    handle.add_resource(
        Resource::new("cache", || async {
            println!("cache client closed");
            Ok::<_, std::io::Error>(())
        })
        .timeout(Duration::from_secs(2)),
    );

    let app = axum::Router::new()
        .route("/", get(|| async { "hello\n" }))
        .route_service("/readyz", handle.readiness())
        .route_service("/healthz", Liveness);
    let report = server.serve(app).with_signals().await?;
    println!("{}", report.to_json());
    Ok(())
}
