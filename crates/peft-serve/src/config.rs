//! What a server is started with.

use std::path::PathBuf;
use std::time::Duration;

/// How queued requests are put into batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Batching {
    /// Requests for different adapters share one batch (each row routed to its adapter).
    #[default]
    Mixed,
    /// One batch per adapter (what a server without mixed batches can do): kept to measure
    /// what mixing buys.
    PerAdapter,
}

/// Limits on one request; anything over them is refused with 413.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Inputs in one request.
    pub max_inputs: usize,
    /// Characters in one input.
    pub max_input_chars: usize,
    /// `max_new_tokens` of a generate request.
    pub max_new_tokens: usize,
    /// `num_beams` of a generate request.
    pub max_beams: usize,
    /// Tokens an input is truncated to.
    pub max_source_length: usize,
    /// Bytes of a request body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_inputs: 64,
            max_input_chars: 20_000,
            max_new_tokens: 256,
            max_beams: 8,
            max_source_length: 512,
            max_body_bytes: 4 << 20,
        }
    }
}

/// A server's configuration: the base model, the adapters it starts with, and how it batches.
///
/// ```
/// use peft_serve::ServeConfig;
/// let config = ServeConfig::new("my-mt0")
///     .with_adapter("support", "adapters/support")
///     .with_adapter_dir("adapters")
///     .with_max_loaded(8)
///     .with_max_batch_size(16)
///     .with_batch_wait_ms(5);
/// assert_eq!(config.adapters.len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The base model directory (HF layout: config.json, weights, tokenizer.json).
    pub model: PathBuf,
    /// Adapters loaded at start, by name.
    pub adapters: Vec<(String, PathBuf)>,
    /// The directory that adapters loaded at run time must be under (`POST /v1/adapters`);
    /// `None` refuses run-time loads.
    pub adapter_dir: Option<PathBuf>,
    /// Adapters held in memory at once; the least recently used is evicted beyond it (and
    /// loaded again from disk when a request names it).
    pub max_loaded: usize,
    /// Rows in one batch.
    pub max_batch_size: usize,
    /// How long the first request of a batch waits for others.
    pub batch_wait: Duration,
    /// Mixed-adapter batches, or one batch per adapter.
    pub batching: Batching,
    /// A key every `/v1` request must carry (`Authorization: Bearer KEY` or `X-API-Key`).
    pub api_key: Option<String>,
    /// Request limits.
    pub limits: Limits,
    /// How to load the base (`SEQ_CLS` puts a classification head on a BERT encoder); by
    /// default the first start-up adapter's `task_type`, else the base's `architectures`.
    pub task_type: Option<peft_core::TaskType>,
}

impl ServeConfig {
    /// A server for the base model in `model`, with the defaults: no adapters yet, at most 16
    /// held, batches of up to 8 rows gathered for 5 ms, mixed.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        ServeConfig {
            model: model.into(),
            adapters: Vec::new(),
            adapter_dir: None,
            max_loaded: 16,
            max_batch_size: 8,
            batch_wait: Duration::from_millis(5),
            batching: Batching::Mixed,
            api_key: None,
            limits: Limits::default(),
            task_type: None,
        }
    }

    /// Adds an adapter loaded at start.
    pub fn with_adapter(mut self, name: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.adapters.push((name.into(), dir.into()));
        self
    }

    /// Allows run-time loads from under `dir`.
    pub fn with_adapter_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.adapter_dir = Some(dir.into());
        self
    }

    /// Sets [`max_loaded`](Self::max_loaded).
    pub fn with_max_loaded(mut self, n: usize) -> Self {
        self.max_loaded = n;
        self
    }

    /// Sets [`max_batch_size`](Self::max_batch_size).
    pub fn with_max_batch_size(mut self, n: usize) -> Self {
        self.max_batch_size = n;
        self
    }

    /// Sets [`batch_wait`](Self::batch_wait) in milliseconds.
    pub fn with_batch_wait_ms(mut self, ms: u64) -> Self {
        self.batch_wait = Duration::from_millis(ms);
        self
    }

    /// Sets [`batching`](Self::batching).
    pub fn with_batching(mut self, batching: Batching) -> Self {
        self.batching = batching;
        self
    }

    /// Requires `key` on every `/v1` request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets the request limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`task_type`](Self::task_type).
    pub fn with_task_type(mut self, task: peft_core::TaskType) -> Self {
        self.task_type = Some(task);
        self
    }

    /// Checks the numbers (every count at least 1).
    pub fn validate(&self) -> Result<(), crate::ServeError> {
        for (name, v) in [
            ("max_loaded", self.max_loaded),
            ("max_batch_size", self.max_batch_size),
            ("max_inputs", self.limits.max_inputs),
            ("max_new_tokens", self.limits.max_new_tokens),
            ("max_beams", self.limits.max_beams),
            ("max_source_length", self.limits.max_source_length),
        ] {
            if v == 0 {
                return Err(crate::ServeError::BadRequest(format!(
                    "{name} must be at least 1"
                )));
            }
        }
        let mut names: Vec<&str> = self.adapters.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(crate::ServeError::BadRequest(format!(
                "adapter {:?} is given twice",
                w[0]
            )));
        }
        for (n, _) in &self.adapters {
            crate::engine::check_name(n)?;
        }
        Ok(())
    }
}
