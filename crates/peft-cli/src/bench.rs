//! `peft bench`: the peft side of `cargo xtask bench`. Times one workload in this process and
//! prints one JSON line, the same schema as `xtask/bench/bench_torch.py` (the PyTorch + PEFT
//! side), so the two can be run interleaved, one process per workload (peak RSS does not mix).
//!
//! The workload: an mT5-small-shaped model (vocab 32128, d_model 512, d_kv 64,
//! 6 heads, d_ff 1024 gated-gelu, 8 + 8 layers, untied head) with random weights from `--seed`,
//! batch 8, source 128, target 16 tokens, LoRA r=8 alpha=32 dropout 0.1 on q and v, AdamW.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use peft_core::optim::AdamWConfig;
use peft_core::train::{SplitMix, masked_cross_entropy};
use peft_core::{AdapterHost, InitLoraWeights, LoraConfig, PeftModel, TargetModules, TaskType};
use peft_models::{T5Config, T5ForConditionalGeneration};
use serde_json::{Value, json};

/// The workloads, named as in the issue and in `bench_torch.py`.
pub const WORKLOADS: &[&str] = &[
    "lora-train",
    "full-train",
    "generate",
    "infer-base",
    "infer-unmerged",
    "infer-merged",
];

/// Options of `peft bench` (the same as `bench_torch.py`'s).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// lora-train, full-train, generate, infer-base, infer-unmerged, infer-merged.
    #[arg(long)]
    pub workload: String,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Seed of weights and inputs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Batch size.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Source length.
    #[arg(long, default_value_t = 128)]
    pub src_len: usize,
    /// Target length.
    #[arg(long, default_value_t = 16)]
    pub tgt_len: usize,
    /// New tokens for `generate`.
    #[arg(long, default_value_t = 10)]
    pub new_tokens: usize,
    /// `small` (mT5-small shape) or `large` (mt0-large shape).
    #[arg(long, default_value = "small")]
    pub model_preset: String,
    /// infer-merged and infer-unmerged: time the bare base model too, one step of each in
    /// turn, and report its median (`base_median_s`) and the median of the steps' paired
    /// ratios (`vs_base`): the adapter's cost against the base with the machine's drift
    /// between processes taken out.
    #[arg(long)]
    pub paired_base: bool,
}

/// The benchmark model's config.
pub fn bench_config(preset: &str) -> Result<T5Config> {
    let base = match preset {
        "small" => {
            let mut c = T5Config::preset_by_name("mt5-small").expect("preset");
            c.vocab_size = 32128;
            c
        }
        "large" => T5Config::preset_by_name("mt0-large").expect("preset"),
        other => bail!("unknown --model-preset {other:?} (small, large)"),
    };
    Ok(T5Config {
        dropout_rate: 0.1,
        // Generation runs exactly --new-tokens steps (transformers: min_new_tokens).
        eos_token_id: None,
        ..base
    })
}

/// Analytic matmul FLOPs of one forward pass, `(linear, attn, lora)`, exactly the formula of
/// `bench_torch.py` (one multiply-add = 2 FLOPs; elementwise work not counted).
pub fn matmul_flops(c: &T5Config, b: usize, s: usize, t: usize, r: usize) -> (f64, f64, f64) {
    let (d, h, k, f, v) = (
        c.d_model as f64,
        c.num_heads as f64,
        c.d_kv as f64,
        c.d_ff as f64,
        c.vocab_size as f64,
    );
    let (le, ld) = (c.num_layers as f64, c.decoder_layers() as f64);
    let i = h * k;
    let (b, s, t, r) = (b as f64, s as f64, t as f64, r as f64);
    let (ne, nd) = (b * s, b * t);
    let enc = 2.0 * ne * (4.0 * d * i) + 2.0 * ne * (3.0 * d * f);
    let dec = 2.0 * nd * (4.0 * d * i)
        + 2.0 * nd * (2.0 * d * i)
        + 2.0 * ne * (2.0 * d * i)
        + 2.0 * nd * (3.0 * d * f);
    let linear = le * enc + ld * dec + 2.0 * nd * d * v;
    let attn =
        le * 4.0 * b * h * s * s * k + ld * (4.0 * b * h * t * t * k + 4.0 * b * h * t * s * k);
    let lora = 2.0 * r * (d + i) * (le * 2.0 * ne + ld * (3.0 * nd + ne));
    (linear, attn, lora)
}

/// FLOPs of one step of `workload` (`None` for generation).
pub fn step_flops(workload: &str, (linear, attn, lora): (f64, f64, f64)) -> Option<f64> {
    Some(match workload {
        "lora-train" => 2.0 * linear + 3.0 * attn + 3.0 * lora,
        "full-train" => 3.0 * (linear + attn),
        "infer-base" | "infer-merged" => linear + attn,
        "infer-unmerged" => linear + attn + lora,
        _ => return None,
    })
}

/// Peak resident set size of this process (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn lora_config(real_adapter: bool) -> LoraConfig {
    LoraConfig {
        header: peft_core::PeftConfigHeader::default().with_task_type(Some(TaskType::Seq2SeqLm)),
        lora_dropout: 0.1,
        init_lora_weights: if real_adapter {
            InitLoraWeights::Random
        } else {
            InitLoraWeights::Default
        },
        ..LoraConfig::new(8, 32.0, TargetModules::list(["q", "v"]))
    }
}

/// Synthetic inputs: uniform ids in `[2, vocab)` from SplitMix64.
fn ids(seed: u64, rows: usize, cols: usize, vocab: usize) -> Vec<i64> {
    let mut rng = SplitMix(seed);
    (0..rows * cols)
        .map(|_| 2 + (rng.next_u64() % (vocab as u64 - 2)) as i64)
        .collect()
}

fn int2<B: Backend>(v: Vec<i64>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs one workload on autodiff backend `B` (inference workloads on its inner backend) and
/// returns the JSON object `bench_torch.py` prints.
pub fn run<B: AutodiffBackend>(
    a: &BenchArgs,
    device: &B::Device,
    device_name: &str,
) -> Result<Value> {
    if !WORKLOADS.contains(&a.workload.as_str()) {
        bail!(
            "unknown --workload {:?} ({})",
            a.workload,
            WORKLOADS.join(", ")
        );
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.paired_base && !matches!(a.workload.as_str(), "infer-merged" | "infer-unmerged") {
        bail!(
            "--paired-base times an adapter against the bare base: it takes --workload \
             infer-merged or infer-unmerged, not {:?}",
            a.workload
        );
    }
    let config = bench_config(&a.model_preset)?;
    B::seed(device, a.seed);
    peft_core::dropout::seed(a.seed);
    let v = config.vocab_size;
    let input = ids(a.seed, a.batch, a.src_len, v);
    let labels = ids(a.seed ^ 0x5eed, a.batch, a.tgt_len, v);
    // decoder inputs: the start token, then the labels shifted right.
    let mut dec = Vec::with_capacity(labels.len());
    for row in labels.chunks(a.tgt_len) {
        dec.push(config.decoder_start() as i64);
        dec.extend_from_slice(&row[..a.tgt_len - 1]);
    }
    let w = a.workload.as_str();
    let mut times = Vec::with_capacity(a.steps);
    // With --paired-base: the bare base's step times, one after each adapter step.
    let mut base_times = Vec::new();
    let (params, trainable);
    match w {
        "lora-train" | "full-train" => {
            let model = T5ForConditionalGeneration::<B>::new(&config, device)?;
            let x = int2::<B>(input, [a.batch, a.src_len], device);
            let y = int2::<B>(labels, [a.batch, a.tgt_len], device);
            let d = int2::<B>(dec, [a.batch, a.tgt_len], device);
            let lr = 1e-4;
            let mut optim = AdamWConfig::new().init();
            if w == "lora-train" {
                let mut peft = PeftModel::new(model, lora_config(false), "default")?;
                let counts = peft.parameter_counts();
                (params, trainable) = (counts.all, counts.trainable);
                for i in 0..a.warmup + a.steps {
                    let t0 = Instant::now();
                    let logits = peft.base_model.forward(x.clone(), None, d.clone()).logits;
                    let (loss, _) = masked_cross_entropy(logits, y.clone());
                    let grads = GradientsParams::from_grads(loss.backward(), &peft.base_model);
                    peft.base_model = optim.step(lr, peft.base_model, grads);
                    B::sync(device)?;
                    if i >= a.warmup {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
            } else {
                let mut model = model;
                params = peft_core::count_params::<B, _>(&model);
                trainable = params;
                for i in 0..a.warmup + a.steps {
                    let t0 = Instant::now();
                    let logits = model.forward(x.clone(), None, d.clone()).logits;
                    let (loss, _) = masked_cross_entropy(logits, y.clone());
                    let grads = GradientsParams::from_grads(loss.backward(), &model);
                    model = optim.step(lr, model, grads);
                    B::sync(device)?;
                    if i >= a.warmup {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
            }
        }
        _ => {
            type I<B> = <B as AutodiffBackend>::InnerBackend;
            let inner = device.clone();
            let base = T5ForConditionalGeneration::<B>::new(&config, device)?.valid();
            // The same weights (a module's clone shares its tensors; merging makes new ones).
            let bare = a.paired_base.then(|| base.clone());
            let model: T5ForConditionalGeneration<I<B>> = match w {
                "infer-base" => base,
                _ => {
                    let peft = PeftModel::new(base, lora_config(true), "default")?;
                    if w == "infer-merged" {
                        peft.merge_and_unload(true)?
                    } else {
                        peft.base_model
                    }
                }
            };
            params = peft_core::count_params::<I<B>, _>(&model);
            trainable = 0;
            if w == "generate" {
                // Repeated generation, as a server runs it: the decoder's weights packed
                // after the first steps (`peft_core::ops::DecodePack`; a one-shot `peft
                // generate` leaves them in place).
                model.visit_linears(&mut |_, l| l.decode_pack.on());
            }
            let x = int2::<I<B>>(input, [a.batch, a.src_len], &inner);
            let d = int2::<I<B>>(dec, [a.batch, a.tgt_len], &inner);
            let step = |model: &T5ForConditionalGeneration<I<B>>| -> Result<f64> {
                let t0 = Instant::now();
                if w == "generate" {
                    let out = model.generate_greedy(x.clone(), None, a.new_tokens);
                    assert!(out.iter().all(|r| r.len() == a.new_tokens + 1));
                } else {
                    let logits = model.forward(x.clone(), None, d.clone()).logits;
                    // As bench_torch.py: the logits computed (the sync below waits for a
                    // device) and their shape checked, not copied out (a 16 MB copy
                    // PyTorch's side does not make: 3% of an inference step).
                    assert_eq!(logits.dims(), [a.batch, a.tgt_len, v]);
                }
                I::<B>::sync(&inner)?;
                Ok(t0.elapsed().as_secs_f64())
            };
            for i in 0..a.warmup + a.steps {
                // With --paired-base, the two in turn, which one first alternating.
                let (t, tb) = match &bare {
                    Some(bare) if i % 2 == 1 => {
                        let tb = step(bare)?;
                        (step(&model)?, Some(tb))
                    }
                    Some(bare) => {
                        let t = step(&model)?;
                        (t, Some(step(bare)?))
                    }
                    None => (step(&model)?, None),
                };
                if i >= a.warmup {
                    times.push(t);
                    base_times.extend(tb);
                }
            }
        }
    }
    let step_s = times.clone();
    let mut ratios: Vec<f64> = times.iter().zip(&base_times).map(|(t, b)| t / b).collect();
    let med = median(&mut times);
    let tokens = if w == "generate" {
        a.batch * a.new_tokens
    } else {
        a.batch * (a.src_len + a.tgt_len)
    };
    let flops = step_flops(w, matmul_flops(&config, a.batch, a.src_len, a.tgt_len, 8));
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut out = json!({
        "workload": w,
        "impl": "peft",
        "median_s": med,
        "tokens_per_s": tokens as f64 / med,
        "peak_rss_mib": peak_rss_mib(),
        "steps": a.steps,
        "threads": threads,
        "device": device_name,
        "dtype": "f32",
        "params": params,
        "trainable_params": trainable,
        "flops_per_step": flops,
        "gflop_per_s": flops.map(|f| f / med / 1e9),
        "step_s": step_s,
        "warmup": a.warmup,
        "seed": a.seed,
        "model_preset": a.model_preset,
        "batch": a.batch,
        "src_len": a.src_len,
        "tgt_len": a.tgt_len,
        "new_tokens": (w == "generate").then_some(a.new_tokens),
        "versions": {"peft": env!("CARGO_PKG_VERSION"), "burn": "0.21.0"},
    });
    if !base_times.is_empty() {
        out["base_step_s"] = json!(base_times);
        out["base_median_s"] = json!(median(&mut base_times));
        out["vs_base"] = json!(median(&mut ratios));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The FLOP counts `bench_torch.py` reports for the standard workload (its formula was
    /// checked against `torch.utils.flop_counter`: exact for inference and full training).
    #[test]
    fn flops_equal_the_torch_scripts() {
        let c = bench_config("small").unwrap();
        let parts = matmul_flops(&c, 8, 128, 16, 8);
        assert_eq!(step_flops("lora-train", parts), Some(116_591_165_440.0));
        assert_eq!(step_flops("full-train", parts), Some(170_347_462_656.0));
        assert_eq!(step_flops("infer-base", parts), Some(56_782_487_552.0));
        assert_eq!(step_flops("infer-unmerged", parts), Some(57_178_849_280.0));
        assert_eq!(step_flops("generate", parts), None);
    }
}
