//! The API's one shape of error, `{"error": {"code": ..., "message": ...}}`,
//! and how every failure (the protocol's, a rejected body or query, one
//! that axum answers itself) becomes it.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use eretes_protocol::{ProtocolError, TaskId};
use eretes_store::StoreError;
use serde_json::json;

use super::MAX_BODY_BYTES;

/// Every error the API answers is `{"error": {...}}`, those that axum
/// makes itself too (a path parameter that is not UTF-8, a method a route
/// does not take): their plain-text or empty bodies become the message.
pub(super) async fn errors_as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        status if status.is_client_error() => "invalid_request",
        _ => "internal",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut answer = ApiError::new(status, code, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().append(name.clone(), value.clone());
        }
    }
    answer
}

/// An error response: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 413 `payload_too_large`: a body over [`MAX_BODY_BYTES`].
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is too large: the limit is {MAX_BODY_BYTES} bytes"),
        )
    }

    /// A 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<ProtocolError> for ApiError {
    fn from(error: ProtocolError) -> Self {
        let message = error.to_string();
        match error {
            ProtocolError::InvalidId { .. }
            | ProtocolError::InvalidSpec(_)
            | ProtocolError::InvalidBatch(_)
            | ProtocolError::InvalidCommand(_) => ApiError::invalid(message),
            ProtocolError::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", message)
            }
            ProtocolError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            ProtocolError::TaskEnded(_) => {
                ApiError::new(StatusCode::CONFLICT, "task_ended", message)
            }
            ProtocolError::Store(StoreError::Unavailable(_)) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::too_large();
        }
        let code = match status {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_request",
        };
        // Unprocessable (valid JSON, wrong shape) is a bad request here.
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            status
        };
        let message = rejection.body_text();
        ApiError::new(status, code, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(rejection.body_text())
    }
}

/// What a handler answers.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// A task id from a path, or a 400 naming what is wrong with it.
pub(crate) fn task_id(id: &str) -> ApiResult<TaskId> {
    TaskId::new(id).map_err(|e| ApiError::invalid(e.to_string()))
}
