//! The library's one error type.
//!
//! Every fallible call returns [`Result<T>`]. Callers branch on [`Error::kind`] or on the
//! predicates ([`Error::is_unavailable`], [`Error::is_timeout`], ...) rather than on message text,
//! which is for people and may change.

use std::fmt;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A configuration value is missing or malformed. The message names the variable.
    Config,
    /// The caller passed something we refuse: an empty or oversized key, a bad name, a value that
    /// does not serialize. Nothing was written.
    InvalidInput,
    /// Redis could not be reached, dropped the connection, or answered with a transient error
    /// (`LOADING`, `READONLY`, `OOM`, `MASTERDOWN`, ...). Retrying later may succeed.
    Unavailable,
    /// Redis did not answer before the call's deadline. Also counts as unavailable.
    Timeout,
    /// The handle was closed with [`Client::close`](crate::Client::close).
    Closed,
    /// Redis answered with an error that retrying will not fix (a bug, a permission missing).
    Backend,
    /// No such session, or a token that is not one of ours (unknown, forged or revoked). Callers
    /// should not tell these apart to clients.
    NotFound,
    /// A refresh token that was already rotated was presented again: its whole session family has
    /// been revoked.
    Reused,
    /// The session or token has expired.
    Expired,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Unavailable => "redis unavailable",
            ErrorKind::Timeout => "redis timed out",
            ErrorKind::Closed => "client closed",
            ErrorKind::Backend => "redis error",
            ErrorKind::NotFound => "not found",
            ErrorKind::Reused => "refresh token reused",
            ErrorKind::Expired => "expired",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every rediskit operation: a [`ErrorKind`], a message for people, and the
/// underlying cause when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    /// The connection itself failed (refused, dropped, I/O, deadline) — as opposed to Redis
    /// answering with an error. Only these trip the circuit breaker.
    connection: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// An error of `kind` with a message for people.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            connection: false,
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn timeout(what: &str, after: std::time::Duration) -> Self {
        let mut err = Self::new(
            ErrorKind::Timeout,
            format!("{what} got no answer within {} ms", after.as_millis()),
        );
        err.connection = true;
        err
    }

    /// True when the connection failed (refused, dropped, I/O error, deadline passed), rather
    /// than Redis answering with an error such as `OOM` or `READONLY`.
    pub(crate) fn is_connection_failure(&self) -> bool {
        self.connection
    }

    /// True when Redis answered `READONLY`: the server is a replica now (a failover demoted it),
    /// so a Sentinel-managed handle should look for the new primary.
    pub(crate) fn is_read_only(&self) -> bool {
        self.source
            .as_ref()
            .and_then(|source| source.downcast_ref::<redis::RedisError>())
            .is_some_and(|err| {
                err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            })
    }

    /// True when Redis answered `WRONGTYPE`: the key holds another type than the command reads
    /// (a hash where the cache keeps strings, say).
    pub(crate) fn is_wrong_type(&self) -> bool {
        self.source
            .as_ref()
            .and_then(|source| source.downcast_ref::<redis::RedisError>())
            .is_some_and(|err| err.code() == Some("WRONGTYPE"))
    }

    /// The same error for another caller, when one failed call answered several (a coalesced
    /// script): kind, message, whether the connection failed, and Redis's own error (so that
    /// `READONLY` is still recognised).
    pub(crate) fn duplicate(&self) -> Self {
        let source = self
            .source
            .as_ref()
            .and_then(|source| source.downcast_ref::<redis::RedisError>())
            .map(|err| Box::new(err.clone()) as Box<dyn std::error::Error + Send + Sync>);
        Self {
            kind: self.kind,
            message: self.message.clone(),
            connection: self.connection,
            source,
        }
    }

    pub(crate) fn closed() -> Self {
        Self::new(ErrorKind::Closed, "the client was closed")
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// True when Redis could not serve the call (down, timed out, transient error, closed handle):
    /// the answer is unknown, not "no". Services map this to HTTP 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Unavailable | ErrorKind::Timeout | ErrorKind::Closed
        )
    }

    /// True when the call's deadline passed.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// True for [`ErrorKind::NotFound`].
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// True when the caller's input was refused.
    pub fn is_invalid_input(&self) -> bool {
        self.kind == ErrorKind::InvalidInput
    }
}

impl From<redis::RedisError> for Error {
    fn from(err: redis::RedisError) -> Self {
        use redis::ServerErrorKind as S;
        let connection = err.is_timeout()
            || err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.kind() == redis::ErrorKind::ClusterConnectionNotFound;
        let kind = if err.is_timeout() {
            ErrorKind::Timeout
        } else if connection {
            ErrorKind::Unavailable
        } else {
            match err.kind() {
                redis::ErrorKind::Server(
                    S::BusyLoading
                    | S::TryAgain
                    | S::ClusterDown
                    | S::MasterDown
                    | S::ReadOnly
                    | S::Moved
                    | S::Ask,
                )
                | redis::ErrorKind::ClusterConnectionNotFound => ErrorKind::Unavailable,
                // OOM, BUSY (a script running too long) and friends have no kind of their own.
                _ if matches!(err.code(), Some("OOM" | "BUSY" | "NOREPLICAS")) => {
                    ErrorKind::Unavailable
                }
                _ => ErrorKind::Backend,
            }
        };
        let message = err.to_string();
        let mut converted = Error::new(kind, message).with_source(err);
        converted.connection = connection;
        converted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Timeouts count as unavailability, so a service answers 503 for both.
    #[test]
    fn timeout_is_unavailable() {
        let err = Error::timeout("GET", std::time::Duration::from_millis(5));
        assert!(err.is_timeout());
        assert!(err.is_unavailable());
        assert_eq!(
            err.to_string(),
            "redis timed out: GET got no answer within 5 ms"
        );
    }

    /// A failed call that answered several callers gives each the same error: its kind,
    /// message, connection flag and Redis's error (`READONLY` still sends Sentinel after the
    /// new primary).
    #[test]
    fn a_duplicate_keeps_what_callers_act_on() {
        let read_only: Error = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
        ))
        .into();
        let copy = read_only.duplicate();
        assert!(copy.is_read_only() && copy.is_unavailable());
        assert_eq!(copy.to_string(), read_only.to_string());
        let timeout = Error::timeout("EVALSHA", std::time::Duration::from_millis(5)).duplicate();
        assert!(timeout.is_timeout() && timeout.is_connection_failure());
    }

    /// Transient server errors (OOM, READONLY, LOADING) are unavailability, not bugs.
    #[test]
    fn transient_server_errors_are_unavailable() {
        for code in ["OOM", "BUSY", "NOREPLICAS"] {
            let parsed: Error = redis::make_extension_error(code.into(), None).into();
            assert!(
                parsed.is_unavailable(),
                "{code} should be unavailable: {parsed}"
            );
        }
        let parsed: Error = redis::make_extension_error("WRONGTYPE".into(), None).into();
        assert_eq!(parsed.kind(), ErrorKind::Backend);
        assert!(parsed.is_wrong_type() && parsed.duplicate().is_wrong_type());
        // Redis answered: unavailable for the caller, but not a connection failure.
        let oom: Error = redis::make_extension_error("OOM".into(), None).into();
        assert!(!oom.is_connection_failure());
        let io: Error =
            redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                .into();
        assert!(io.is_unavailable() && io.is_connection_failure());
    }
}
