//! The demo's HTTP routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use futures_util::stream;
use grace_http::ShutdownNotice;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::ledger::{Ledger, LedgerError};

/// Every route: the demo endpoints, the probes, and the ledger API.
pub fn router(ledger: Arc<Ledger>, handle: &grace_http::Handle) -> Router {
    let api = Router::new()
        .route("/accounts", post(create_account))
        .route("/accounts/{id}", get(get_account))
        .route("/transfers", post(create_transfer))
        .route("/transfers/{id}", get(get_transfer))
        .with_state(ledger);
    Router::new()
        .route("/", get(crate::config::greet))
        // Liveness: 200 as long as the process runs. Readiness: 503 once a drain is asked
        // for (before the pre-stop delay), so load balancers stop routing here first.
        .route_service("/healthz", grace_http::Liveness)
        .route_service("/readyz", handle.readiness())
        .route("/sleep/{ms}", get(sleep))
        .route("/stream/{n}", get(stream_chunks))
        // `any`: HTTP/1.1's GET + Upgrade, and HTTP/2's extended CONNECT (RFC 8441).
        .route(
            "/ws",
            any(|req| crate::ws::route(crate::ws::Kind::Echo, req)),
        )
        .route(
            "/ws/counter",
            any(|req| crate::ws::route(crate::ws::Kind::Counter, req)),
        )
        // A protocol of the demo's own after an upgrade (`Upgrade: lines`), moved too.
        .route("/lines", get(crate::lines::route))
        .route("/events", get(events).with_state(handle.notice()))
        .route("/whoami", get(whoami))
        .merge(api)
}

/// Who the client is, as the handler sees it: the peer address (axum's `ConnectInfo`
/// extractor for TCP, grace's `ConnAddrs` for any listener) and, over TLS, the ALPN protocol
/// and the server name the client asked for.
async fn whoami(
    Extension(addrs): Extension<grace_http::ConnAddrs>,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
    tls: Option<Extension<grace_http::tls::TlsInfo>>,
) -> Json<serde_json::Value> {
    let tls = tls.map(|Extension(t)| {
        serde_json::json!({
            "alpn": t.alpn_protocol().map(String::from_utf8_lossy),
            "sni": t.server_name(),
            "version": t.protocol_version(),
        })
    });
    Json(serde_json::json!({
        // Which process answered: across upgrades, a kept connection meets each generation.
        "pid": std::process::id(),
        "peer": addrs.peer().to_string(),
        "connect_info": connect_info.map(|Extension(ConnectInfo(a))| a.to_string()),
        "tls": tls,
    }))
}

/// A ledger error as an HTTP answer: `{"error": "..."}` with its status.
impl IntoResponse for LedgerError {
    fn into_response(self) -> Response {
        let status = match &self {
            LedgerError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            LedgerError::NotFound(_) => StatusCode::NOT_FOUND,
            LedgerError::Conflict(_) => StatusCode::CONFLICT,
            LedgerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            LedgerError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, &self.to_string())
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// A request body parsed as JSON, whatever the content type: `400` when it is not the
/// expected object, `408 Request Timeout` when the client sent it too slowly
/// (`--request-body-timeout`; the connection closes after it), axum's answer when it could
/// not be read otherwise.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let body =
            Bytes::from_request(req, state).await.map_err(
                |e| match grace_http::BodyTimeout::find(&e) {
                    Some(timeout) => error(StatusCode::REQUEST_TIMEOUT, &timeout.to_string()),
                    None => e.into_response(),
                },
            )?;
        serde_json::from_slice(&body)
            .map(JsonBody)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("malformed JSON: {e}")))
    }
}

#[derive(Deserialize)]
struct NewAccount {
    id: String,
    balance: i64,
}

#[derive(Deserialize)]
struct NewTransfer {
    from: String,
    to: String,
    amount: i64,
}

async fn create_account(
    State(ledger): State<Arc<Ledger>>,
    JsonBody(req): JsonBody<NewAccount>,
) -> Response {
    match ledger.create_account(req.id, req.balance).await {
        Ok(account) => (StatusCode::CREATED, Json(account)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_account(State(ledger): State<Arc<Ledger>>, Path(id): Path<String>) -> Response {
    match ledger.account(&id).await {
        Ok(account) => Json(account).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_transfer(
    State(ledger): State<Arc<Ledger>>,
    JsonBody(req): JsonBody<NewTransfer>,
) -> Response {
    match ledger.transfer(req.from, req.to, req.amount).await {
        Ok(id) => Json(serde_json::json!({ "id": id })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_transfer(State(ledger): State<Arc<Ledger>>, Path(id): Path<String>) -> Response {
    match ledger.transfer_by_id(&id).await {
        Ok(transfer) => Json(transfer).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn sleep(Path(ms): Path<u64>) -> String {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept {ms} ms\n")
}

/// `n` chunks, 100 ms apart.
async fn stream_chunks(Path(n): Path<u32>) -> Response {
    let chunks = stream::unfold(0u32, move |i| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some((
            Ok::<_, std::convert::Infallible>(format!("chunk {i}\n")),
            i + 1,
        ))
    });
    Response::new(axum::body::Body::from_stream(chunks))
}

/// A server-sent event stream: an event every 200 ms. When the server drains it ends with a
/// `retry:` hint — short after an upgrade (a new generation serves already), longer at a
/// shutdown — so EventSource clients reconnect when it makes sense, not all at once.
async fn events(State(notice): State<ShutdownNotice>) -> Response {
    let ticks = stream::unfold((0u64, Some(notice)), |(i, notice)| async move {
        let notice = notice?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let event = format!("id: {i}\ndata: tick {i}\n\n");
                Some((Ok::<_, std::convert::Infallible>(event), (i + 1, Some(notice))))
            }
            _ = notice.wait() => {
                let retry_ms = if notice.is_restart() { 100 } else { 5_000 };
                let bye = format!("event: goodbye\nretry: {retry_ms}\ndata: draining\n\n");
                Some((Ok(bye), (i, None)))
            }
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(ticks));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    response
}
