//! The `Status` objects the API server answers failures with, which kube
//! turns into `kube::Error::Api`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::store::Kind;
use super::validation::FieldErr;

/// A failed request, answered as a `Status` object.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    /// An error with no details.
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    /// 404 for a missing object.
    pub(crate) fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({ "name": name, "group": kind.group(), "kind": kind.plural() })),
            ..ApiError::new(
                404,
                "NotFound",
                format!("{} {name:?} not found", kind.qualified_plural()),
            )
        }
    }

    /// 404 for a path the server does not serve.
    pub(crate) fn no_route() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 405 for a verb the fake does not serve on a resource.
    pub(crate) fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 400.
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// 409 for a name already taken.
    pub(crate) fn already_exists(kind: Kind, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({ "name": name, "group": kind.group(), "kind": kind.plural() })),
            ..ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", kind.qualified_plural()),
            )
        }
    }

    /// 409 for a failed precondition.
    pub(crate) fn conflict(kind: Kind, name: &str, why: &str) -> ApiError {
        ApiError {
            details: Some(json!({ "name": name, "group": kind.group(), "kind": kind.plural() })),
            ..ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: {why}",
                    kind.qualified_plural()
                ),
            )
        }
    }

    /// 410 for a resourceVersion older than the retained history.
    pub(crate) fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    /// 422 with the field errors as causes.
    pub(crate) fn invalid(kind: Kind, name: &str, errs: &[FieldErr]) -> ApiError {
        ApiError::invalid_of(
            &kind.qualified_kind(),
            kind.group(),
            kind.name(),
            name,
            errs,
        )
    }

    /// 422 for any kind, named as `qualified` (`ListOptions.meta.k8s.io`).
    pub(crate) fn invalid_of(
        qualified: &str,
        group: &str,
        kind: &str,
        name: &str,
        errs: &[FieldErr],
    ) -> ApiError {
        let joined = match errs {
            [one] => one.to_string(),
            many => format!(
                "[{}]",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let causes: Vec<Value> = errs
            .iter()
            .map(|e| json!({ "reason": e.reason, "message": e.message, "field": e.field }))
            .collect();
        ApiError {
            details: Some(json!({ "name": name, "group": group, "kind": kind, "causes": causes })),
            ..ApiError::new(
                422,
                "Invalid",
                format!("{qualified} {name:?} is invalid: {joined}"),
            )
        }
    }

    /// An injected fault with the reason the real server gives its code.
    pub(crate) fn fault(code: u16, path: &str) -> ApiError {
        let (reason, message) = match code {
            429 => ("TooManyRequests", "Too many requests, please try again later.".to_string()),
            500 => ("InternalError", format!("Internal error occurred: injected fault on {path}")),
            503 => ("ServiceUnavailable", "The server is currently unable to handle the request".to_string()),
            504 => ("Timeout", "The server was unable to return a response in the time allotted, but may still be processing the request".to_string()),
            410 => ("Expired", "The resourceVersion for the provided request is too old.".to_string()),
            409 => ("Conflict", format!("injected conflict on {path}")),
            403 => ("Forbidden", format!("forbidden: injected fault on {path}")),
            401 => ("Unauthorized", "Unauthorized".to_string()),
            _ => ("InternalError", format!("injected fault {code} on {path}")),
        };
        let mut err = ApiError::new(code, reason, message);
        if code == 429 {
            err.details = Some(json!({ "retryAfterSeconds": 1 }));
        }
        err
    }

    /// The `Status` object.
    pub(crate) fn body(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = json_response(code, &self.body());
        if self.code == 429 {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A JSON answer.
pub(crate) fn json_response(code: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).expect("JSON serializes");
    (code, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}
