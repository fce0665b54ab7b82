//! Serving one frozen base model with many PEFT adapters over HTTP.
//!
//! - [`Engine`] owns the model on a thread of its own. Requests that arrive within the batch
//!   window run as one **mixed-adapter batch** (each row through its own adapter, with
//!   [`peft_core::PeftModel::with_batch_adapters`]), up to the batch size.
//! - Adapters are loaded, replaced and dropped while serving, between batches, so a request sees
//!   an adapter whole, before or after a change. At most `max_loaded` are held; the least
//!   recently used is evicted and loaded again from disk when a request names it.
//! - [`router`] is the JSON API (axum): `POST /v1/generate`, `/v1/classify`, `/v1/embed`,
//!   `GET`/`POST /v1/adapters`, `DELETE /v1/adapters/{name}`, `GET /health`, `GET /metrics`.
//!   Errors are JSON bodies with the status: 400 malformed, 401 key, 403 path, 404 unknown
//!   adapter, 413 over the limits, 422 a broken adapter.
//! - [`serve`] runs it until the shutdown future resolves, finishing the requests in flight.
//!   The library installs no signal handler: the caller (the `peft serve` command) decides
//!   what stops it.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use burn::backend::NdArray;
//! use peft_serve::{Engine, ServeConfig};
//! let config = ServeConfig::new("my-mt0").with_adapter("support", "adapters/support");
//! let engine = Engine::start::<NdArray>(&config, Default::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! peft_serve::serve(listener, peft_serve::router(engine, &config), std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod config;
pub mod engine;
mod error;
pub mod metrics;

pub use api::{router, serve};
pub use config::{Batching, Limits, ServeConfig};
pub use engine::{AdapterInfo, Engine, LabelScore, ModelKind, Output, Pooling, Request, Task};
pub use error::ServeError;
