//! Extractors that answer bad input with the API's error (`{"error": {"code",
//! "message"}}`, 400) rather than axum's plain-text rejections: [`Query`], [`Path`] and
//! [`Json`], which is also the JSON answer.

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{ApiError, AppState, read_body};

/// Query-string parameters (`invalid_query`).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(q)
            .map(Query)
            .map_err(|e| ApiError::bad("invalid_query", format!("bad query string: {e}")))
    }
}

/// Path parameters (`invalid_path`: a segment that is not UTF-8, say).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::bad("invalid_path", e.body_text()))
    }
}

/// A JSON request body of at most the server's `max_json_body` bytes (413 past it,
/// `invalid_json` when it does not parse), or a JSON answer.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_json(req.into_body(), state.config.max_json_body).await.map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Reads a JSON body of at most `limit` bytes, for handlers that check something
/// before reading it or take another limit.
pub(crate) async fn read_json<T: DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    parse_json(&read_body(body, limit).await?)
}

/// A JSON body parsed with our error shape (axum's own rejections are plain text).
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad(
            "invalid_json",
            format!("request body is not valid JSON for this endpoint: {e}"),
        )
    })
}
