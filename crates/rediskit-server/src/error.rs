//! The service's error type (the library's problem document) and a JSON extractor whose
//! rejections are problem documents naming what is wrong.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rediskit::web::Problem;
use serde::de::DeserializeOwned;

use crate::BODY_LIMIT;

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
        let request = within_limit(request).await?;
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_problem(&rejection)),
        }
    }
}

/// `axum::extract::Path`, with rejections as problem documents (400 naming the parameter, for a
/// segment that is not UTF-8 once percent-decoded, say) instead of axum's plain text.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(Problem::new(
                rejection.status(),
                format!("invalid path: {}", rejection.body_text()),
            )),
        }
    }
}

/// Middleware: 413 for a body over [`BODY_LIMIT`], declared (`Content-Length`) or sent without
/// a length (chunked), on every route it wraps, including those that read no body (where no
/// extractor would see it, and the request would run).
pub async fn refuse_oversized(request: Request, next: axum::middleware::Next) -> Response {
    match within_limit(request).await {
        Ok(request) => next.run(request).await,
        Err(problem) => problem.into_response(),
    }
}

/// `request` once its body is known to be within [`BODY_LIMIT`], or the 413 for it (sent after
/// reading and discarding what [`drain`] allows). A declared length is judged at once (hyper
/// ends the body there); a body without one is read into memory, up to the limit, and handed on
/// as read, with its length declared. A body that breaks off is a 400; one that takes longer
/// than [`BODY_TIME`] to arrive, a 408.
pub async fn within_limit(request: Request) -> Result<Request, ApiError> {
    use axum::body::HttpBody as _;
    use futures_util::StreamExt as _;
    if let Some(declared) = declared_over_limit(&request) {
        if declared <= LINGER_BYTES {
            drain(request.into_body().into_data_stream(), LINGER_BYTES).await;
        }
        return Err(too_large());
    }
    if request
        .headers()
        .contains_key(axum::http::header::CONTENT_LENGTH)
        || request.body().is_end_stream()
    {
        return Ok(request);
    }
    let (mut parts, body) = request.into_parts();
    let mut stream = body.into_data_stream();
    let mut read = Vec::new();
    let reading = async {
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    "the request body broke off before its end",
                ));
            };
            if read.len() + chunk.len() > BODY_LIMIT {
                return Err(too_large());
            }
            read.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_TIME, reading).await {
        Ok(Ok(())) => {}
        Ok(Err(problem)) => {
            if problem.status == StatusCode::PAYLOAD_TOO_LARGE.as_u16() {
                drain(stream, LINGER_BYTES - read.len() as u64).await;
            }
            return Err(problem);
        }
        Err(_) => {
            return Err(Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            ));
        }
    }
    // Declared now, as if the client had: what reads it next need not buffer it again.
    parts.headers.remove(axum::http::header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(axum::http::header::CONTENT_LENGTH, read.len().into());
    Ok(Request::from_parts(parts, axum::body::Body::from(read)))
}

/// How long a body sent without a declared length may take to arrive: 64 KiB in 30 s is a
/// client at ~2 KiB/s. Without a bound, a client that sends one chunk and stops would hold its
/// request (and the server's graceful stop) for ever.
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// The 413.
fn too_large() -> ApiError {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE)
}

/// The detail of every 413.
const TOO_LARGE: &str = "the request body is larger than 64 KiB";

/// How much of a body over [`BODY_LIMIT`] is read and discarded before its 413, and for how
/// long at most (see [`drain`]).
const LINGER_BYTES: u64 = 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// The `Content-Length` of `request`, when it is over [`BODY_LIMIT`].
fn declared_over_limit(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|&length| length > BODY_LIMIT as u64)
}

/// Reads and throws away the rest of a body about to be refused with 413, up to `budget` bytes,
/// within [`LINGER_TIME`], nothing kept. A server that answers and closes while the client is
/// still sending makes the kernel reset the connection, and the client then often sees the
/// reset instead of the 413 (hyper drains only what it has already buffered). Larger bodies get
/// the 413 once the budget is spent and may see a reset.
async fn drain(mut body: axum::body::BodyDataStream, budget: u64) {
    use futures_util::StreamExt as _;
    let drain = async {
        let mut left = budget;
        while let Some(Ok(chunk)) = body.next().await {
            left = left.saturating_sub(chunk.len() as u64);
            if left == 0 {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// The problem document for a JSON rejection.
pub fn json_problem(rejection: &JsonRejection) -> ApiError {
    let detail = match rejection {
        JsonRejection::JsonDataError(err) => format!("invalid request body: {}", err.body_text()),
        JsonRejection::JsonSyntaxError(err) => format!("malformed JSON: {}", err.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            "expected a JSON body with `Content-Type: application/json`".to_owned()
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => TOO_LARGE.to_owned(),
        other => format!("unreadable request body: {}", other.body_text()),
    };
    Problem::new(rejection.status(), detail)
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, Bytes};
    use axum::http::header::CONTENT_LENGTH;
    use futures_util::StreamExt as _;

    use super::*;

    fn chunked(chunks: &'static [&'static [u8]], then_stall: bool) -> Request {
        let sent = futures_util::stream::iter(
            chunks
                .iter()
                .map(|chunk| Ok::<_, std::io::Error>(Bytes::from_static(chunk))),
        );
        let body = if then_stall {
            Body::from_stream(sent.chain(futures_util::stream::pending()))
        } else {
            Body::from_stream(sent)
        };
        Request::post("/x").body(body).unwrap()
    }

    /// A body without a length that stops coming is a 408 once [`BODY_TIME`] has passed, not a
    /// request held for ever.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_without_a_length_is_408() {
        let err = within_limit(chunked(&[b"{"], true)).await.unwrap_err();
        assert_eq!(err.status, 408);
    }

    /// A body without a length within the limit is handed on whole, its length declared, so
    /// that what reads it next need not buffer it again.
    #[tokio::test]
    async fn a_body_without_a_length_is_declared_once_read() {
        let request = within_limit(chunked(&[b"ab", b"cd"], false)).await.unwrap();
        assert_eq!(request.headers()[CONTENT_LENGTH], "4");
        let bytes = axum::body::to_bytes(request.into_body(), 100)
            .await
            .unwrap();
        assert_eq!(&bytes[..], b"abcd");
    }
}
