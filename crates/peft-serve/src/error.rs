//! Errors, each with the HTTP status it is answered with.

use thiserror::Error;

/// What can go wrong serving a request; [`status`](Self::status) is the HTTP answer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ServeError {
    /// Malformed JSON, wrong types, a task the model cannot do (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong API key (401).
    #[error("missing or wrong API key")]
    Unauthorized,
    /// A path outside `--adapter-dir`, or run-time loading not enabled (403).
    #[error("{0}")]
    Forbidden(String),
    /// An adapter that is not known (404).
    #[error("{0}")]
    NotFound(String),
    /// Input over the configured limits (413).
    #[error("{0}")]
    TooLarge(String),
    /// An adapter directory that could not be loaded (422).
    #[error("{0}")]
    Unprocessable(String),
    /// The model failed on a batch (500).
    #[error("{0}")]
    Internal(String),
    /// The server is stopping, or its model thread is gone (503).
    #[error("the server is shutting down or its model thread is gone")]
    Unavailable,
    /// The queue is full (503).
    #[error("the server is busy: {0} requests are already waiting")]
    Busy(usize),
    /// A method the route does not take (405).
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The model could not be loaded at start.
    #[error("{0}")]
    Startup(String),
}

impl ServeError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            ServeError::BadRequest(_) => 400,
            ServeError::Unauthorized => 401,
            ServeError::Forbidden(_) => 403,
            ServeError::NotFound(_) => 404,
            ServeError::TooLarge(_) => 413,
            ServeError::Unprocessable(_) => 422,
            ServeError::Internal(_) | ServeError::Startup(_) => 500,
            ServeError::Unavailable | ServeError::Busy(_) => 503,
            ServeError::MethodNotAllowed => 405,
        }
    }

    /// A short machine-readable kind (`not_found`, `too_large`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::BadRequest(_) => "bad_request",
            ServeError::Unauthorized => "unauthorized",
            ServeError::Forbidden(_) => "forbidden",
            ServeError::NotFound(_) => "not_found",
            ServeError::TooLarge(_) => "too_large",
            ServeError::Unprocessable(_) => "unprocessable",
            ServeError::Internal(_) | ServeError::Startup(_) => "internal",
            ServeError::Unavailable => "unavailable",
            ServeError::Busy(_) => "busy",
            ServeError::MethodNotAllowed => "method_not_allowed",
        }
    }
}
