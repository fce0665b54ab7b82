//! # peft-core
//!
//! Parameter-efficient fine-tuning methods for [Burn](https://burn.dev) models, with the exact
//! semantics of Hugging Face PEFT, generic over models and backends.
//!
//! This crate owns:
//! - the adapter methods, one folder each under [`methods`] (`config`, `layer`, `model`):
//!   LoRA ([`lora`]), computed in activation space (`y = base(x) + B(A(dropout(x))) * scaling`,
//!   the base frozen); IA3 ([`ia3`], PEFT's learned scaling vectors); bottleneck adapters
//!   ([`bottleneck`], AdapterHub's Houlsby, Pfeiffer and every `BnConfig`, on sub-layer
//!   outputs);
//! - their configs ([`LoraConfig`], [`Ia3Config`] field for field PEFT's `adapter_config.json`
//!   with PEFT's shared [`PeftConfigHeader`]; [`BnConfig`], AdapterHub's; one
//!   [`AdapterConfig`] per adapter), and each adapter's tensors listed once ([`params`]);
//! - target matching ([`Targeting`], [`targeting`]), exactly as PEFT's
//!   `check_target_module_exists`;
//! - the model-facing contract ([`AdapterHost`]): a model yields its adaptable linear layers
//!   ([`AdaptedLinear`]) and sub-layer sites ([`SublayerAdapters`]) with their Hugging Face
//!   module paths, and everything else is generic; shared layers in [`nn`];
//! - training helpers with HF `Trainer` semantics ([`train`]): schedule, clipping, loss;
//! - the user-facing operations ([`PeftModel`]): add, activate, disable, delete, merge,
//!   unmerge, merge-and-unload, and PEFT's parameter counts.
//!
//! It knows no model architecture (that is `peft-models`) and reads or writes no file (that is
//! `peft-io`).
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use peft_core::{AdaptedLinear, AdapterHost, LoraConfig, PeftModel, TargetModules};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Tiny<B: burn::tensor::backend::Backend> {
//!     proj: AdaptedLinear<B>,
//! }
//!
//! impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
//!     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) {
//!         f("proj", &self.proj)
//!     }
//!     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) {
//!         f("proj", &mut self.proj)
//!     }
//! }
//!
//! let device = Default::default();
//! let model = Tiny::<NdArray> { proj: AdaptedLinear::new(16, 16, true, &device) };
//! let config = LoraConfig::new(4, 8.0, TargetModules::list(["proj"]));
//! let peft = PeftModel::new(model, config, "default").unwrap();
//! assert_eq!(
//!     peft.trainable_parameters_line(),
//!     "trainable params: 128 || all params: 400 || trainable%: 32.0000"
//! );
//! let x = Tensor::<NdArray, 2>::ones([2, 16], &device);
//! let _y = peft.base_model.proj.forward(x);
//! ```
#![deny(missing_docs)]

// Links the CBLAS symbols (`cblas_sgemm`, ...) that ndarray calls with its `blas` feature into
// every binary that uses this crate; see peft-gemm's docs.
use peft_gemm as _;

pub mod adapted_linear;
pub mod check;
pub mod config;
pub mod dropout;
mod error;
pub mod methods;
pub mod mixed;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
mod peft_model;
pub mod prompt_site;
pub mod site;
pub mod sublayer;
pub mod targeting;
pub mod train;

pub use adapted_linear::{AdaptedLinear, MergeBackup, SavedLinear, dora_weight_norm};
pub use config::{PeftConfigHeader, PeftType, TargetModules, TaskType};
pub use dropout::Dropout;
pub use error::{PeftError, Result};
pub use methods::bottleneck::{BnConfig, BottleneckAdapter};
pub use methods::ia3::{Ia3Adapter, Ia3Config};
pub use methods::loha::{LoHaConfig, LohaAdapter};
pub use methods::lokr::{LoKrConfig, LokrAdapter};
pub use methods::lora::{Bias, InitLoraWeights, LoraAdapter, LoraConfig, LoraSpec, lora_scaling};
pub use methods::prompt::{PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig};
pub use methods::{AdapterConfig, bottleneck, ia3, loha, lokr, lora, prompt};
pub use mixed::{BASE, BatchAdapters};
pub use params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};
pub use peft_model::{PROMPT_ENCODER, ParamCounts, PeftModel, count_params, thousands};
pub use prompt_site::{PromptGeometry, PromptSite};
pub use site::{AdapterHost, SublayerKind, SublayerSite, join_path};
pub use sublayer::SublayerAdapters;
pub use targeting::Targeting;
