//! `GET /v1/functions/{name}/logs`: a function's recent stderr lines and access
//! records, or a live stream of them.

use std::convert::Infallible;

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cloudpipe_types::LogList;
use futures::Stream;
use serde::Deserialize;

use crate::auth::Caller;
use crate::extract::{Path, Query};
use crate::{ApiError, AppState};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    /// `1` or `true`: keep the stream open and send new lines as server-sent events.
    follow: Option<String>,
}

/// A function's recent log: its stderr lines and one access record per invocation.
#[utoipa::path(get, path = "/v1/functions/{name}/logs", tag = "functions", params(("name" = String, Path), LogParams),
    responses((status = 200, body = LogList), (status = 404, body = cloudpipe_types::ErrorBody)))]
pub async fn get_function_logs(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(p): Query<LogParams>,
) -> Result<Response, ApiError> {
    let Some(meta) = state.runtime.registry.get(&caller.scope(), &name).await? else {
        return Err(ApiError::NotFound(format!("function {name:?} not found")));
    };
    let (lines, live) = state.logs.snapshot(&crate::logs::key(&meta.account, &name));
    let follow = matches!(p.follow.as_deref(), Some("1") | Some("true"));
    if !follow {
        return Ok(Json(LogList { lines }).into_response());
    }
    let stopping = state.runtime.scheduler.stopping().clone();
    Ok(Sse::new(follow_stream(lines, live, stopping))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn follow_stream(
    lines: Vec<cloudpipe_types::LogLine>,
    mut live: tokio::sync::broadcast::Receiver<cloudpipe_types::LogLine>,
    stopping: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let event = |l: &cloudpipe_types::LogLine| {
        Event::default().event("log").json_data(l).unwrap_or_default()
    };
    let first: Vec<_> = lines.iter().map(event).map(Ok).collect();
    let rest = crate::routes::task_stream(move |tx| async move {
        loop {
            let next = tokio::select! {
                next = live.recv() => next,
                _ = tx.closed() => return,
                _ = stopping.cancelled() => return,
            };
            match next {
                Ok(l) => {
                    if tx.send(event(&l)).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    let note = Event::default().event("lagged").data(n.to_string());
                    if tx.send(note).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    futures::StreamExt::chain(futures::stream::iter(first), rest)
}
