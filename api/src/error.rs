//! [`ApiError`]: every error answer, as `{"error": {"code", "message"}}` with the right
//! status. The full cause chain of internal errors is logged, never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cloudpipe_runtime::registry::UploadError;
use cloudpipe_runtime::scheduler::SubmitError;
use cloudpipe_runtime::secrets::SecretError;
use cloudpipe_runtime::store::StorageFull;
use cloudpipe_types::{ErrorBody, ErrorDetail};

/// An error answer. Variants name the outcome; `code` is stable for programs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("request body is over the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// No credentials, or credentials that are not valid (401).
    #[error("{1}")]
    Unauthorized(&'static str, String),
    /// Valid credentials without the right (403).
    #[error("{1}")]
    Forbidden(&'static str, String),
    /// The request conflicts with what exists (409).
    #[error("{1}")]
    Conflict(&'static str, String),
    /// Past one of the account's quotas (429).
    #[error("{0}")]
    QuotaExceeded(String),
    /// Past one of the account's quotas, with a code that names which (429).
    #[error("{1}")]
    QuotaExceededOf(&'static str, String),
    /// Too many failed authentications from this address (429).
    #[error("too many failed authentications from this address; retry in {}s", .0.as_secs() + 1)]
    TooManyAuthFailures(std::time::Duration),
    /// The external authentication service did not answer (503).
    #[error("{0}")]
    AuthUnavailable(String),
    #[error("{0}")]
    Unavailable(String),
    /// An invoked function failed (non-zero exit, trap, bad output).
    #[error("{0}")]
    FunctionFailed(String),
    /// An invoked function ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The client did not send its request body in time (408).
    #[error("{0}")]
    RequestTimeout(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest { code, message: message.into() }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::Unauthorized(code, _) => (StatusCode::UNAUTHORIZED, code),
            ApiError::Forbidden(code, _) => (StatusCode::FORBIDDEN, code),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code),
            ApiError::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::QuotaExceededOf(code, _) => (StatusCode::TOO_MANY_REQUESTS, code),
            ApiError::TooManyAuthFailures(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_auth_failures")
            }
            ApiError::AuthUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::FunctionFailed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "function_failed"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            ApiError::Internal(e) if storage_full(e).is_some() => {
                (StatusCode::INSUFFICIENT_STORAGE, "storage_full")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        // A full disk is said once by the store, not at each refused request.
        let full = match &self {
            ApiError::Internal(e) => storage_full(e).map(|f| f.to_string()),
            _ => None,
        };
        if let ApiError::Internal(e) = &self
            && full.is_none()
        {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let message = full.unwrap_or_else(|| self.to_string());
        let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message } };
        let mut res = (status, Json(body)).into_response();
        match &self {
            ApiError::TooManyAuthFailures(retry) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry.as_secs() + 1));
            }
            ApiError::Unauthorized(..) => {
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"cloudpipe\""),
                );
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ if status == StatusCode::INSUFFICIENT_STORAGE => {
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
            }
            _ => {}
        }
        res
    }
}

/// The store's refusal for lack of space, anywhere in an error's chain.
fn storage_full(e: &anyhow::Error) -> Option<&StorageFull> {
    e.chain().find_map(|c| c.downcast_ref::<StorageFull>())
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::FunctionNotFound(f) => {
                ApiError::NotFound(format!("function {f:?} not found"))
            }
            SubmitError::Invalid(m) => ApiError::bad("invalid_request", m),
            SubmitError::OverQuota(m) => ApiError::QuotaExceeded(m),
            SubmitError::Unavailable(m) => ApiError::Unavailable(m),
            SubmitError::ShuttingDown => {
                ApiError::Unavailable("the server is shutting down".into())
            }
            SubmitError::Secret(e) => e.into(),
            SubmitError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> Self {
        match e {
            SecretError::BadName(_) => ApiError::bad("invalid_name", e.to_string()),
            SecretError::TooLarge { .. } => ApiError::bad("secret_too_large", e.to_string()),
            SecretError::BadValue => ApiError::bad("invalid_secret", e.to_string()),
            SecretError::OverQuota { .. } => ApiError::QuotaExceeded(e.to_string()),
            SecretError::NotFound(_) => ApiError::bad("secret_not_found", e.to_string()),
            SecretError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::BadName(_) => ApiError::bad("invalid_name", e.to_string()),
            UploadError::TooLarge { limit, .. } => ApiError::TooLarge { limit },
            UploadError::Invalid(m) => ApiError::bad("invalid_wasm", m),
            UploadError::ComponentTooLarge(m) => ApiError::bad("component_too_large", m),
            UploadError::NameTaken(_) => ApiError::Conflict("name_taken", e.to_string()),
            UploadError::OverQuota { .. } => ApiError::QuotaExceeded(e.to_string()),
            UploadError::Internal(e) => ApiError::Internal(e),
        }
    }
}
