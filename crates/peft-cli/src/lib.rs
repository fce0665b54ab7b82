//! The `peft` command-line tool's library: its argument types, the mapping of `peft train`'s
//! flags onto `peft_train` with its progress display, and the loss plot, usable from tests.
//! (The benchmark workloads of `peft bench` live in the binary, not here: xtask runs them.)

pub mod launch;
pub mod plot;
pub mod train;

/// The memory this machine has available now (`MemAvailable` of `/proc/meminfo`), in bytes;
/// `None` where that is not known.
pub fn available_memory() -> Option<u128> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u128>().ok())
        .map(|kib| kib * 1024)
}

/// Refuses work that needs `need` bytes when less memory than that is available, before
/// anything is allocated: the error gives both numbers, what needs them (`what`) and what to
/// lower (`advice`).
pub fn ensure_memory(need: u128, what: &str, advice: &str) -> Result<()> {
    const GIB: f64 = (1u64 << 30) as f64;
    if let Some(avail) = available_memory()
        && need > avail
    {
        anyhow::bail!(
            "{what} needs about {:.1} GiB but only {:.1} GiB of memory is available; {advice}",
            need as f64 / GIB,
            avail as f64 / GIB
        );
    }
    Ok(())
}

use anyhow::{Context, Result};
use clap::Args;
use peft_core::bottleneck::ReductionFactor;
use peft_core::config::{LayersToTransform, TargetModules};
use peft_core::{
    AdapterConfig, Bias, BnConfig, Ia3Config, InitLoraWeights, LoraConfig, PeftConfigHeader,
    TaskType,
};

/// Adapter options, named as PEFT's `LoraConfig` / `IA3Config` fields and AdapterHub's
/// `BnConfig` fields; `--method` picks the method.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// Adapter method: lora, dora, loha, lokr, ia3, prompt_tuning, p_tuning, prefix_tuning
    /// (PEFT), houlsby, pfeiffer (AdapterHub bottleneck adapters).
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// Bottleneck adapters: hidden size / bottleneck size.
    #[arg(long, default_value_t = 16.0)]
    pub reduction_factor: f64,
    /// Bottleneck adapters: activation (default: the preset's, swish for houlsby, relu for
    /// pfeiffer).
    #[arg(long)]
    pub non_linearity: Option<String>,
    /// Bottleneck adapters: layer indices left without adapters, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub leave_out: Option<Vec<usize>>,
    /// IA3: targets whose input is scaled, comma separated (default: PEFT's for the model).
    #[arg(long, value_delimiter = ',')]
    pub feedforward_modules: Option<Vec<String>>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 8.0)]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Target modules, comma separated (default: PEFT's for the model type); `all-linear`.
    #[arg(long, value_delimiter = ',')]
    pub target_modules: Option<Vec<String>>,
    /// Target modules as one regular expression (full match), instead of a list.
    #[arg(long, conflicts_with = "target_modules")]
    pub target_regex: Option<String>,
    /// Modules never adapted, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub exclude_modules: Option<Vec<String>>,
    /// Only these layer indices, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub layers_to_transform: Option<Vec<usize>>,
    /// Extra modules trained and saved in full, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub modules_to_save: Option<Vec<String>>,
    /// rsLoRA scaling alpha / sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA): a trainable magnitude per output; `--method dora` is
    /// `--method lora --use-dora`.
    #[arg(long)]
    pub use_dora: bool,
    /// LoRA init: true (PEFT's default), false, gaussian, pissa, pissa_niter_N, olora,
    /// orthogonal. PiSSA and OLoRA change the base weights while training; the adapter `peft
    /// train` writes at the end is converted to a plain LoRA of the original base (twice the
    /// rank), as PEFT's `path_initial_model_for_weight_conversion`.
    #[arg(long, default_value = "true")]
    pub init_lora_weights: String,
    /// Which biases train: none, all, lora_only.
    #[arg(long, default_value = "none")]
    pub bias: String,
    /// Prompt learning: virtual tokens.
    #[arg(long, default_value_t = 20)]
    pub num_virtual_tokens: usize,
    /// Prompt tuning: RANDOM, TEXT (the word embeddings of --prompt-tuning-init-text) or
    /// SAMPLE_VOCAB.
    #[arg(long, default_value = "RANDOM")]
    pub prompt_tuning_init: String,
    /// Prompt tuning: the text of TEXT init.
    #[arg(long)]
    pub prompt_tuning_init_text: Option<String>,
    /// P-tuning: the prompt encoder, MLP or LSTM.
    #[arg(long, default_value = "MLP")]
    pub encoder_reparameterization_type: String,
    /// P-tuning and prefix tuning: the encoder's hidden size (default: the model's).
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// P-tuning: LSTM layers.
    #[arg(long, default_value_t = 2)]
    pub encoder_num_layers: usize,
    /// P-tuning: dropout between LSTM layers.
    #[arg(long, default_value_t = 0.0)]
    pub encoder_dropout: f64,
    /// Prefix tuning: train the prefix through a two-layer projection.
    #[arg(long)]
    pub prefix_projection: bool,
    /// Task type: SEQ_2_SEQ_LM, SEQ_CLS, FEATURE_EXTRACTION (PEFT's default: none; `peft train`
    /// defaults to SEQ_2_SEQ_LM).
    #[arg(long)]
    pub task_type: Option<String>,
}

impl AdapterArgs {
    /// The task type given, if any.
    pub fn task(&self) -> Result<Option<TaskType>> {
        Ok(self.config()?.header.task_type)
    }

    /// The adapter config these options describe, for `--method`.
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let lora = self.config()?;
        match self.method.to_ascii_lowercase().as_str() {
            "lora" => Ok(AdapterConfig::Lora(lora)),
            "dora" => Ok(AdapterConfig::Lora(LoraConfig {
                use_dora: true,
                ..lora
            })),
            m @ ("loha" | "lokr") => {
                // The LyCORIS methods take the LoRA flags they share (`--lora-r` is `r`,
                // `--lora-alpha` is `alpha`).
                let common = peft_core::methods::lycoris::LycorisCommon {
                    r: lora.r,
                    alpha: lora.lora_alpha,
                    target_modules: lora.target_modules,
                    exclude_modules: lora.exclude_modules,
                    layers_to_transform: lora.layers_to_transform,
                    layers_pattern: lora.layers_pattern,
                    modules_to_save: lora.modules_to_save,
                    ..Default::default()
                };
                let task = lora.header.task_type;
                Ok(if m == "loha" {
                    AdapterConfig::LoHa(peft_core::LoHaConfig {
                        common,
                        header: PeftConfigHeader::default().with_task_type(task),
                        ..Default::default()
                    })
                } else {
                    AdapterConfig::LoKr(peft_core::LoKrConfig {
                        common,
                        header: PeftConfigHeader::default().with_task_type(task),
                        ..Default::default()
                    })
                })
            }
            "ia3" => Ok(AdapterConfig::Ia3(Ia3Config {
                header: PeftConfigHeader::default().with_task_type(lora.header.task_type),
                target_modules: lora.target_modules,
                exclude_modules: lora.exclude_modules,
                feedforward_modules: self.feedforward_modules.clone().map(TargetModules::List),
                modules_to_save: lora.modules_to_save,
                ..Default::default()
            })),
            m @ ("houlsby" | "pfeiffer" | "double_seq_bn" | "seq_bn") => {
                let mut c = BnConfig::preset(m).expect("listed presets");
                c.reduction_factor = ReductionFactor::One(self.reduction_factor);
                if let Some(nl) = &self.non_linearity {
                    c.non_linearity = nl.clone();
                }
                if let Some(l) = &self.leave_out {
                    c.leave_out = l.clone();
                }
                c.validate()?;
                Ok(AdapterConfig::Bottleneck(c))
            }
            "prompt_tuning" => {
                let mut c = peft_core::PromptTuningConfig::new(self.num_virtual_tokens);
                c.header = PeftConfigHeader::default().with_task_type(lora.header.task_type);
                c.common.modules_to_save = lora.modules_to_save;
                c.prompt_tuning_init = serde_json::from_value(serde_json::Value::String(
                    self.prompt_tuning_init.to_ascii_uppercase(),
                ))
                .with_context(|| {
                    format!(
                        "--prompt-tuning-init {:?}: expected RANDOM, TEXT or SAMPLE_VOCAB",
                        self.prompt_tuning_init
                    )
                })?;
                c.prompt_tuning_init_text = self.prompt_tuning_init_text.clone();
                Ok(AdapterConfig::PromptTuning(c))
            }
            "p_tuning" => {
                let mut c = peft_core::PromptEncoderConfig::new(self.num_virtual_tokens);
                c.header = PeftConfigHeader::default().with_task_type(lora.header.task_type);
                c.common.modules_to_save = lora.modules_to_save;
                c.encoder_reparameterization_type =
                    serde_json::from_value(serde_json::Value::String(
                        self.encoder_reparameterization_type.to_ascii_uppercase(),
                    ))
                    .with_context(|| {
                        format!(
                            "--encoder-reparameterization-type {:?}: expected MLP or LSTM",
                            self.encoder_reparameterization_type
                        )
                    })?;
                c.encoder_hidden_size = self.encoder_hidden_size;
                c.encoder_num_layers = self.encoder_num_layers;
                c.encoder_dropout = self.encoder_dropout;
                c.validate()?;
                Ok(AdapterConfig::PTuning(c))
            }
            "prefix_tuning" => {
                let mut c = peft_core::PrefixTuningConfig::new(self.num_virtual_tokens);
                c.header = PeftConfigHeader::default().with_task_type(lora.header.task_type);
                c.common.modules_to_save = lora.modules_to_save;
                c.encoder_hidden_size = self.encoder_hidden_size;
                c.prefix_projection = self.prefix_projection;
                c.validate()?;
                Ok(AdapterConfig::PrefixTuning(c))
            }
            other => {
                anyhow::bail!(
                    "unknown --method {other:?} (lora, dora, loha, lokr, ia3, prompt_tuning, \
                     p_tuning, prefix_tuning, houlsby, pfeiffer)"
                )
            }
        }
    }

    /// The `LoraConfig` these options describe.
    pub fn config(&self) -> Result<LoraConfig> {
        let task_type: Option<TaskType> = match &self.task_type {
            Some(t) => Some(
                serde_json::from_value(serde_json::Value::String(t.clone()))
                    .with_context(|| format!("unknown task type {t:?}"))?,
            ),
            None => None,
        };
        let bias: Bias = serde_json::from_value(serde_json::Value::String(self.bias.clone()))
            .with_context(|| format!("unknown bias {:?} (none, all, lora_only)", self.bias))?;
        let target_modules = match (&self.target_modules, &self.target_regex) {
            (_, Some(re)) => Some(TargetModules::Regex(re.clone())),
            (Some(l), None) if l.len() == 1 && l[0].eq_ignore_ascii_case("all-linear") => {
                Some(TargetModules::Regex(l[0].clone()))
            }
            (Some(l), None) => Some(TargetModules::List(l.clone())),
            (None, None) => None,
        };
        if !(0.0..1.0).contains(&self.lora_dropout) {
            anyhow::bail!(
                "--lora-dropout must be in [0, 1), found {}",
                self.lora_dropout
            );
        }
        if !self.lora_alpha.is_finite() {
            anyhow::bail!(
                "--lora-alpha must be a finite number, found {}",
                self.lora_alpha
            );
        }
        Ok(LoraConfig {
            header: PeftConfigHeader::default().with_task_type(task_type),
            r: self.lora_r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules,
            exclude_modules: self.exclude_modules.clone().map(TargetModules::List),
            layers_to_transform: self
                .layers_to_transform
                .clone()
                .map(LayersToTransform::Many),
            modules_to_save: self.modules_to_save.clone(),
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            bias,
            init_lora_weights: match self.init_lora_weights.to_ascii_lowercase().as_str() {
                "true" => InitLoraWeights::Default,
                "false" => InitLoraWeights::Random,
                "gaussian" => InitLoraWeights::Gaussian,
                _ => InitLoraWeights::Other(self.init_lora_weights.clone()),
            },
            ..Default::default()
        })
    }
}
