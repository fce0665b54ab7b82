//! `peft merge-adapters`: PEFT's `add_weighted_adapter` on adapter directories, no base model
//! needed.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;
use peft_core::methods::lora::weighted::{CombinationType, MajoritySignMethod, WeightedMerge};

/// Arguments of `peft merge-adapters`.
#[derive(Args, Debug)]
pub struct MergeAdaptersArgs {
    /// A LoRA adapter directory; give two or more, in the order of `--weights`.
    #[arg(long = "adapter", required = true)]
    pub adapters: Vec<PathBuf>,
    /// One weight per adapter, comma-separated (negative weights subtract); 1 each by default.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Vec<f64>,
    /// svd, linear, cat, ties, ties_svd, dare_ties, dare_linear, dare_ties_svd,
    /// dare_linear_svd, magnitude_prune or magnitude_prune_svd (PEFT's default: svd).
    #[arg(long = "combination-type", default_value = "svd")]
    pub combination_type: String,
    /// Rank of the svd types' result (default: the largest input rank).
    #[arg(long = "svd-rank")]
    pub svd_rank: Option<usize>,
    /// Clamp the svd types' factors at this quantile of their values.
    #[arg(long = "svd-clamp")]
    pub svd_clamp: Option<f64>,
    /// Share of values the pruning types keep, in [0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// TIES' sign election: total or frequency.
    #[arg(long = "majority-sign-method", default_value = "total")]
    pub majority_sign_method: String,
    /// Seed of DARE's random pruning.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an adapter already in --out.
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `peft merge-adapters`.
pub fn run(args: &MergeAdaptersArgs) -> Result<()> {
    let merge = WeightedMerge {
        combination_type: args.combination_type.parse::<CombinationType>()?,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        density: args.density,
        majority_sign_method: args.majority_sign_method.parse::<MajoritySignMethod>()?,
        seed: args.seed,
    };
    let weights = if args.weights.is_empty() {
        vec![1.0; args.adapters.len()]
    } else {
        args.weights.clone()
    };
    if weights.len() != args.adapters.len() {
        bail!(
            "--weights has {} values for {} --adapter directories",
            weights.len(),
            args.adapters.len()
        );
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        bail!("--weights: {w} is not a finite number");
    }
    let out_abs = crate::absolute(&args.out)?;
    for a in &args.adapters {
        let a_abs = crate::absolute(a)?;
        if out_abs == a_abs || out_abs.starts_with(&a_abs) {
            bail!(
                "--out {} is the input adapter {} (or inside it): choose another directory",
                args.out.display(),
                a.display()
            );
        }
    }
    if !args.overwrite && args.out.join(peft_io::adapter::ADAPTER_CONFIG).exists() {
        bail!(
            "--out {} already holds an adapter (adapter_config.json); choose another directory, or \
             pass --overwrite to replace it",
            args.out.display()
        );
    }
    let dirs: Vec<&Path> = args.adapters.iter().map(PathBuf::as_path).collect();
    let merged = peft_io::weighted::merge_adapter_dirs(&dirs, &weights, &merge)?;
    // Written aside, then swapped in: a failure leaves --out as it was.
    let staging = crate::staging_dir(&args.out);
    if let Err(e) = peft_io::weighted::save_lora_adapter(&staging, &merged.config, &merged.tensors)
    {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    crate::swap_in(&staging, &args.out)?;
    println!(
        "{} of {} adapters ({}) -> {}: rank {}, {} sites",
        merge.effective_type(args.adapters.len()),
        args.adapters.len(),
        weights
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        args.out.display(),
        merged.config.r,
        merged.sites.len()
    );
    Ok(())
}
