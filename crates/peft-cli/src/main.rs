//! `peft`: parameter counts, adapter files, forward passes and generation from the command line.
//!
//! Flags follow Hugging Face names (`--lora-r`, `--lora-alpha`, `--target-modules`,
//! `--max-new-tokens`). `--device cpu|wgpu|cuda` picks the backend among those compiled in
//! (features `ndarray`, `wgpu`, `cuda`).

mod alloc;
mod bench;
mod merge_adapters;
mod serve;

#[global_allocator]
static ALLOCATOR: alloc::Switch = alloc::Switch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Parser, Subcommand, ValueEnum};
use peft_cli::AdapterArgs;
use peft_cli::train::TrainArgs;
use peft_core::{AdapterConfig, AdapterHost, PeftModel};
use peft_io::adapter::{ADAPTER_CONFIG, open_adapter_weights, read_adapter_config};
use peft_io::tensors::to_f32;
use peft_io::{TextTokenizer, from_pretrained, load_t5, save_hf_model};
use peft_models::{T5Config, T5ForConditionalGeneration};

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning on Burn, file-compatible with Hugging Face PEFT"
)]
struct Cli {
    /// Backend to run on (among those compiled in).
    #[arg(long, global = true, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    /// CPU (burn-ndarray).
    Cpu,
    /// CPU through burn-flex (gemm-based kernels).
    Flex,
    /// GPU through wgpu (Vulkan, Metal, DX12).
    Wgpu,
    /// NVIDIA GPU through CUDA.
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print PEFT's trainable-parameter line for a model (preset name or HF dir) with an adapter
    /// (`--method lora|ia3|houlsby|pfeiffer`).
    Params {
        /// A preset (`mt0-large`, `t5-small`, `t0-3b`, ...) or a model directory with config.json.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        lora: Box<AdapterArgs>,
    },
    /// Run a forward pass and write the outputs with transformers' names to a safetensors file.
    Forward {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (PEFT LoRA/IA3 or AdapterHub bottleneck).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Input text (repeat for a batch).
        #[arg(long, required = true)]
        text: Vec<String>,
        /// Decoder input ids, comma separated (default: the decoder start token).
        #[arg(long, value_delimiter = ',')]
        decoder_input_ids: Option<Vec<u32>>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate text, one decoded line per input (special tokens skipped).
    Generate {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (PEFT LoRA/IA3 or AdapterHub bottleneck).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Maximum number of new tokens.
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Beam width (1 = greedy).
        #[arg(long, default_value_t = 1)]
        num_beams: usize,
        /// Source tokens kept per input (longer prompts are truncated, with a warning).
        #[arg(long, default_value_t = 512)]
        max_source_length: usize,
        /// Input texts.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Fine-tune an adapter (LoRA, IA3, Houlsby, Pfeiffer) on a seq2seq or classification model.
    Train(Box<TrainArgs>),
    /// Describe an adapter directory.
    Inspect {
        /// Adapter directory.
        dir: PathBuf,
    },
    /// Time one benchmark workload and print one JSON line (run by `cargo xtask bench`).
    Bench(bench::BenchArgs),
    /// Serve a base model with many adapters over HTTP (mixed-adapter batches, adapters loaded
    /// at run time, LRU eviction).
    Serve(Box<serve::ServeArgs>),
    /// Merge an adapter into its base and write a plain HF model directory.
    Merge {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing model in --out (even the input model's own directory): the
        /// merged model is written aside and swapped in only when complete.
        #[arg(long)]
        overwrite: bool,
    },
    /// Combine LoRA adapters into one (PEFT's `add_weighted_adapter`: linear, cat, svd, ties,
    /// dare and magnitude pruning), from the adapter files alone.
    MergeAdapters(Box<merge_adapters::MergeAdaptersArgs>),
    /// Convert a DoRA adapter to a plain LoRA adapter (truncated SVD of DoRA's weight change),
    /// printing the approximation error, for servers that accept LoRA only.
    Convert {
        /// Model directory (the adapter's base).
        #[arg(long)]
        model: PathBuf,
        /// DoRA adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Target format (`lora`).
        #[arg(long, default_value = "lora")]
        to: String,
        /// Rank of the LoRA adapter written (`lora_alpha` is set to it: scaling 1).
        #[arg(long = "lora-r", default_value_t = 8)]
        lora_r: usize,
        /// Output directory (must not hold an adapter already).
        #[arg(long)]
        out: PathBuf,
    },
}

/// A model's architecture, from a preset name or a directory's config.json.
enum Arch {
    T5(T5Config),
    Bert(peft_models::BertConfig),
}

fn arch(model: &str) -> Result<Arch> {
    if let Some(c) = T5Config::preset_by_name(model) {
        return Ok(Arch::T5(c));
    }
    if let Some(c) = peft_models::BertConfig::preset_by_name(model) {
        return Ok(Arch::Bert(c));
    }
    let dir = Path::new(model);
    if dir.join("config.json").exists() {
        return Ok(match peft_io::hf_model::model_type(dir)?.as_str() {
            "bert" => Arch::Bert(peft_io::hf_model::read_bert_config(dir)?),
            _ => Arch::T5(peft_io::hf_model::read_t5_config(dir)?),
        });
    }
    bail!(
        "`{model}` is neither a preset ({}, {}) nor a directory with config.json",
        T5Config::PRESETS.join(", "),
        peft_models::BertConfig::PRESETS.join(", ")
    )
}

fn params_line<B: Backend, M: AdapterHost<B>>(model: M, lora: &AdapterArgs) -> Result<String> {
    let mut config = lora.adapter_config()?;
    if config.is_prompt_learning() && config.task_type().is_none() {
        // Prompt learning needs the task (PEFT's prompt-learning models are per task): the
        // model's own, as `peft train` defaults.
        let task = if model.model_type() == Some("bert") {
            peft_core::TaskType::FeatureExtraction
        } else {
            peft_core::TaskType::Seq2SeqLm
        };
        config.set_task_type(Some(task));
    }
    if matches!(config, AdapterConfig::PrefixTuning(_)) {
        let g = peft_core::prompt::model::geometry(&model)?;
        if let Some(why) = g.key_value_refusal {
            // PEFT creates it (and counts it) before it fails to run: count it the same way.
            let trainable = peft_core::prompt::model::parameter_count::<B>(&config, &g)?;
            eprintln!("note: prefix tuning cannot be trained on this model: {why}");
            let all = peft_core::count_params(&model) + trainable;
            return Ok(peft_core::ParamCounts { trainable, all }.line());
        }
    }
    Ok(PeftModel::new(model, config, "default")?.trainable_parameters_line())
}

/// `rows` as an id tensor, refusing an id the model's embedding has no row for (burn would
/// panic on it): `what` names the ids (`--decoder-input-ids`, the tokenizer's output).
fn checked_ids<B: Backend>(
    what: &str,
    rows: &[Vec<u32>],
    vocab_size: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2, Int>> {
    if let Some(bad) = rows.iter().flatten().find(|v| **v as usize >= vocab_size) {
        bail!("{what}: token id {bad} is out of range for the model's vocab_size {vocab_size}");
    }
    Ok(ids_tensor(rows, device))
}

fn ids_tensor<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let b = rows.len();
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|v| *v as i64).collect();
    Tensor::from_data(TensorData::new(flat, [b, l]), device)
}

fn warn_unused(what: &Path, report: &peft_io::LoadReport) {
    if !report.unused.is_empty() {
        eprintln!(
            "warning: {} unused tensors in {}: {:?}",
            report.unused.len(),
            what.display(),
            report.unused
        );
    }
    if !report.newly_initialized.is_empty() {
        eprintln!(
            "warning: not in {}, freshly initialised: {:?}",
            what.display(),
            report.newly_initialized
        );
    }
}

/// Warns about every adapter tensor holding NaN or infinite values (the outputs would be
/// garbage), naming the tensor; `merge` refuses such an adapter outright.
fn warn_non_finite<B: Backend, M: AdapterHost<B>>(dir: &Path, peft: &PeftModel<B, M>) {
    for name in peft.adapter_names() {
        peft.visit_adapter_params(&name, &mut |site, p| {
            let (_, values) = p.param.to_file(&p.layout);
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                eprintln!(
                    "warning: {}: tensor {site}.{} has {bad} NaN/infinite value(s) of {}; outputs \
                     will not be meaningful",
                    dir.display(),
                    p.key,
                    values.len()
                );
            }
        });
    }
}

/// `model` with the adapter of `adapter` attached and active (inference mode).
fn attach<B: Backend, M: AdapterHost<B>>(model: M, adapter: Option<&Path>) -> Result<M> {
    match adapter {
        None => Ok(model),
        Some(a) => {
            let (peft, report) = from_pretrained(model, a, "default")?;
            warn_unused(a, &report);
            warn_non_finite(a, &peft);
            Ok(peft.base_model)
        }
    }
}

/// The T5 model of `dir`, with the adapter of `adapter` attached.
fn load_model<B: Backend>(
    dir: &Path,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<T5ForConditionalGeneration<B>> {
    let kind = peft_io::hf_model::model_type(dir)?;
    if kind != "t5" && kind != "mt5" {
        bail!(
            "{}: model type {kind:?} cannot generate; generation needs a seq2seq model (t5, mt5)",
            dir.display()
        );
    }
    let (model, report) = load_t5::<B>(dir, device)?;
    warn_unused(dir, &report);
    attach(model, adapter)
}

/// BERT forward: `logits` `[batch, labels]` for a classifier (config `architectures` or a
/// SEQ_CLS adapter), else the bare encoder's `last_hidden_state` (and `pooler_output`).
fn bert_forward<B: Backend>(
    dir: &Path,
    adapter: Option<&Path>,
    texts: &[&str],
    device: &B::Device,
) -> Result<BTreeMap<String, peft_io::tensors::F32Tensor>> {
    let raw = peft_io::hf_model::read_json(&dir.join("config.json"))?;
    let arch_cls = raw["architectures"].as_array().is_some_and(|a| {
        a.iter().any(|v| {
            v.as_str()
                .is_some_and(|s| s.ends_with("ForSequenceClassification"))
        })
    });
    let adapter_config = adapter.map(read_adapter_config).transpose()?;
    let adapter_cls = adapter_config
        .as_ref()
        .is_some_and(|c| c.task_type() == Some(peft_core::TaskType::SeqCls));
    // Inputs are cut to the model's positions, less those a prompt adapter's virtual tokens take.
    let virtual_tokens = adapter_config
        .as_ref()
        .and_then(AdapterConfig::prompt_common)
        .map_or(0, |c| c.num_virtual_tokens);
    let positions = raw["max_position_embeddings"].as_u64().unwrap_or(512) as usize;
    if virtual_tokens >= positions {
        bail!(
            "the adapter's {virtual_tokens} virtual tokens leave no room in the model's \
             {positions} positions ({})",
            dir.join("config.json").display()
        );
    }
    let tok = TextTokenizer::from_path(dir)?;
    let pad = tok.token_id("[PAD]").unwrap_or(0);
    let batch = tok.encode_batch(texts, Some(positions - virtual_tokens), pad)?;
    let vocab = raw["vocab_size"].as_u64().unwrap_or(u64::MAX) as usize;
    let ids = checked_ids::<B>("the tokenizer's ids", &batch.ids, vocab, device)?;
    let mask = ids_tensor::<B>(&batch.mask, device);
    let mut out = BTreeMap::new();
    if arch_cls || adapter_cls {
        let (model, report) = peft_io::load_bert_classifier::<B>(dir, device)?;
        warn_unused(dir, &report);
        let model = attach(model, adapter)?;
        let (logits, o) = model.forward(ids, Some(mask), None);
        out.insert("logits".to_string(), to_f32(logits));
        out.insert("last_hidden_state".to_string(), to_f32(o.last_hidden_state));
    } else {
        let (model, report) = peft_io::load_bert::<B>(dir, device)?;
        warn_unused(dir, &report);
        let model = attach(model, adapter)?;
        let o = model.forward(ids, Some(mask), None);
        out.insert("last_hidden_state".to_string(), to_f32(o.last_hidden_state));
        if let Some(p) = o.pooler_output {
            out.insert("pooler_output".to_string(), to_f32(p));
        }
    }
    Ok(out)
}

fn run<B: Backend>(cmd: Cmd, device: &B::Device) -> Result<()> {
    match cmd {
        Cmd::Params { model, lora } => {
            // Lazy parameters: counting allocates no weights, even for billions of parameters.
            let line = match arch(&model)? {
                Arch::T5(c) => {
                    params_line(T5ForConditionalGeneration::<B>::new(&c, device)?, &lora)?
                }
                Arch::Bert(c) if lora.task_type.as_deref() == Some("SEQ_CLS") => params_line(
                    peft_models::BertForSequenceClassification::<B>::new(&c, device)?,
                    &lora,
                )?,
                Arch::Bert(c) => {
                    params_line(peft_models::BertModel::<B>::new(&c, true, device)?, &lora)?
                }
            };
            println!("{line}");
        }
        Cmd::Forward {
            model,
            adapter,
            text,
            decoder_input_ids,
            out,
        } => {
            let texts: Vec<&str> = text.iter().map(String::as_str).collect();
            let tensors = if peft_io::hf_model::model_type(&model)? == "bert" {
                bert_forward::<B>(&model, adapter.as_deref(), &texts, device)?
            } else {
                let m = load_model::<B>(&model, adapter.as_deref(), device)?;
                let tok = TextTokenizer::from_path(&model)?;
                let pad = m.config.pad_token_id.unwrap_or(0) as u32;
                let batch = tok.encode_batch(&texts, None, pad)?;
                let dec =
                    decoder_input_ids.unwrap_or_else(|| vec![m.config.decoder_start() as u32]);
                let src_len = batch.ids.first().map_or(0, Vec::len);
                peft_cli::ensure_memory(
                    m.config
                        .activation_bytes(texts.len(), src_len, dec.len(), false),
                    &format!(
                        "a forward pass over {} input(s) of {src_len} tokens",
                        texts.len()
                    ),
                    "give shorter or fewer --text inputs",
                )?;
                let dec_rows = vec![dec; texts.len()];
                let vocab = m.config.vocab_size;
                let o = m.forward(
                    checked_ids::<B>("the tokenizer's ids", &batch.ids, vocab, device)?,
                    Some(ids_tensor::<B>(&batch.mask, device)),
                    checked_ids::<B>("--decoder-input-ids", &dec_rows, vocab, device)?,
                );
                BTreeMap::from([
                    ("logits".to_string(), to_f32(o.logits)),
                    (
                        "encoder_last_hidden_state".to_string(),
                        to_f32(o.encoder_last_hidden_state),
                    ),
                ])
            };
            peft_io::tensors::write_safetensors(
                &out,
                &tensors,
                HashMap::from([("format".into(), "pt".into())]),
            )?;
            eprintln!("wrote {}", out.display());
        }
        Cmd::Generate {
            model,
            adapter,
            max_new_tokens,
            num_beams,
            max_source_length,
            text,
        } => {
            if num_beams == 0 {
                bail!("--num-beams must be at least 1");
            }
            if max_source_length == 0 {
                bail!("--max-source-length must be at least 1");
            }
            let m = load_model::<B>(&model, adapter.as_deref(), device)?;
            let tok = TextTokenizer::from_path(&model)?;
            let texts: Vec<&str> = text.iter().map(String::as_str).collect();
            let pad = m.config.pad_token_id.unwrap_or(0) as u32;
            for (i, t) in texts.iter().enumerate() {
                let n = tok.encode(t, None)?.len();
                if n > max_source_length {
                    eprintln!(
                        "warning: input {} has {n} tokens; truncated to --max-source-length \
                         {max_source_length}",
                        i + 1
                    );
                }
            }
            let batch = tok.encode_batch(&texts, Some(max_source_length), pad)?;
            let src_len = batch.ids.first().map_or(0, Vec::len);
            peft_cli::ensure_memory(
                m.config
                    .activation_bytes(texts.len() * num_beams, src_len, max_new_tokens, false),
                &format!(
                    "generating {max_new_tokens} tokens with {num_beams} beam(s) for {} \
                     input(s) of {src_len} tokens",
                    texts.len()
                ),
                "lower --max-source-length, --max-new-tokens or --num-beams, or give fewer inputs",
            )?;
            let out = m.generate_beam(
                checked_ids::<B>(
                    "the tokenizer's ids",
                    &batch.ids,
                    m.config.vocab_size,
                    device,
                )?,
                Some(ids_tensor::<B>(&batch.mask, device)),
                max_new_tokens,
                num_beams,
            );
            for ids in out {
                let ids: Vec<u32> = ids.into_iter().map(|v| v as u32).collect();
                println!("{}", tok.decode(&ids)?);
            }
        }
        Cmd::Inspect { dir } => inspect(&dir)?,
        Cmd::MergeAdapters(args) => merge_adapters::run(&args)?,
        Cmd::Train(_) | Cmd::Bench(_) | Cmd::Serve(_) => {
            unreachable!("dispatched before")
        }
        Cmd::Convert {
            model,
            adapter,
            to,
            lora_r,
            out,
        } => {
            if !to.eq_ignore_ascii_case("lora") {
                bail!("--to {to:?}: only `lora` is supported");
            }
            if out.join("adapter_config.json").exists() {
                bail!(
                    "--out {} already holds an adapter (adapter_config.json); choose another \
                     directory",
                    out.display()
                );
            }
            let (m, a, o) = (absolute(&model)?, absolute(&adapter)?, absolute(&out)?);
            if o == a || o.starts_with(&m) || o.starts_with(&a) {
                bail!(
                    "--out {} is the adapter's or the model's directory (or inside one): choose \
                     another directory",
                    out.display()
                );
            }
            let task = read_adapter_config(&adapter)?.task_type();
            match peft_io::AutoModel::<B>::from_pretrained(&model, task, device)?.0 {
                peft_io::AutoModel::T5(m) => convert_dora(m, &adapter, lora_r, &out),
                peft_io::AutoModel::Bert(m) => convert_dora(m, &adapter, lora_r, &out),
                peft_io::AutoModel::BertForSequenceClassification(m) => {
                    convert_dora(m, &adapter, lora_r, &out)
                }
            }?;
        }
        Cmd::Merge {
            model,
            adapter,
            out,
            overwrite,
        } => {
            check_merge_out(&model, &adapter, &out, overwrite)?;
            // Written aside, then swapped in: a failure never leaves a half-written model, and
            // the input's files stay readable (memory-mapped) until the swap.
            let staging = staging_dir(&out);
            if let Err(e) = merge_model::<B>(&model, &adapter, &staging, device) {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            let final_out = out;
            swap_in(&staging, &final_out)?;
            println!(
                "merged {} into {} -> {}",
                adapter.display(),
                model.display(),
                final_out.display()
            );
        }
    }
    Ok(())
}

/// `peft convert --to lora`: loads DoRA adapter `adapter` on `base`, writes its rank-`r` LoRA
/// approximation into `out`, and prints the approximation error per site and in all.
fn convert_dora<B: Backend, M: peft_core::AdapterHost<B>>(
    base: M,
    adapter: &Path,
    r: usize,
    out: &Path,
) -> Result<()> {
    let (mut peft, _) = peft_io::from_pretrained(base, adapter, "dora")?;
    let report = peft_core::methods::lora::convert::dora_to_lora(&mut peft, "dora", "default", r)?;
    peft.delete_adapter("dora")?;
    let written = peft_io::save_pretrained(&peft, out)?;
    let worst = report
        .sites
        .iter()
        .max_by(|a, b| a.relative_error.total_cmp(&b.relative_error));
    for s in &report.sites {
        println!(
            "{}: rank {}, |DoRA change| {:.4e}, relative error {:.4e}",
            s.path, s.rank, s.norm, s.relative_error
        );
    }
    println!(
        "converted {} sites to LoRA r={r} (lora_alpha={r}): relative error {:.4e} in all{}",
        report.sites.len(),
        report.relative_error,
        worst.map_or(String::new(), |w| format!(
            ", worst {:.4e} at {}",
            w.relative_error, w.path
        ))
    );
    println!("wrote {}", written[0].display());
    Ok(())
}

/// Merges `adapter` into the model in `model` and writes the merged HF model into `out`.
fn merge_model<B: Backend>(
    model: &Path,
    adapter: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<()> {
    let config = peft_io::hf_model::read_json(&model.join("config.json"))?;
    let task = read_adapter_config(adapter)?.task_type();
    match peft_io::AutoModel::<B>::from_pretrained(model, task, device)?.0 {
        peft_io::AutoModel::T5(m) => merge_into(m, adapter, &config, out, model),
        peft_io::AutoModel::Bert(m) => merge_into(m, adapter, &config, out, model),
        peft_io::AutoModel::BertForSequenceClassification(m) => {
            merge_into(m, adapter, &config, out, model)
        }
    }
}

/// `path` made absolute and normalised through its nearest existing ancestor (it may not exist).
fn absolute(path: &Path) -> Result<PathBuf> {
    let mut existing = std::path::absolute(path)?;
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Refuses an `--out` that would overwrite what the user made (the base model, the adapter, or
/// an existing model) unless `--overwrite` is given; `--out` inside the base or the adapter is
/// always refused.
fn check_merge_out(model: &Path, adapter: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let (m, a, o) = (absolute(model)?, absolute(adapter)?, absolute(out)?);
    for (what, input) in [("the base model", &m), ("the adapter", &a)] {
        if o != *input && o.starts_with(input) {
            bail!(
                "--out {} is inside {what} directory {}: choose a directory outside it",
                out.display(),
                input.display()
            );
        }
    }
    if o == a {
        bail!(
            "--out {} is the adapter directory: choose another directory",
            out.display()
        );
    }
    if overwrite {
        return Ok(());
    }
    if o == m {
        bail!(
            "--out {} is the base model's directory: merging would overwrite its weights; choose \
             another --out, or pass --overwrite to replace it",
            out.display()
        );
    }
    let existing: Vec<&str> = [
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    .into_iter()
    .filter(|f| o.join(f).exists())
    .collect();
    if !existing.is_empty() {
        bail!(
            "--out {} already holds a model ({}); pass --overwrite to replace it",
            out.display(),
            existing.join(", ")
        );
    }
    Ok(())
}

/// A fresh temporary directory next to `out` (same file system, so the swap is a rename).
fn staging_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map_or("merged".into(), |n| n.to_string_lossy().into_owned());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Moves the complete `staging` directory to `out`, replacing what was there.
fn swap_in(staging: &Path, out: &Path) -> Result<()> {
    let old = staging.with_extension("old");
    let result = (|| -> Result<()> {
        if out.exists() {
            std::fs::rename(out, &old)
                .with_context(|| format!("moving {} aside", out.display()))?;
        }
        std::fs::rename(staging, out)
            .with_context(|| format!("moving the merged model to {}", out.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(staging);
        if old.exists() && !out.exists() {
            let _ = std::fs::rename(&old, out);
        }
    }
    result
}

/// Merge-and-unload the adapter into `base` and write a plain HF model directory.
fn merge_into<B: Backend, M: AdapterHost<B> + peft_models::HfParams<B>>(
    base: M,
    adapter: &Path,
    config: &serde_json::Value,
    out: &Path,
    model_dir: &Path,
) -> Result<()> {
    let (peft, _) = from_pretrained(base, adapter, "default")?;
    let mut merged = peft.merge_and_unload(true)?;
    save_hf_model(&mut merged, config, out, Some(model_dir))?;
    Ok(())
}

fn inspect(dir: &Path) -> Result<()> {
    let config = read_adapter_config(dir)?;
    let raw = peft_io::hf_model::read_json(&dir.join(ADAPTER_CONFIG))?;
    let weights = match &config {
        AdapterConfig::Bottleneck(_) => peft_io::adapterhub::open_weights(dir)?,
        _ => open_adapter_weights(dir)?,
    };
    let names = weights.names();
    let mut params = 0usize;
    let mut bytes = 0u64;
    let mut ranks = BTreeMap::new();
    for n in &names {
        if let Some((shape, _)) = weights.get_f32(n)? {
            // AdapterHub writes an `ln_before` LayerNorm twice (two names, one tensor).
            if n.contains(".adapter_down.0.")
                && names.contains(&n.replace("adapter_down.0", "adapter_norm_before"))
            {
                continue;
            }
            params += shape.iter().product::<usize>();
            if n.ends_with("lora_A.weight") {
                *ranks.entry(shape[0]).or_insert(0usize) += 1;
            }
            if n.ends_with("adapter_up.weight") {
                *ranks.entry(shape[1]).or_insert(0usize) += 1;
            }
        }
    }
    let path = weights.path();
    if let Ok(meta) = std::fs::metadata(&path) {
        bytes = meta.len();
    }
    let s = |v: Option<&str>| v.unwrap_or("-").to_string();
    // The fields PEFT's LoRA and IA3 configs share.
    let peft_common = |method: &str,
                       task: Option<peft_core::TaskType>,
                       base: Option<&str>,
                       targets: Option<&peft_core::TargetModules>| {
        println!("method:         {method} (PEFT)");
        println!(
            "task_type:      {}",
            task.map_or("-".into(), |t| format!("{t:?}"))
        );
        println!("base model:     {}", s(base));
        println!(
            "target_modules: {}",
            targets.map_or("(model default)".into(), |t| t.to_string())
        );
    };
    println!("adapter:        {}", dir.display());
    match &config {
        AdapterConfig::Lora(c) => {
            peft_common(
                "LORA",
                c.header.task_type,
                c.header.base_model_name_or_path.as_deref(),
                c.target_modules.as_ref(),
            );
            println!("r:              {}  (layers by rank: {ranks:?})", c.r);
            println!("lora_alpha:     {}", c.lora_alpha);
            println!("lora_dropout:   {}", c.lora_dropout);
            if let Some(m) = &c.modules_to_save {
                println!("modules_to_save: {m:?}");
            }
        }
        AdapterConfig::LoHa(_) | AdapterConfig::LoKr(_) => {
            let (kind, header_task, base, l) = match &config {
                AdapterConfig::LoHa(c) => (
                    "LOHA",
                    c.header.task_type,
                    c.header.base_model_name_or_path.as_deref(),
                    &c.common,
                ),
                AdapterConfig::LoKr(c) => (
                    "LOKR",
                    c.header.task_type,
                    c.header.base_model_name_or_path.as_deref(),
                    &c.common,
                ),
                _ => unreachable!("matched above"),
            };
            peft_common(kind, header_task, base, l.target_modules.as_ref());
            println!("r:              {}", l.r);
            println!("alpha:          {}", l.alpha);
            println!(
                "dropout:        rank {}, module {}",
                l.rank_dropout, l.module_dropout
            );
        }
        AdapterConfig::PromptTuning(_)
        | AdapterConfig::PTuning(_)
        | AdapterConfig::PrefixTuning(_) => {
            let (base, what) = match &config {
                AdapterConfig::PromptTuning(c) => (
                    c.header.base_model_name_or_path.as_deref(),
                    format!("{:?} init", c.prompt_tuning_init),
                ),
                AdapterConfig::PTuning(c) => (
                    c.header.base_model_name_or_path.as_deref(),
                    format!("{:?} encoder", c.encoder_reparameterization_type),
                ),
                AdapterConfig::PrefixTuning(c) => (
                    c.header.base_model_name_or_path.as_deref(),
                    format!("projection {}", c.prefix_projection),
                ),
                _ => unreachable!("matched above"),
            };
            let common = config.prompt_common().expect("matched above");
            println!("method:         {} (PEFT), {what}", config.peft_type());
            println!(
                "task_type:      {}",
                config.task_type().map_or("-".into(), |t| format!("{t:?}"))
            );
            println!("base model:     {}", s(base));
            println!("virtual tokens: {}", common.num_virtual_tokens);
        }
        AdapterConfig::Ia3(c) => {
            peft_common(
                "IA3",
                c.header.task_type,
                c.header.base_model_name_or_path.as_deref(),
                c.target_modules.as_ref(),
            );
            println!(
                "feedforward:    {}",
                c.feedforward_modules
                    .as_ref()
                    .map_or("(model default)".into(), |t| t.to_string())
            );
        }
        AdapterConfig::Bottleneck(c) => {
            let places: Vec<&str> = [
                (c.mh_adapter, "attention"),
                (c.cross_adapter, "cross-attention"),
                (c.output_adapter, "output"),
            ]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
            println!("method:         bottleneck (AdapterHub)");
            println!("name:           {}", s(raw["name"].as_str()));
            println!(
                "model:          {} ({})",
                s(raw["model_type"].as_str()),
                s(raw["model_class"].as_str())
            );
            println!("sites:          {}", places.join(", "));
            println!("bottleneck:     {ranks:?} (size: sites)");
            println!("non_linearity:  {}", c.non_linearity);
            println!("reduction:      {:?}", c.reduction_factor);
            if !c.leave_out.is_empty() {
                println!("leave_out:      {:?}", c.leave_out);
            }
        }
    }
    println!("tensors:        {} in {}", names.len(), path.display());
    println!("parameters:     {}", peft_core::thousands(params));
    println!(
        "file size:      {} bytes",
        peft_core::thousands(bytes as usize)
    );
    let version = raw
        .get("peft_version")
        .or_else(|| raw.get("version"))
        .and_then(|v| v.as_str())
        .unwrap_or("unknown");
    println!("written by:     {version}");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {}", error_message(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: library errors already put their cause in their
/// own message (`{path}: {source}`), so a cause whose text is already there is not repeated.
fn error_message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Runs `$body` with `$B` bound to the backend `--device` names, or says which feature is
/// missing from this build.
macro_rules! on_backend {
    ($device:expr, |$B:ident| $body:expr) => {
        match $device {
            DeviceArg::Cpu => {
                type $B = burn::backend::NdArray;
                $body
            }
            DeviceArg::Flex => {
                #[cfg(feature = "flex")]
                {
                    type $B = burn::backend::Flex;
                    $body
                }
                #[cfg(not(feature = "flex"))]
                {
                    bail!("this `peft` was built without the `flex` feature (cargo build --features flex)")
                }
            }
            DeviceArg::Wgpu => {
                #[cfg(feature = "wgpu")]
                {
                    type $B = burn::backend::Wgpu;
                    $body
                }
                #[cfg(not(feature = "wgpu"))]
                {
                    bail!("this `peft` was built without the `wgpu` feature (cargo build --features wgpu)")
                }
            }
            DeviceArg::Cuda => {
                #[cfg(feature = "cuda")]
                {
                    type $B = burn::backend::Cuda;
                    $body
                }
                #[cfg(not(feature = "cuda"))]
                {
                    bail!("this `peft` was built without the `cuda` feature (cargo build --features cuda)")
                }
            }
        }
    };
}

/// The backend's device number `index` (its default device when `None`).
fn indexed_device<D: burn::tensor::backend::DeviceOps>(index: Option<usize>) -> D {
    match index {
        None => D::default(),
        Some(i) => {
            let mut id = D::default().to_id();
            id.index_id = i as u16;
            D::from_id(id)
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    if let Cmd::Train(args) = &cli.cmd
        && args.nproc > 1
    {
        // The workers handle Ctrl-C (they share this terminal's process group); the launcher
        // waits for them.
        let _ = ctrlc::set_handler(|| {});
        let code = peft_cli::launch::run(args.nproc, args.local_rank.is_some())?;
        if code != 0 {
            std::process::exit(code);
        }
        return Ok(());
    }
    if let Cmd::Train(args) = &cli.cmd
        && args.world_size.is_some()
    {
        // Burn's tensor transport panics in its own tasks when a peer disappears; the worker
        // reports the lost peer by rank instead, so those panics are not shown.
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let io = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("peft-collective-io"));
            if !io {
                default(info);
            }
        }));
    }
    if let Cmd::Train(args) = &cli.cmd {
        // Ctrl-C asks the trainer to save a checkpoint and stop; a second one exits at once.
        let cancel = peft_train::CancellationToken::new();
        let token = cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if token.cancel() {
                std::process::exit(130);
            }
        });
        // A data-parallel worker trains on its own GPU (CPU workers share the CPU).
        let index = match cli.device {
            DeviceArg::Cuda | DeviceArg::Wgpu => args.local_rank,
            _ => None,
        };
        let summary = on_backend!(cli.device, |Bk| {
            let device = indexed_device(index);
            peft_core::ops::on_pool(|| {
                peft_cli::train::train::<burn::backend::Autodiff<Bk>>(args, &device, cancel)
            })
        })?;
        if summary.interrupted {
            std::process::exit(130);
        }
        return Ok(());
    }
    if let Cmd::Serve(args) = &cli.cmd {
        return on_backend!(cli.device, |Bk| serve::run::<Bk>(args, Default::default()));
    }
    if let Cmd::Bench(args) = &cli.cmd {
        let name = format!("{:?}", cli.device).to_lowercase();
        return on_backend!(cli.device, |Bk| {
            let v = peft_core::ops::on_pool(|| {
                bench::run::<burn::backend::Autodiff<Bk>>(args, &Default::default(), &name)
            })?;
            println!("{v}");
            Ok(())
        });
    }
    // The compute commands run on rayon's pool (`peft_core::ops::on_pool`); `serve` above runs
    // each batch there from its model thread, which waits for requests outside the pool.
    on_backend!(cli.device, |Bk| peft_core::ops::on_pool(|| run::<Bk>(
        cli.cmd,
        &Default::default()
    )))
}
