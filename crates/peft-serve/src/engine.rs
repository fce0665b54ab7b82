//! The model worker: one thread owns the base model and its adapters; requests reach it over a
//! channel, are gathered into batches (one mixed-adapter batch, or one batch per adapter) and
//! answered one by one.
//!
//! Adapter management runs on the same thread, between batches, so a batch sees an adapter as
//! it was before a load, unload or replace, or as it is after, never half of each. A replaced
//! adapter is loaded under a fresh internal name first; only then is the name pointed at it and
//! the old one dropped, so a failed load leaves the old adapter serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{AdapterHost, BASE, PeftModel};
use peft_io::{AutoModel, TextTokenizer};
use peft_models::{BertForSequenceClassification, BertModel, T5ForConditionalGeneration};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{Batching, ServeConfig};
use crate::error::ServeError;
use crate::metrics::Metrics;

type Result<T> = std::result::Result<T, ServeError>;

/// What the served model can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// T5 / mT5 / mt0: `generate` and `embed` (encoder states).
    #[serde(rename = "seq2seq")]
    Seq2Seq,
    /// BERT with a classification head: `classify` and `embed`.
    SequenceClassification,
    /// BERT without a head: `embed`.
    Encoder,
}

/// How token states are pooled into one embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the real (unpadded) tokens.
    #[default]
    Mean,
    /// The first token (`[CLS]`).
    Cls,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Greedy (`num_beams = 1`) or beam-search generation.
    Generate {
        /// New tokens at most.
        max_new_tokens: usize,
        /// Beams.
        num_beams: usize,
    },
    /// Labels with scores, best first.
    Classify,
    /// One vector per input.
    Embed {
        /// How to pool.
        pooling: Pooling,
    },
}

/// One request: its inputs, the adapter they run through (`None`: the base alone) and the task.
#[derive(Clone, Debug)]
pub struct Request {
    /// The texts.
    pub inputs: Vec<String>,
    /// The adapter.
    pub adapter: Option<String>,
    /// The task.
    pub task: Task,
}

/// A label and its probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LabelScore {
    /// The label (`id2label`, else `LABEL_i`).
    pub label: String,
    /// Its softmax probability.
    pub score: f32,
}

/// The answer to a request, one entry per input.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Generated texts.
    Texts(Vec<String>),
    /// Labels and scores, best first.
    Labels(Vec<Vec<LabelScore>>),
    /// Embeddings.
    Embeddings(Vec<Vec<f32>>),
}

/// An adapter the server knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AdapterInfo {
    /// Its name in requests.
    pub name: String,
    /// Where it is loaded from.
    pub path: PathBuf,
    /// Whether it is in memory now (an evicted adapter is loaded again on demand).
    pub loaded: bool,
}

/// Refuses adapter names that could be confused with the base or with paths.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != BASE
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ServeError::BadRequest(format!(
            "adapter name {name:?}: use 1 to 64 of A-Z a-z 0-9 _ - . (and not {BASE:?})"
        )))
    }
}

struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Output>>,
}

enum Command {
    Run(Job),
    Load {
        name: String,
        path: PathBuf,
        reply: oneshot::Sender<Result<AdapterInfo>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<()>>,
    },
    List {
        reply: oneshot::Sender<Vec<AdapterInfo>>,
    },
    Ping {
        reply: oneshot::Sender<()>,
    },
}

/// Requests waiting for the model at most; beyond it the server answers 503.
const QUEUE: usize = 4096;

/// A handle on the model worker; cheap to clone, usable from any thread or task.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::SyncSender<Command>,
    kind: ModelKind,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("kind", &self.kind).finish()
    }
}

impl Engine {
    /// Loads the base model and the configured adapters on a worker thread of its own, and
    /// returns once it is ready (or with the reason it could not start).
    pub fn start<B: Backend>(config: &ServeConfig, device: B::Device) -> Result<Engine>
    where
        B::Device: Send + 'static,
    {
        config.validate()?;
        let (tx, rx) = mpsc::sync_channel::<Command>(QUEUE);
        let (ready_tx, ready_rx) = mpsc::channel();
        let metrics = Arc::new(Metrics::default());
        let (cfg, m) = (config.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("peft-serve-model".into())
            .spawn(move || match Worker::<B>::load(cfg, device, m) {
                Ok(mut w) => {
                    let _ = ready_tx.send(Ok(w.kind()));
                    w.run(rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| ServeError::Startup(format!("starting the model thread: {e}")))?;
        let kind = ready_rx
            .recv()
            .map_err(|_| ServeError::Startup("the model thread ended while loading".into()))??;
        Ok(Engine { tx, kind, metrics })
    }

    /// What the model can do.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The server's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> std::result::Result<T, ServeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => ServeError::Busy(QUEUE),
            mpsc::TrySendError::Disconnected(_) => ServeError::Unavailable,
        })?;
        rx.await.map_err(|_| ServeError::Unavailable)
    }

    /// Runs a request (batched with others that arrive at about the same time).
    pub async fn run(&self, request: Request) -> Result<Output> {
        self.call(|reply| Command::Run(Job { request, reply }))
            .await?
    }

    /// Loads adapter `name` from `path`, replacing one of that name atomically.
    pub async fn load_adapter(&self, name: String, path: PathBuf) -> Result<AdapterInfo> {
        check_name(&name)?;
        self.call(|reply| Command::Load { name, path, reply })
            .await?
    }

    /// Drops adapter `name`.
    pub async fn unload_adapter(&self, name: String) -> Result<()> {
        self.call(|reply| Command::Unload { name, reply }).await?
    }

    /// Whether the model thread answers.
    pub async fn alive(&self) -> bool {
        self.call(|reply| Command::Ping { reply }).await.is_ok()
    }

    /// The adapters the server knows, loaded or not.
    pub async fn adapters(&self) -> Result<Vec<AdapterInfo>> {
        self.call(|reply| Command::List { reply }).await
    }
}

// One value, owned by the worker for its whole life: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Served<B: Backend> {
    T5(PeftModel<B, T5ForConditionalGeneration<B>>),
    Cls(PeftModel<B, BertForSequenceClassification<B>>),
    Bert(PeftModel<B, BertModel<B>>),
}

/// `$body` with `$p` bound to the served `PeftModel`, whatever the model.
macro_rules! with_peft {
    ($served:expr, $p:ident => $body:expr) => {
        match $served {
            Served::T5($p) => $body,
            Served::Cls($p) => $body,
            Served::Bert($p) => $body,
        }
    };
}

struct Slot {
    path: PathBuf,
    /// The name it is loaded under in the model (`name#generation`), when loaded.
    internal: Option<String>,
    last_used: u64,
}

struct Worker<B: Backend> {
    model: Served<B>,
    tok: TextTokenizer,
    pad: u32,
    vocab: usize,
    labels: Vec<String>,
    device: B::Device,
    adapters: BTreeMap<String, Slot>,
    tick: u64,
    generation: u64,
    config: ServeConfig,
    metrics: Arc<Metrics>,
}

fn startup<E: std::fmt::Display>(e: E) -> ServeError {
    ServeError::Startup(e.to_string())
}

impl<B: Backend> Worker<B> {
    fn load(config: ServeConfig, device: B::Device, metrics: Arc<Metrics>) -> Result<Self> {
        let dir = config.model.clone();
        let tok = TextTokenizer::from_path(&dir).map_err(startup)?;
        let task = match (config.task_type, config.adapters.first()) {
            (Some(t), _) => Some(t),
            (None, Some((name, path))) => peft_io::adapter::read_adapter_config(path)
                .map_err(|e| ServeError::Startup(format!("adapter {name}: {e}")))?
                .task_type(),
            (None, None) => None,
        };
        let (model, _) = AutoModel::<B>::from_pretrained(&dir, task, &device).map_err(startup)?;
        let (model, pad, vocab, labels) = match model {
            AutoModel::T5(m) => {
                let pad = m.config.pad_token_id.unwrap_or(0) as u32;
                let vocab = m.config.vocab_size;
                // A server decodes many steps: its layers read their weights packed for
                // decoding after the first steps (`peft_core::ops::DecodePack`).
                m.visit_linears(&mut |_, l| l.decode_pack.on());
                (
                    Served::T5(PeftModel::without_adapters(m)),
                    pad,
                    vocab,
                    vec![],
                )
            }
            AutoModel::BertForSequenceClassification(m) => {
                let c = &m.bert.config;
                let n = c.labels();
                let labels = (0..n)
                    .map(|i| {
                        c.id2label
                            .as_ref()
                            .and_then(|l| l.get(&i.to_string()))
                            .and_then(|v| v.as_str())
                            .map_or_else(|| format!("LABEL_{i}"), str::to_string)
                    })
                    .collect();
                let (pad, vocab) = (bert_pad(&tok), c.vocab_size);
                (
                    Served::Cls(PeftModel::without_adapters(m)),
                    pad,
                    vocab,
                    labels,
                )
            }
            AutoModel::Bert(m) => {
                let (pad, vocab) = (bert_pad(&tok), m.config.vocab_size);
                (
                    Served::Bert(PeftModel::without_adapters(m)),
                    pad,
                    vocab,
                    vec![],
                )
            }
        };
        let mut config = config;
        if let Served::Cls(p) = &model {
            let n = p.base_model.bert.config.max_position_embeddings;
            config.limits.max_source_length = config.limits.max_source_length.min(n);
        }
        if let Served::Bert(p) = &model {
            let n = p.base_model.config.max_position_embeddings;
            config.limits.max_source_length = config.limits.max_source_length.min(n);
        }
        let mut w = Worker {
            model,
            tok,
            pad,
            vocab,
            labels,
            device,
            adapters: BTreeMap::new(),
            tick: 0,
            generation: 0,
            config: config.clone(),
            metrics,
        };
        for (name, path) in &config.adapters {
            w.load_named(name, path).map_err(|e| {
                ServeError::Startup(format!("adapter {name} ({}): {e}", path.display()))
            })?;
        }
        Ok(w)
    }

    fn kind(&self) -> ModelKind {
        match self.model {
            Served::T5(_) => ModelKind::Seq2Seq,
            Served::Cls(_) => ModelKind::SequenceClassification,
            Served::Bert(_) => ModelKind::Encoder,
        }
    }

    fn run(&mut self, mut rx: mpsc::Receiver<Command>) {
        // Commands that arrived while a continuous generation ran, in arrival order.
        let mut deferred: std::collections::VecDeque<Command> = Default::default();
        loop {
            let first = match deferred.pop_front() {
                Some(c) => c,
                None => match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            };
            let mut jobs = Vec::new();
            let mut rows = 0;
            let take = |c: Command, w: &mut Self, jobs: &mut Vec<Job>, rows: &mut usize| match c {
                Command::Run(j) => {
                    *rows += j.request.inputs.len();
                    jobs.push(j);
                }
                other => {
                    // A panic while loading must not end the model thread.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.admin(other)));
                }
            };
            take(first, self, &mut jobs, &mut rows);
            if !jobs.is_empty() {
                let deadline = Instant::now() + self.config.batch_wait;
                while rows < self.config.max_batch_size {
                    if let Some(c) = deferred.pop_front() {
                        take(c, self, &mut jobs, &mut rows);
                        continue;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(c) => take(c, self, &mut jobs, &mut rows),
                        Err(_) => break,
                    }
                }
            }
            if jobs.is_empty() {
                continue;
            }
            // Greedy generation with mixed batches runs continuously: finished rows leave the
            // batch and waiting requests join it between steps.
            let continuous =
                matches!(self.model, Served::T5(_)) && self.config.batching == Batching::Mixed;
            let (greedy, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| {
                continuous && matches!(j.request.task, Task::Generate { num_beams: 1, .. })
            });
            // The model runs on a worker of rayon's pool, with the pool's other workers kept
            // awake while it computes (`peft_core::ops::on_pool`); between batches this
            // thread waits for requests without holding a worker.
            if !rest.is_empty() {
                let this = &mut *self;
                peft_core::ops::on_pool(move || this.run_jobs(rest));
            }
            if !greedy.is_empty() {
                let (this, waiting, commands) = (&mut *self, &mut deferred, rx);
                rx = peft_core::ops::on_pool(move || {
                    this.generate_continuous(greedy, &commands, waiting);
                    commands
                });
            }
        }
    }

    fn admin(&mut self, c: Command) {
        match c {
            Command::Run(_) => unreachable!("runs are batched"),
            Command::Load { name, path, reply } => {
                let _ = reply.send(self.load_named(&name, &path));
            }
            Command::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name));
            }
            Command::List { reply } => {
                let _ = reply.send(self.list());
            }
            Command::Ping { reply } => {
                let _ = reply.send(());
            }
        }
    }

    fn list(&self) -> Vec<AdapterInfo> {
        self.adapters
            .iter()
            .map(|(n, s)| AdapterInfo {
                name: n.clone(),
                path: s.path.clone(),
                loaded: s.internal.is_some(),
            })
            .collect()
    }

    fn loaded_count(&self) -> usize {
        self.adapters
            .values()
            .filter(|s| s.internal.is_some())
            .count()
    }

    fn update_gauge(&self) {
        self.metrics.set_loaded(self.loaded_count());
    }

    fn attach(&mut self, path: &Path, internal: &str) -> Result<()> {
        let config = peft_io::adapter::read_adapter_config(path)
            .map_err(|e| ServeError::Unprocessable(e.to_string()))?;
        if config.is_prompt_learning() {
            // Virtual tokens change the sequence of the whole batch: no mixed batches (PEFT
            // refuses `adapter_names` with prompt learning too).
            return Err(ServeError::Unprocessable(format!(
                "{}: {} adapters cannot be served next to others (their virtual tokens change \
                 the whole batch's sequence); run them with `peft generate`",
                path.display(),
                config.peft_type()
            )));
        }
        if config.bias() != peft_core::lora::Bias::None {
            // Its biases live in the shared base layers: every other adapter would see them.
            return Err(ServeError::Unprocessable(format!(
                "{}: the adapter trains base biases (bias = {:?}); they would change the base \
                 for every adapter, so it cannot be served next to others (merge it instead)",
                path.display(),
                config.bias()
            )));
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_peft!(&mut self.model, p => peft_io::load_adapter(p, path, internal).map(|_| ()))
        }))
        .map_err(|_| ServeError::Internal(format!("loading {} failed", path.display())))?;
        if r.is_err() {
            self.detach(internal);
        }
        r.map_err(|e| ServeError::Unprocessable(e.to_string()))
    }

    fn detach(&mut self, internal: &str) {
        let _ = with_peft!(&mut self.model, p => p.delete_adapter(internal));
    }

    /// Evicts least recently used adapters (never one in `pinned`) until at most
    /// `max_loaded` are held. Called after a load succeeded, so a failed load evicts nothing.
    fn evict_over_cap(&mut self, pinned: &[&str]) {
        while self.loaded_count() > self.config.max_loaded {
            let victim = self
                .adapters
                .iter()
                .filter(|(n, s)| s.internal.is_some() && !pinned.contains(&n.as_str()))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(n, _)| n.clone());
            let Some(v) = victim else { break };
            let internal = self
                .adapters
                .get_mut(&v)
                .and_then(|s| s.internal.take())
                .expect("a loaded victim");
            self.detach(&internal);
            self.metrics.evicted();
        }
        self.update_gauge();
    }

    /// Loads (or replaces) `name` from `path`: the new one under a fresh internal name first,
    /// then the switch, then the old one dropped.
    fn load_named(&mut self, name: &str, path: &Path) -> Result<AdapterInfo> {
        self.generation += 1;
        let internal = format!("{name}#{}", self.generation);
        self.attach(path, &internal)?;
        self.tick += 1;
        let old = self.adapters.insert(
            name.to_string(),
            Slot {
                path: path.to_path_buf(),
                internal: Some(internal),
                last_used: self.tick,
            },
        );
        if let Some(old) = old.and_then(|s| s.internal) {
            self.detach(&old);
        }
        self.metrics.loaded();
        self.evict_over_cap(&[name]);
        Ok(AdapterInfo {
            name: name.to_string(),
            path: path.to_path_buf(),
            loaded: true,
        })
    }

    fn unload(&mut self, name: &str) -> Result<()> {
        let slot = self
            .adapters
            .remove(name)
            .ok_or_else(|| ServeError::NotFound(format!("no adapter named {name:?}")))?;
        if let Some(i) = slot.internal {
            self.detach(&i);
        }
        self.update_gauge();
        Ok(())
    }

    /// The internal name of `name`, loading it again if it was evicted.
    fn ensure_loaded(&mut self, name: &str, pinned: &[&str]) -> Result<String> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self
            .adapters
            .get_mut(name)
            .ok_or_else(|| ServeError::NotFound(format!("no adapter named {name:?}")))?;
        slot.last_used = tick;
        if let Some(i) = &slot.internal {
            return Ok(i.clone());
        }
        let path = slot.path.clone();
        self.generation += 1;
        let internal = format!("{name}#{}", self.generation);
        self.attach(&path, &internal)?;
        if let Some(s) = self.adapters.get_mut(name) {
            s.internal = Some(internal.clone());
        }
        self.metrics.loaded();
        self.evict_over_cap(pinned);
        Ok(internal)
    }

    /// Greedy generation as a running batch: rows that finish leave it (their request is
    /// answered as soon as all its rows are done) and waiting greedy requests (any
    /// `max_new_tokens`) join it between steps, up to `max_batch_size` rows. A joining row is
    /// encoded and takes its first step alone, then its cache is appended with its earlier
    /// self-attention slots masked, so it computes what it would alone. Adapter changes that
    /// arrive meanwhile wait (admission stops) until the batch drains, so no row sees an
    /// adapter change mid-sequence.
    fn generate_continuous(
        &mut self,
        jobs: Vec<Job>,
        rx: &mpsc::Receiver<Command>,
        deferred: &mut std::collections::VecDeque<Command>,
    ) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.continuous_inner(jobs, rx, deferred)
        }));
        if result.is_err() {
            // The routing of the failed step must not outlive it; replies of the rows in
            // flight were dropped with the state (their clients get 503).
            let _ = with_peft!(&mut self.model, p => p.with_batch_adapters(&[BASE], |_| ()));
        }
    }

    fn continuous_inner(
        &mut self,
        jobs: Vec<Job>,
        rx: &mpsc::Receiver<Command>,
        deferred: &mut std::collections::VecDeque<Command>,
    ) {
        struct Live {
            reply: oneshot::Sender<Result<Output>>,
            outputs: Vec<Option<String>>,
        }
        struct Row {
            job: usize,
            input: usize,
            tokens: Vec<usize>,
            limit: usize,
            /// The adapter as requested (kept loaded while the row runs).
            adapter: Option<String>,
            /// The name it is loaded under, or BASE.
            internal: String,
        }
        let greedy = |t: &Task| matches!(t, Task::Generate { num_beams: 1, .. });
        let (start, eos) = match &self.model {
            Served::T5(p) => (
                p.base_model.config.decoder_start(),
                p.base_model.config.eos_token_id,
            ),
            _ => return,
        };
        let mut live: Vec<Option<Live>> = Vec::new();
        let mut rows: Vec<Row> = Vec::new();
        let mut state: Option<Running<B>> = None;
        let mut queue: std::collections::VecDeque<Job> = jobs.into();
        let mut admitting = true;
        loop {
            // Admit waiting requests while there is room.
            if admitting {
                while let Ok(c) = rx.try_recv() {
                    match c {
                        Command::Run(j) if greedy(&j.request.task) => queue.push_back(j),
                        other => {
                            // Anything else (an adapter change, another task) waits for the
                            // batch to drain, and stops admission so that it does soon.
                            admitting = false;
                            deferred.push_back(other);
                        }
                    }
                }
            }
            let mut joining: Vec<(Job, String)> = Vec::new();
            let mut room = self.config.max_batch_size.saturating_sub(rows.len());
            while let Some(j) = queue.front() {
                let n = j.request.inputs.len();
                if n > room && !(rows.is_empty() && joining.is_empty()) {
                    break;
                }
                let j = queue.pop_front().expect("front");
                if j.reply.is_closed() {
                    continue;
                }
                // The adapters of the rows in flight and of those joining stay loaded.
                let pinned: Vec<&str> = rows
                    .iter()
                    .filter_map(|r| r.adapter.as_deref())
                    .chain(
                        joining
                            .iter()
                            .filter_map(|(j, _)| j.request.adapter.as_deref()),
                    )
                    .collect();
                let internal = match &j.request.adapter {
                    None => Ok(BASE.to_string()),
                    Some(a) => self.ensure_loaded(a, &pinned),
                };
                match internal {
                    Ok(i) => {
                        room = room.saturating_sub(n);
                        joining.push((j, i));
                    }
                    Err(e) => {
                        let _ = j.reply.send(Err(e));
                    }
                }
            }
            if !joining.is_empty() {
                let texts: Vec<&str> = joining
                    .iter()
                    .flat_map(|(j, _)| j.request.inputs.iter().map(String::as_str))
                    .collect();
                let new_names: Vec<String> = joining
                    .iter()
                    .flat_map(|(j, i)| std::iter::repeat_n(i.clone(), j.request.inputs.len()))
                    .collect();
                let (ids, mask) = match self.tensors(&texts) {
                    Ok(t) => t,
                    Err(e) => {
                        for (j, _) in joining {
                            let _ = j.reply.send(Err(e.clone()));
                        }
                        continue;
                    }
                };
                self.metrics.batch(texts.len());
                let n = texts.len();
                let refs: Vec<&str> = new_names.iter().map(String::as_str).collect();
                let device = self.device.clone();
                let Served::T5(p) = &mut self.model else {
                    return;
                };
                // The new rows' encoding and first step, alone.
                let (enc, first, cache) = p
                    .with_batch_adapters(&refs, |m| {
                        let enc = m.encode(ids, Some(mask.clone()));
                        let mut cache = peft_models::t5::DecoderCache::default();
                        let start_ids = Tensor::<B, 2, Int>::from_data(
                            TensorData::new(vec![start as i64; n], [n, 1]),
                            &device,
                        );
                        let logits = m.decode_masked(
                            start_ids,
                            enc.clone(),
                            Some(mask.clone()),
                            Tensor::ones([n, 1], &device),
                            &mut cache,
                        );
                        (enc, logits, cache)
                    })
                    .expect("names checked when admitted");
                let first: Vec<i64> = peft_core::ops::argmax_last(first)
                    .into_iter()
                    .map(|t| t as i64)
                    .collect();
                let dec_mask_new = |past: usize| {
                    let mut v = vec![0i64; n * past.max(1)];
                    for r in 0..n {
                        v[r * past.max(1) + past.max(1) - 1] = 1;
                    }
                    Tensor::<B, 2, Int>::from_data(TensorData::new(v, [n, past.max(1)]), &device)
                };
                state = Some(match state.take() {
                    None => (enc, mask, dec_mask_new(1), cache),
                    Some((e, m, d, mut c)) => {
                        let len = e.dims()[1].max(enc.dims()[1]);
                        let pad3 = |t: Tensor<B, 3>| {
                            let [b, l, h] = t.dims();
                            if l == len {
                                t
                            } else {
                                Tensor::cat(vec![t, Tensor::zeros([b, len - l, h], &device)], 1)
                            }
                        };
                        let pad2 = |t: Tensor<B, 2, Int>| {
                            let [b, l] = t.dims();
                            if l == len {
                                t
                            } else {
                                Tensor::cat(vec![t, Tensor::zeros([b, len - l], &device)], 1)
                            }
                        };
                        let past = d.dims()[1];
                        c.append_rows(cache);
                        (
                            Tensor::cat(vec![pad3(e), pad3(enc)], 0),
                            Tensor::cat(vec![pad2(m), pad2(mask)], 0),
                            Tensor::cat(vec![d, dec_mask_new(past)], 0),
                            c,
                        )
                    }
                });
                let mut at = 0;
                for (j, i) in joining {
                    let k = live.len();
                    let Task::Generate { max_new_tokens, .. } = j.request.task else {
                        unreachable!("only greedy generation is admitted")
                    };
                    for input in 0..j.request.inputs.len() {
                        rows.push(Row {
                            job: k,
                            input,
                            tokens: vec![start, first[at] as usize],
                            limit: max_new_tokens,
                            adapter: j.request.adapter.clone(),
                            internal: i.clone(),
                        });
                        at += 1;
                    }
                    live.push(Some(Live {
                        outputs: vec![None; j.request.inputs.len()],
                        reply: j.reply,
                    }));
                }
            }
            // Rows that are done (EOS or max_new_tokens) leave; their requests are answered
            // when complete.
            let mut keep = Vec::new();
            let mut done = Vec::with_capacity(rows.len());
            for (r, row) in rows.iter().enumerate() {
                let last = *row.tokens.last().expect("start token");
                let finished = Some(last) == eos || row.tokens.len() > row.limit;
                done.push(finished);
                if finished {
                    let ids: Vec<u32> = row.tokens.iter().map(|&t| t as u32).collect();
                    let text = self.tok.decode(&ids).unwrap_or_default();
                    if let Some(l) = live[row.job].as_mut() {
                        l.outputs[row.input] = Some(text);
                        if l.outputs.iter().all(Option::is_some) {
                            let l = live[row.job].take().expect("live");
                            let _ = l.reply.send(Ok(Output::Texts(
                                l.outputs
                                    .into_iter()
                                    .map(Option::unwrap_or_default)
                                    .collect(),
                            )));
                        }
                    }
                } else {
                    keep.push(r);
                }
            }
            if keep.len() < rows.len() {
                let device = self.device.clone();
                let idx = peft_core::mixed::row_index::<B>(&keep, &device);
                if let Some((e, m, d, c)) = state.as_mut() {
                    *e = e.clone().select(0, idx.clone());
                    *m = m.clone().select(0, idx.clone());
                    *d = d.clone().select(0, idx.clone());
                    c.select_rows(idx);
                }
                let mut finished = done.into_iter();
                rows.retain(|_| !finished.next().expect("a flag per row"));
            }
            if rows.is_empty() {
                state = None;
                if admitting {
                    // What waits for this task joins a fresh batch; anything else ends it.
                    while let Ok(c) = rx.try_recv() {
                        deferred.push_back(c);
                    }
                    if deferred
                        .iter()
                        .any(|c| !matches!(c, Command::Run(j) if greedy(&j.request.task)))
                    {
                        admitting = false;
                    } else {
                        queue.extend(deferred.drain(..).filter_map(|c| match c {
                            Command::Run(j) => Some(j),
                            _ => None,
                        }));
                    }
                }
                if queue.is_empty() {
                    return;
                }
                continue;
            }
            // One step for every row in flight.
            let device = self.device.clone();
            let b = rows.len();
            let last: Vec<i64> = rows
                .iter()
                .map(|r| *r.tokens.last().expect("token") as i64)
                .collect();
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(last, [b, 1]), &device);
            let refs: Vec<&str> = rows.iter().map(|r| r.internal.as_str()).collect();
            let Some((enc, mask, dmask, cache)) = state.as_mut() else {
                return;
            };
            let step_mask = Tensor::cat(vec![dmask.clone(), Tensor::ones([b, 1], &device)], 1);
            let Served::T5(p) = &mut self.model else {
                return;
            };
            let logits = p
                .with_batch_adapters(&refs, |m| {
                    m.decode_masked(
                        ids,
                        enc.clone(),
                        Some(mask.clone()),
                        step_mask.clone(),
                        cache,
                    )
                })
                .expect("names checked when admitted");
            *dmask = step_mask;
            let best = peft_core::ops::argmax_last(logits);
            for (row, t) in rows.iter_mut().zip(best) {
                row.tokens.push(t);
            }
        }
    }

    fn run_jobs(&mut self, jobs: Vec<Job>) {
        // One batch per task (and generation settings), then per adapter if asked.
        let mut groups: Vec<(Task, Vec<Job>)> = Vec::new();
        for j in jobs {
            match groups.iter_mut().find(|(t, _)| *t == j.request.task) {
                Some((_, g)) => g.push(j),
                None => groups.push((j.request.task, vec![j])),
            }
        }
        for (task, group) in groups {
            match self.config.batching {
                Batching::Mixed => self.run_group(task, group),
                Batching::PerAdapter => {
                    let mut by: Vec<(Option<String>, Vec<Job>)> = Vec::new();
                    for j in group {
                        match by.iter_mut().find(|(a, _)| *a == j.request.adapter) {
                            Some((_, g)) => g.push(j),
                            None => by.push((j.request.adapter.clone(), vec![j])),
                        }
                    }
                    for (_, g) in by {
                        self.run_group(task, g);
                    }
                }
            }
        }
    }

    fn run_group(&mut self, task: Task, jobs: Vec<Job>) {
        // Unknown adapters are answered at once; the rest run in chunks holding at most
        // `max_loaded` distinct adapters.
        let mut chunks: Vec<Vec<Job>> = vec![Vec::new()];
        for j in jobs {
            if let Some(a) = &j.request.adapter
                && !self.adapters.contains_key(a)
            {
                let _ = j
                    .reply
                    .send(Err(ServeError::NotFound(format!("no adapter named {a:?}"))));
                continue;
            }
            let last = chunks.last_mut().expect("non-empty");
            let mut distinct: Vec<&Option<String>> =
                last.iter().map(|j| &j.request.adapter).collect();
            distinct.push(&j.request.adapter);
            distinct.sort();
            distinct.dedup();
            if distinct.iter().filter(|a| a.is_some()).count() > self.config.max_loaded {
                chunks.push(vec![j]);
            } else {
                last.push(j);
            }
        }
        for chunk in chunks.into_iter().filter(|c| !c.is_empty()) {
            self.run_chunk(task, chunk);
        }
    }

    fn run_chunk(&mut self, task: Task, jobs: Vec<Job>) {
        let pinned: Vec<String> = jobs
            .iter()
            .filter_map(|j| j.request.adapter.clone())
            .collect();
        let pinned_refs: Vec<&str> = pinned.iter().map(String::as_str).collect();
        let mut ready = Vec::new();
        let alone = jobs.len() == 1;
        for j in jobs {
            if j.reply.is_closed() {
                // The client went away: nothing to compute.
                continue;
            }
            let internal = match &j.request.adapter {
                None => Ok(BASE.to_string()),
                Some(a) => self.ensure_loaded(a, &pinned_refs),
            };
            match internal {
                Ok(i) => ready.push((j, i)),
                Err(e) => {
                    let _ = j.reply.send(Err(e));
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let texts: Vec<&str> = ready
            .iter()
            .flat_map(|(j, _)| j.request.inputs.iter().map(String::as_str))
            .collect();
        let names: Vec<&str> = ready
            .iter()
            .flat_map(|(j, i)| std::iter::repeat_n(i.as_str(), j.request.inputs.len()))
            .collect();
        self.metrics.batch(texts.len());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.compute(task, &texts, &names)
        }))
        .unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // The routing of the failed batch must not outlive it.
            let _ = with_peft!(&mut self.model, p => p.with_batch_adapters(&[BASE], |_| ()));
            Err(ServeError::Internal(format!(
                "the model failed on a batch: {what}"
            )))
        });
        match result {
            Ok(out) => {
                let mut at = 0;
                for (j, _) in ready {
                    let n = j.request.inputs.len();
                    let part = match &out {
                        Output::Texts(v) => Output::Texts(v[at..at + n].to_vec()),
                        Output::Labels(v) => Output::Labels(v[at..at + n].to_vec()),
                        Output::Embeddings(v) => Output::Embeddings(v[at..at + n].to_vec()),
                    };
                    at += n;
                    let _ = j.reply.send(Ok(part));
                }
            }
            Err(e) if alone => {
                for (j, _) in ready {
                    let _ = j.reply.send(Err(e.clone()));
                }
            }
            Err(_) => {
                // One request's input may have failed the batch: each runs alone, so that only
                // the one at fault gets the error.
                for (j, _) in ready {
                    self.run_chunk(task, vec![j]);
                }
            }
        }
    }

    fn tensors(&self, texts: &[&str]) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2, Int>)> {
        let batch = self
            .tok
            .encode_batch(texts, Some(self.config.limits.max_source_length), self.pad)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        if let Some(id) = batch
            .ids
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.vocab)
        {
            return Err(ServeError::Internal(format!(
                "the tokenizer gave id {id}, outside the model's vocab_size {}",
                self.vocab
            )));
        }
        let rows = batch.ids.len();
        let len = batch.ids.first().map_or(0, Vec::len);
        let flat = |v: &[Vec<u32>]| -> Vec<i64> { v.iter().flatten().map(|&x| x as i64).collect() };
        let t = |v: Vec<i64>| {
            Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows, len]), &self.device)
        };
        Ok((t(flat(&batch.ids)), t(flat(&batch.mask))))
    }

    fn compute(&mut self, task: Task, texts: &[&str], names: &[&str]) -> Result<Output> {
        let (ids, mask) = self.tensors(texts)?;
        let kind = self.kind();
        let peft_err = |e: peft_core::PeftError| ServeError::Internal(e.to_string());
        match (task, &mut self.model) {
            (
                Task::Generate {
                    max_new_tokens,
                    num_beams,
                },
                Served::T5(p),
            ) => {
                let out = p
                    .with_batch_adapters(names, |m| {
                        m.generate_beam(ids, Some(mask), max_new_tokens, num_beams)
                    })
                    .map_err(peft_err)?;
                let texts = out
                    .iter()
                    .map(|row| {
                        let ids: Vec<u32> = row.iter().map(|&t| t as u32).collect();
                        self.tok
                            .decode(&ids)
                            .map_err(|e| ServeError::Internal(e.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Output::Texts(texts))
            }
            (Task::Classify, Served::Cls(p)) => {
                let logits = p
                    .with_batch_adapters(names, |m| m.forward(ids, Some(mask), None).0)
                    .map_err(peft_err)?;
                let probs = peft_core::ops::softmax(logits, 1);
                let [rows, n] = probs.dims();
                let v = to_f32(probs.into_data())?;
                let out = (0..rows)
                    .map(|r| {
                        let mut row: Vec<LabelScore> = (0..n)
                            .map(|i| LabelScore {
                                label: self.labels.get(i).cloned().unwrap_or_default(),
                                score: v[r * n + i],
                            })
                            .collect();
                        row.sort_by(|a, b| b.score.total_cmp(&a.score));
                        row
                    })
                    .collect();
                Ok(Output::Labels(out))
            }
            (Task::Embed { pooling }, served) => {
                let m2 = mask.clone();
                let hidden = match served {
                    Served::T5(p) => p.with_batch_adapters(names, |m| m.encode(ids, Some(m2))),
                    Served::Cls(p) => p.with_batch_adapters(names, |m| {
                        m.forward(ids, Some(m2), None).1.last_hidden_state
                    }),
                    Served::Bert(p) => p.with_batch_adapters(names, |m| {
                        m.forward(ids, Some(m2), None).last_hidden_state
                    }),
                }
                .map_err(peft_err)?;
                let [rows, _, d] = hidden.dims();
                let pooled = match pooling {
                    Pooling::Cls => hidden.narrow(1, 0, 1).reshape([rows, d]),
                    Pooling::Mean => {
                        let w = mask.float().unsqueeze_dim::<3>(2);
                        let sum = (hidden * w.clone()).sum_dim(1).reshape([rows, d]);
                        let count = w.sum_dim(1).reshape([rows, 1]).clamp_min(1.0);
                        sum / count
                    }
                };
                let v = to_f32(pooled.into_data())?;
                Ok(Output::Embeddings(
                    v.chunks(d.max(1)).map(<[f32]>::to_vec).collect(),
                ))
            }
            (task, _) => Err(ServeError::BadRequest(format!(
                "{task:?} is not something a {kind:?} model does"
            ))),
        }
    }
}

fn bert_pad(tok: &TextTokenizer) -> u32 {
    tok.token_id("[PAD]").unwrap_or(0)
}

fn to_f32(d: TensorData) -> Result<Vec<f32>> {
    d.convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| ServeError::Internal(format!("{e:?}")))
}

/// A running generation batch: encoder states, encoder mask, decoder mask, decoder cache.
type Running<B> = (
    Tensor<B, 3>,
    Tensor<B, 2, Int>,
    Tensor<B, 2, Int>,
    peft_models::t5::DecoderCache<B>,
);
