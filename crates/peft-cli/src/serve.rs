//! `peft serve`: the HTTP server of peft-serve, with its flags, signals and address printing.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::{Args, ValueEnum};
use peft_serve::{Batching, Engine, Limits, ServeConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BatchingArg {
    /// Requests for different adapters share a batch.
    Mixed,
    /// One batch per adapter.
    PerAdapter,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The base model directory (config.json, weights, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter loaded at start, as NAME=DIR (repeat for more).
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// Allows `POST /v1/adapters` to load adapters from under this directory.
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    /// Adapters held in memory at once (least recently used evicted beyond it).
    #[arg(long, default_value_t = 16)]
    pub max_loaded: usize,
    /// Rows in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// How long a batch waits for more requests, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub batch_wait_ms: u64,
    /// Mixed-adapter batches, or one batch per adapter.
    #[arg(long, value_enum, default_value_t = BatchingArg::Mixed)]
    pub batching: BatchingArg,
    /// Address to bind (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// A key every /v1 request must carry (Authorization: Bearer KEY); also read from
    /// PEFT_API_KEY.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Tokens an input is truncated to.
    #[arg(long, default_value_t = 512)]
    pub max_source_length: usize,
    /// The largest max_new_tokens a request may ask for.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Inputs in one request at most.
    #[arg(long, default_value_t = 64)]
    pub max_inputs: usize,
    /// How to load the base: SEQ_CLS puts a classification head on a BERT encoder (default:
    /// the first adapter's task_type).
    #[arg(long)]
    pub task_type: Option<String>,
}

impl ServeArgs {
    /// The library's configuration for these flags.
    pub fn config(&self) -> Result<ServeConfig> {
        let mut c = ServeConfig::new(&self.model)
            .with_max_loaded(self.max_loaded)
            .with_max_batch_size(self.max_batch_size)
            .with_batch_wait_ms(self.batch_wait_ms)
            .with_batching(match self.batching {
                BatchingArg::Mixed => Batching::Mixed,
                BatchingArg::PerAdapter => Batching::PerAdapter,
            })
            .with_limits(Limits {
                max_source_length: self.max_source_length,
                max_new_tokens: self.max_new_tokens,
                max_inputs: self.max_inputs,
                ..Limits::default()
            });
        if let Some(t) = &self.task_type {
            let task: peft_core::TaskType =
                serde_json::from_value(serde_json::Value::String(t.clone()))
                    .with_context(|| format!("unknown --task-type {t:?}"))?;
            c = c.with_task_type(task);
        }
        for a in &self.adapters {
            let Some((name, dir)) = a.split_once('=') else {
                bail!("--adapter {a:?}: expected NAME=DIR");
            };
            c = c.with_adapter(name, dir);
        }
        if let Some(d) = &self.adapter_dir {
            if !d.is_dir() {
                bail!("--adapter-dir {}: not a directory", d.display());
            }
            c = c.with_adapter_dir(d);
        }
        if let Some(k) = self
            .api_key
            .clone()
            .or_else(|| std::env::var("PEFT_API_KEY").ok())
        {
            if k.is_empty() {
                bail!("--api-key is empty");
            }
            c = c.with_api_key(k);
        }
        c.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(c)
    }
}

/// How long requests in flight may take to finish after SIGTERM or Ctrl-C.
const DRAIN_S: u64 = 60;

/// Loads the model, binds, prints `listening on http://ADDR`, and serves until SIGTERM or
/// Ctrl-C, finishing the requests in flight.
pub fn run<B: Backend>(args: &ServeArgs, device: B::Device) -> Result<()>
where
    B::Device: Send + 'static,
{
    let config = args.config()?;
    let engine = Engine::start::<B>(&config, device).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        std::io::stdout().flush().ok();
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            eprintln!(
                "stopping: finishing the requests in flight (at most {DRAIN_S} s; a second \
                 signal stops at once)"
            );
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(DRAIN_S)) => {
                        eprintln!("stopped after {DRAIN_S} s with requests still in flight");
                    }
                }
                std::process::exit(1);
            });
        };
        peft_serve::serve(listener, peft_serve::router(engine, &config), shutdown)
            .await
            .context("serving")?;
        eprintln!("stopped");
        Ok(())
    })
}
