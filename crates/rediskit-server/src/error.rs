//! The service's error type (the library's problem document) and a JSON extractor whose
//! rejections are problem documents naming what is wrong.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rediskit::web::Problem;
use serde::de::DeserializeOwned;

/// Every handler error: a problem document. Internal causes ride along for the logging
/// middleware and never reach the body.
pub type ApiError = Problem;

/// Maps a library error that the handler did not expect: unavailability is 503, anything else
/// is a 500 whose details stay in the logs.
pub fn store_error(err: rediskit::Error) -> ApiError {
    if err.is_unavailable() {
        Problem::unavailable(&err)
    } else {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "an internal error occurred; it has been logged",
        )
        .with_internal(err)
    }
}

/// `axum::Json`, with rejections as problem documents: 400 for malformed JSON, 415 without a
/// JSON content type, 413 over the body limit, 422 for a missing field or a wrong type (the
/// detail names the field).
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

/// The problem document for a JSON rejection.
pub fn json_problem(rejection: &JsonRejection) -> ApiError {
    let detail = match rejection {
        JsonRejection::JsonDataError(err) => format!("invalid request body: {}", err.body_text()),
        JsonRejection::JsonSyntaxError(err) => format!("malformed JSON: {}", err.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            "expected a JSON body with `Content-Type: application/json`".to_owned()
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than 64 KiB".to_owned()
        }
        other => format!("unreadable request body: {}", other.body_text()),
    };
    Problem::new(rejection.status(), detail)
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
