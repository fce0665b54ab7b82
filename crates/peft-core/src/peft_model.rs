//! `PeftModel`: a base model with named LoRA adapters, PEFT's user-facing operations.

use std::collections::HashSet;
use std::marker::PhantomData;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::config::{Bias, LoraConfig, TaskType};
use crate::error::{PeftError, Result};
use crate::lora::{AdaptedLinear, LoraAdapter, LoraSpec};
use crate::site::AdapterHost;
use crate::targeting::{ModelLinears, resolve_targets};

/// Parameter counts as PEFT's `get_nb_trainable_parameters` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// Parameters that receive gradients.
    pub trainable: usize,
    /// All parameters, adapters included, tied weights counted once.
    pub all: usize,
}

impl ParamCounts {
    /// `100 * trainable / all`.
    pub fn trainable_percent(&self) -> f64 {
        if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        }
    }

    /// PEFT's `print_trainable_parameters` line, with thousands separators and 4 decimals:
    /// `trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915`.
    pub fn line(&self) -> String {
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(self.trainable),
            thousands(self.all),
            self.trainable_percent()
        )
    }
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Counts every float parameter of a module once (shared parameters, such as tied embeddings,
/// count once), without materialising lazily initialised ones.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> usize {
    struct Counter {
        seen: HashSet<ParamId>,
        total: usize,
    }
    impl<B: Backend> ModuleVisitor<B> for Counter {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.seen.insert(param.id) {
                self.total += param.lazy_shape().num_elements();
            }
        }
    }
    let mut c = Counter {
        seen: HashSet::new(),
        total: 0,
    };
    module.visit(&mut c);
    c.total
}

/// Visits the parameters whose field name is `bias`, outside adapter internals.
struct BiasVisitor {
    stack: Vec<String>,
    seen: HashSet<ParamId>,
    total: usize,
}

impl BiasVisitor {
    fn is_base_bias(&self) -> bool {
        self.stack.last().is_some_and(|n| n == "bias")
            && !self
                .stack
                .iter()
                .any(|n| n == "lora" || n == "saved" || n == "backup")
    }
}

impl<B: Backend> ModuleVisitor<B> for BiasVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.is_base_bias() && self.seen.insert(param.id) {
            self.total += param.lazy_shape().num_elements();
        }
    }
}

/// Turns gradients off for every parameter without materialising lazy ones (burn's
/// `Module::no_grad` initialises them).
struct Freeze;

impl<B: Backend> ModuleMapper<B> for Freeze {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.set_require_grad(false)
    }
}

/// Sets `require_grad` on every base `bias` parameter (PEFT's `bias = "all"`).
struct BiasTrainable {
    stack: Vec<String>,
    trainable: bool,
}

impl<B: Backend> ModuleMapper<B> for BiasTrainable {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let is_bias = self.stack.last().is_some_and(|n| n == "bias")
            && !self
                .stack
                .iter()
                .any(|n| n == "lora" || n == "saved" || n == "backup");
        if is_bias {
            param.set_require_grad(self.trainable)
        } else {
            param
        }
    }
}

fn set_grad<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, on: bool) {
    *p = p.clone().set_require_grad(on);
}

fn set_adapter_grad<B: Backend>(a: &mut LoraAdapter<B>, on: bool) {
    set_grad(&mut a.lora_a, on);
    set_grad(&mut a.lora_b, on);
    if let Some(b) = a.lora_bias.as_mut() {
        set_grad(b, on);
    }
}

/// A base model with LoRA adapters, as PEFT's `PeftModel` / `LoraModel`.
///
/// The base is frozen by construction: [`PeftModel::new`] turns off gradients for every base
/// parameter, and only the active adapters' parameters (and their `modules_to_save` copies)
/// require gradients.
#[derive(Debug)]
pub struct PeftModel<B: Backend, M: AdapterHost<B>> {
    /// The model, with adapters attached to its layers. Train and run this.
    pub base_model: M,
    configs: Vec<(String, LoraConfig)>,
    targeted: Vec<(String, Vec<String>)>,
    active: Vec<String>,
    disabled: bool,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: AdapterHost<B>> PeftModel<B, M> {
    /// PEFT's `get_peft_model`: freezes the base, attaches adapter `adapter_name` as `config`
    /// says, and makes it active.
    pub fn new(model: M, config: LoraConfig, adapter_name: &str) -> Result<Self> {
        let mut this = PeftModel {
            base_model: model.map(&mut Freeze),
            configs: Vec::new(),
            targeted: Vec::new(),
            active: Vec::new(),
            disabled: false,
            _backend: PhantomData,
        };
        this.add_adapter(adapter_name, config)?;
        this.set_adapter(&[adapter_name])?;
        Ok(this)
    }

    /// The adapter names, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Option<&LoraConfig> {
        self.configs.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// The layer paths adapter `name` attached LoRA to.
    pub fn targeted_modules(&self, name: &str) -> &[String] {
        self.targeted
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_slice())
            .unwrap_or(&[])
    }

    fn not_found(&self, name: &str) -> PeftError {
        PeftError::AdapterNotFound {
            name: name.to_string(),
            existing: self.adapter_names().join(", "),
        }
    }

    fn is_merged(&self) -> bool {
        let mut merged = false;
        self.base_model
            .visit_linears(&mut |_, l| merged |= !l.merged.is_empty());
        merged
    }

    /// Adds adapter `name` (inactive until [`set_adapter`](Self::set_adapter)).
    ///
    /// As in PEFT, for `SEQ_CLS` and `TOKEN_CLS` the head names `classifier` and `score` are
    /// appended to `modules_to_save`, so the head is trained and saved with the adapter.
    pub fn add_adapter(&mut self, name: &str, mut config: LoraConfig) -> Result<()> {
        if matches!(
            config.task_type,
            Some(TaskType::SeqCls | TaskType::TokenCls)
        ) {
            let heads = ["classifier", "score"].map(String::from);
            config
                .modules_to_save
                .get_or_insert_with(Vec::new)
                .extend(heads);
        }
        if self.config(name).is_some() {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        if self.is_merged() {
            return Err(PeftError::Merged("add an adapter"));
        }
        let linears = self.base_model.linear_paths();
        let heads = self.base_model.output_heads(config.task_type);
        let model = ModelLinears {
            linears: &linears,
            model_type: self.base_model.model_type(),
            output_heads: &heads,
        };
        let targets = resolve_targets(&config, &model)?;
        let mut specs = Vec::with_capacity(targets.len());
        for path in &targets {
            specs.push(LoraSpec {
                r: config.rank_for(path)?,
                alpha: config.alpha_for(path)?,
                dropout: config.lora_dropout,
                use_rslora: config.use_rslora,
                init: config.init_lora_weights.clone(),
                lora_bias: config.lora_bias,
            });
        }
        let mut to_save = Vec::new();
        if let Some(mts) = config.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
            // PEFT's `_set_trainable`: a plain suffix match; names matching nothing are ignored.
            for path in &linears {
                if mts.iter().any(|m| path.ends_with(m.as_str())) {
                    to_save.push(path.clone());
                }
            }
        }
        let mut result = Ok(());
        self.base_model.visit_linears_mut(&mut |path, layer| {
            if result.is_err() {
                return;
            }
            if let Some(i) = targets.iter().position(|t| t == path) {
                let device = layer.weight.lazy_device();
                let adapter =
                    LoraAdapter::new(name, layer.d_input(), layer.d_output(), &specs[i], &device);
                result = layer.add_lora(adapter);
            } else if to_save.iter().any(|t| t == path) {
                result = layer.add_saved_copy(name);
            }
        });
        result?;
        self.configs.push((name.to_string(), config));
        self.targeted.push((name.to_string(), targets));
        // Re-apply the active set so the new adapter starts frozen unless active.
        let active = self.active.clone();
        self.apply_active(&active);
        Ok(())
    }

    fn apply_active(&mut self, active: &[String]) {
        let trainable: Vec<String> = active
            .iter()
            .filter(|n| self.config(n).is_some_and(|c| !c.inference_mode))
            .cloned()
            .collect();
        let bias_all = trainable
            .iter()
            .any(|n| self.config(n).is_some_and(|c| c.bias == Bias::All));
        let lora_only: Vec<String> = trainable
            .iter()
            .filter(|n| self.config(n).is_some_and(|c| c.bias == Bias::LoraOnly))
            .cloned()
            .collect();
        let disabled = self.disabled;
        self.base_model.visit_linears_mut(&mut |_, layer| {
            layer.set_active(active);
            layer.disabled = disabled;
            for a in layer.lora.iter_mut() {
                let on = trainable.contains(&a.name);
                set_adapter_grad(a, on);
            }
            for s in layer.saved.iter_mut() {
                let on = trainable.contains(&s.name);
                set_grad(&mut s.weight, on);
                if let Some(b) = s.bias.as_mut() {
                    set_grad(b, on);
                }
            }
            if !bias_all {
                let on = layer.lora.iter().any(|a| lora_only.contains(&a.name));
                if let Some(b) = layer.bias.as_mut() {
                    set_grad(b, on);
                }
            }
        });
        if bias_all {
            let model = self.base_model.clone();
            self.base_model = model.map(&mut BiasTrainable {
                stack: Vec::new(),
                trainable: true,
            });
        }
        self.active = active.to_vec();
    }

    /// Makes `names` the active adapters (their outputs are summed); others are frozen.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.config(n).is_none() {
                return Err(self.not_found(n));
            }
        }
        if self.is_merged() {
            return Err(PeftError::Merged("change the active adapters"));
        }
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        self.apply_active(&names);
        Ok(())
    }

    /// Turns every adapter off: outputs equal the base model's exactly. Merged adapters are
    /// unmerged first, as PEFT does.
    pub fn disable_adapters(&mut self) {
        self.unmerge_adapter();
        self.disabled = true;
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.disabled = true);
    }

    /// Turns the active adapters back on.
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.disabled = false);
    }

    /// Whether adapters are disabled.
    pub fn adapters_disabled(&self) -> bool {
        self.disabled
    }

    /// Removes adapter `name` everywhere. Refused while adapters are merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.config(name).is_none() {
            return Err(self.not_found(name));
        }
        if self.is_merged() {
            return Err(PeftError::Merged("delete an adapter"));
        }
        let mut result = Ok(());
        self.base_model.visit_linears_mut(&mut |_, layer| {
            if result.is_ok() {
                result = layer.delete(name);
            }
        });
        result?;
        self.configs.retain(|(n, _)| n != name);
        self.targeted.retain(|(n, _)| n != name);
        let active: Vec<String> = self.active.iter().filter(|n| *n != name).cloned().collect();
        self.apply_active(&active);
        Ok(())
    }

    /// Folds adapters into the base weights (default: the active ones). With `safe`, a merge that
    /// would produce NaN/Inf is refused and the model is left as it was.
    pub fn merge_adapter(&mut self, names: Option<&[&str]>, safe: bool) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => {
                for a in n {
                    if self.config(a).is_none() {
                        return Err(self.not_found(a));
                    }
                }
                n.iter().map(|s| s.to_string()).collect()
            }
            None => self.active.clone(),
        };
        if safe {
            // Check every layer before touching any, so a failure leaves the model unchanged.
            let mut probe = self.base_model.clone();
            let mut result = Ok(());
            probe.visit_linears_mut(&mut |path, layer| {
                if result.is_ok() {
                    result = layer.merge(path, Some(&names), true);
                }
            });
            result?;
            self.base_model = probe;
            return Ok(());
        }
        let mut result = Ok(());
        self.base_model.visit_linears_mut(&mut |path, layer| {
            if result.is_ok() {
                result = layer.merge(path, Some(&names), false);
            }
        });
        result
    }

    /// Restores the unmerged base weights exactly.
    pub fn unmerge_adapter(&mut self) {
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.unmerge());
    }

    /// PEFT's `merge_and_unload`: merges the active adapters and returns the plain model.
    pub fn merge_and_unload(mut self, safe: bool) -> Result<M> {
        self.merge_adapter(None, safe)?;
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.unload(true));
        Ok(self.base_model)
    }

    /// PEFT's `unload`: drops every adapter and returns the original model.
    pub fn unload(mut self) -> M {
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.unload(false));
        self.base_model
    }

    /// Trainable and total parameter counts, as PEFT computes them after `get_peft_model`:
    /// all = every parameter once (adapters and `modules_to_save` copies included);
    /// trainable = the active adapters' parameters, their copies, and the biases `bias` frees.
    pub fn parameter_counts(&self) -> ParamCounts {
        let all = count_params::<B, M>(&self.base_model);
        let trainable_names: Vec<String> = self
            .active
            .iter()
            .filter(|n| self.config(n).is_some_and(|c| !c.inference_mode))
            .cloned()
            .collect();
        let bias_all = trainable_names
            .iter()
            .any(|n| self.config(n).is_some_and(|c| c.bias == Bias::All));
        let mut trainable = 0;
        self.base_model
            .visit_linears(&mut |_, layer: &AdaptedLinear<B>| {
                for a in &layer.lora {
                    if trainable_names.contains(&a.name) {
                        trainable += a.num_params();
                    }
                }
                for s in &layer.saved {
                    if trainable_names.contains(&s.name) {
                        trainable += s.weight.lazy_shape().num_elements()
                            + s.bias.as_ref().map_or(0, |b| b.lazy_shape().num_elements());
                    }
                }
                let lora_only = layer.lora.iter().any(|a| {
                    trainable_names.contains(&a.name)
                        && self
                            .config(&a.name)
                            .is_some_and(|c| c.bias == Bias::LoraOnly)
                });
                if lora_only
                    && !bias_all
                    && let Some(b) = &layer.bias
                {
                    trainable += b.lazy_shape().num_elements();
                }
            });
        if bias_all {
            let mut v = BiasVisitor {
                stack: Vec::new(),
                seen: HashSet::new(),
                total: 0,
            };
            self.base_model.visit(&mut v);
            trainable += v.total;
        }
        ParamCounts { trainable, all }
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_parameters_line(&self) -> String {
        self.parameter_counts().line()
    }
}
