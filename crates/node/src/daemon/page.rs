//! The live status page (`GET /`) and the routes it and `blockmirror events`
//! read: `GET /events` (server-sent events; `?now=true` first sends the
//! current state), `GET /events/recent` and `GET /history` (JSON).
//!
//! The page is one HTML file with inline CSS, JavaScript and hand-drawn SVG
//! charts, embedded in the binary (`include_str!`): it fetches nothing from
//! the internet. It polls `/status` every second and `/history` and
//! `/events/recent` every two seconds (polling rather than an EventSource, so
//! that a headless browser's virtual time is not held by an open stream).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::sync::broadcast::error::RecvError;

use crate::daemon::admin::AdminSource;
use crate::daemon::events::Event;

/// The page itself.
pub const PAGE_HTML: &str = include_str!("page.html");

pub async fn get_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE_HTML,
    )
}

fn no_observer() -> Response {
    (StatusCode::NOT_FOUND, "this node keeps no events\n").into_response()
}

pub async fn get_history(State(source): State<Arc<dyn AdminSource>>) -> Response {
    match source.observer() {
        Some(o) => Json(o.history()).into_response(),
        None => no_observer(),
    }
}

pub async fn get_recent(State(source): State<Arc<dyn AdminSource>>) -> Response {
    match source.observer() {
        Some(o) => Json(o.recent()).into_response(),
        None => no_observer(),
    }
}

fn sse_event(e: &Event) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(serde_json::to_string(e).unwrap_or_else(|_| "{}".into())))
}

/// `GET /events[?now=true]`.
pub async fn get_events(State(source): State<Arc<dyn AdminSource>>, uri: Uri) -> Response {
    let Some(obs) = source.observer() else {
        return no_observer();
    };
    let now = uri.query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "now" || kv == "now=true" || kv == "now=1")
    });
    let (initial, rx) = obs.subscribe(&*source);
    let initial: Vec<Event> = if now { initial } else { Vec::new() };
    let closed = obs.closed.clone();
    let head = futures_util::stream::iter(initial.into_iter().map(|e| sse_event(&e)));
    let tail = futures_util::stream::unfold((rx, closed), |(mut rx, closed)| async move {
        let r = tokio::select! {
            _ = closed.cancelled() => return None,
            r = rx.recv() => r,
        };
        let item = match r {
            Ok(e) => sse_event(&e),
            // A slow reader missed `n` events: say so, then go on.
            Err(RecvError::Lagged(n)) => {
                Ok(SseEvent::default().event("lagged").data(n.to_string()))
            }
            Err(RecvError::Closed) => return None,
        };
        Some((item, (rx, closed)))
    });
    use futures_util::StreamExt as _;
    Sse::new(head.chain(tail))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
