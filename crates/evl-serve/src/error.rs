//! The one error a request can end in: an HTTP status, a stable machine-readable kind and a
//! message for a person, sent as `{"error": {"kind", "message", "request_id"}}`.

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Stable name of the failure (`bad_upload`, `bad_record`, `too_large`, ...), also the
    /// `kind` label of the `evl_errors_total` metric.
    pub kind: &'static str,
    /// What was wrong, naming the file and field.
    pub message: String,
}

impl ApiError {
    /// A malformed or incomplete upload (400).
    pub fn bad_upload(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_upload", message)
    }

    /// A record that does not read (422): the files arrived but their contents are wrong.
    pub fn bad_record(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "bad_record", message)
    }

    /// A record past the service's limits (duration, leads, samples), 413.
    pub fn over_limit(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "over_limit", message)
    }

    /// A body larger than the limit (413).
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(413, "too_large", message)
    }

    /// Files of a kind the service does not read (415).
    pub fn unsupported(message: impl Into<String>) -> ApiError {
        ApiError::new(415, "unsupported", message)
    }

    /// The queue is full (503, with `Retry-After`).
    pub fn busy(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "busy", message)
    }

    /// The model is not loaded yet, or the service is stopping (503).
    pub fn not_ready(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "not_ready", message)
    }

    /// The upload arrived too slowly (408).
    pub fn slow_upload(message: impl Into<String>) -> ApiError {
        ApiError::new(408, "slow_upload", message)
    }

    /// The answer did not come within the request timeout (504).
    pub fn timeout(message: impl Into<String>) -> ApiError {
        ApiError::new(504, "timeout", message)
    }

    /// A fault of the service itself (500), e.g. a worker that panicked.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal", message)
    }

    /// No such route (404).
    pub fn new_not_found() -> ApiError {
        ApiError::new(
            404,
            "not_found",
            "no such route; see GET / (the page), POST /v1/interpret, GET /healthz, /readyz, \
             /metrics, /v1/model",
        )
    }

    fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    /// The status as an axum type.
    #[cfg(feature = "server")]
    pub fn status_code(&self) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
    }
}
