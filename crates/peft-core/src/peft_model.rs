//! `PeftModel`: a base model with named adapters, PEFT's user-facing operations, and the
//! machinery every linear method shares (PEFT's `BaseTuner`).

use std::collections::HashSet;
use std::marker::PhantomData;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::adapted_linear::AdaptedLinear;
use crate::error::{PeftError, Result};
use crate::methods::lora::{Bias, LoraConfig};
use crate::methods::{AdapterConfig, bottleneck, ia3, lora};
use crate::params::{AdapterParams, NamedParam, ParamMut, ParamRef};
use crate::site::AdapterHost;
use crate::sublayer::SublayerAdapters;
use crate::targeting::{ModelLinears, Targeting, resolve_targets};

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

/// Whether the parameter at module path `stack` is a base model `bias`: its field name is `bias`
/// and it is not inside an adapter (`lora`, bottleneck `adapters`), a `modules_to_save` copy
/// (`modules_to_save`) or a merge backup.
fn is_base_bias(stack: &[String]) -> bool {
    stack.last().is_some_and(|n| n == "bias")
        && !stack
            .iter()
            .any(|n| n == "lora" || n == "modules_to_save" || n == "backup" || n == "adapters")
}

/// Visits the parameters whose field name is `bias`, outside adapter internals.
struct BiasVisitor {
    stack: Vec<String>,
    seen: HashSet<ParamId>,
    total: usize,
}

impl<B: Backend> ModuleVisitor<B> for BiasVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if is_base_bias(&self.stack) && self.seen.insert(param.id) {
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
        if is_base_bias(&self.stack) {
            param.set_require_grad(self.trainable)
        } else {
            param
        }
    }
}

/// Attaches a linear method to every layer `targeting` selects (via `attach`) and trainable
/// copies to its `modules_to_save`; returns the targeted paths. On error nothing is left.
pub(crate) fn attach_linear<B: Backend, M: AdapterHost<B>>(
    host: &mut M,
    name: &str,
    targeting: &Targeting,
    mut attach: impl FnMut(&mut AdaptedLinear<B>, &str, &B::Device) -> Result<()>,
) -> Result<Vec<String>> {
    let linears = host.linear_paths();
    let heads = host.output_heads(targeting.task_type);
    let model = ModelLinears {
        linears: &linears,
        model_type: host.model_type(),
        output_heads: &heads,
    };
    let targets = resolve_targets(targeting, &model)?;
    let mut to_save = Vec::new();
    if let Some(mts) = targeting.modules_to_save.as_ref().filter(|m| !m.is_empty()) {
        // PEFT's `_set_trainable`: a plain suffix match; names matching nothing are ignored.
        for path in &linears {
            if mts.iter().any(|m| path.ends_with(m.as_str())) {
                to_save.push(path.clone());
            }
        }
    }
    let mut result = Ok(());
    host.visit_linears_mut(&mut |path, layer| {
        if result.is_err() {
            return;
        }
        if targets.iter().any(|t| t == path) {
            let device = layer.weight.lazy_device();
            result = attach(layer, path, &device);
        } else if to_save.iter().any(|t| t == path) {
            result = layer.add_saved_copy(name);
        }
    });
    if let Err(e) = result {
        host.visit_linears_mut(&mut |_, layer| {
            let _ = layer.delete(name);
        });
        return Err(e);
    }
    Ok(targets)
}

/// The site path prompt adapters' tensors are listed under (PEFT's `prompt_encoder.<name>`).
pub const PROMPT_ENCODER: &str = "prompt_encoder";

/// A base model with named adapters (LoRA, IA3, bottleneck), as PEFT's `PeftModel` /
/// `LoraModel` and AdapterHub's model mixin.
///
/// The base is frozen by construction: [`PeftModel::new`] turns off gradients for every base
/// parameter, and only the active adapters' parameters (and their `modules_to_save` copies)
/// require gradients.
#[derive(Debug)]
pub struct PeftModel<B: Backend, M: AdapterHost<B>> {
    /// The model, with adapters attached to its layers. Train and run this.
    pub base_model: M,
    configs: Vec<(String, AdapterConfig)>,
    frozen: Vec<String>,
    targeted: Vec<(String, Vec<String>)>,
    active: Vec<String>,
    disabled: bool,
    _backend: PhantomData<B>,
}

impl<B: Backend, M: AdapterHost<B>> PeftModel<B, M> {
    /// PEFT's `get_peft_model`: freezes the base, attaches adapter `adapter_name` as `config`
    /// says, and makes it active.
    ///
    /// ```
    /// # use burn::backend::NdArray;
    /// # use peft_core::{AdaptedLinear, AdapterHost};
    /// # #[derive(burn::module::Module, Debug)]
    /// # struct Tiny<B: burn::tensor::backend::Backend> { proj: AdaptedLinear<B> }
    /// # impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
    /// #     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) { f("proj", &self.proj) }
    /// #     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) { f("proj", &mut self.proj) }
    /// # }
    /// # let device = Default::default();
    /// use peft_core::{LoraConfig, PeftModel, TargetModules};
    /// let model = Tiny::<NdArray> { proj: AdaptedLinear::new(16, 16, true, &device) };
    /// let config = LoraConfig::new(4, 8.0, TargetModules::list(["proj"]));
    /// let peft = PeftModel::new(model, config, "default").unwrap();
    /// assert_eq!(peft.targeted_modules("default"), ["proj"]);
    /// assert_eq!(peft.parameter_counts().trainable, 4 * 16 + 4 * 16);
    /// ```
    pub fn new(model: M, config: impl Into<AdapterConfig>, adapter_name: &str) -> Result<Self> {
        let mut this = Self::without_adapters(model);
        this.add_adapter(adapter_name, config)?;
        this.set_adapter(&[adapter_name])?;
        Ok(this)
    }

    /// The base model frozen, with no adapter yet (add them with
    /// [`add_adapter`](Self::add_adapter) or `peft_io::load_adapter`): a server that loads
    /// adapters at run time starts here.
    pub fn without_adapters(model: M) -> Self {
        PeftModel {
            base_model: model.map(&mut Freeze),
            configs: Vec::new(),
            frozen: Vec::new(),
            targeted: Vec::new(),
            active: Vec::new(),
            disabled: false,
            _backend: PhantomData,
        }
    }

    /// The adapter names, in the order they were added.
    pub fn adapter_names(&self) -> Vec<String> {
        self.configs.iter().map(|(n, _)| n.clone()).collect()
    }

    /// The LoRA config of adapter `name` (`None` for other methods).
    pub fn lora_config(&self, name: &str) -> Option<&LoraConfig> {
        self.adapter_config(name).and_then(AdapterConfig::as_lora)
    }

    /// The config of adapter `name`, whatever its method.
    pub fn adapter_config(&self, name: &str) -> Option<&AdapterConfig> {
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

    pub(crate) fn is_merged(&self) -> bool {
        let mut merged = false;
        self.base_model
            .visit_linears(&mut |_, l| merged |= !l.merged.is_empty());
        merged
    }

    /// Adds adapter `name` (inactive until [`set_adapter`](Self::set_adapter)).
    ///
    /// As in PEFT, for `SEQ_CLS` and `TOKEN_CLS` the head names `classifier` and `score` are
    /// appended to `modules_to_save`, so the head is trained and saved with the adapter.
    pub fn add_adapter(&mut self, name: &str, config: impl Into<AdapterConfig>) -> Result<()> {
        if self.adapter_config(name).is_some() {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        if self.is_merged() {
            return Err(PeftError::Merged("add an adapter"));
        }
        let config = config.into();
        let (targets, config) = match config {
            AdapterConfig::Lora(c) => {
                let (t, c) = lora::model::attach(&mut self.base_model, name, &c)?;
                (t, AdapterConfig::Lora(c))
            }
            AdapterConfig::Ia3(c) => {
                let (t, c) = ia3::model::attach(&mut self.base_model, name, &c)?;
                (t, AdapterConfig::Ia3(c))
            }
            AdapterConfig::LoHa(c) => {
                let (t, c) = crate::methods::loha::model::attach(&mut self.base_model, name, &c)?;
                (t, AdapterConfig::LoHa(c))
            }
            AdapterConfig::LoKr(c) => {
                let (t, c) = crate::methods::lokr::model::attach(&mut self.base_model, name, &c)?;
                (t, AdapterConfig::LoKr(c))
            }
            AdapterConfig::Bottleneck(c) => {
                let t = bottleneck::model::attach(&mut self.base_model, name, &c)?;
                (t, AdapterConfig::Bottleneck(c))
            }
            c @ (AdapterConfig::PromptTuning(_)
            | AdapterConfig::PTuning(_)
            | AdapterConfig::PrefixTuning(_)) => {
                crate::methods::prompt::model::attach(&mut self.base_model, name, &c)?
            }
        };
        self.configs.push((name.to_string(), config));
        self.targeted.push((name.to_string(), targets));
        // Re-apply the active set so the new adapter starts frozen unless active.
        let active = self.active.clone();
        self.apply_active(&active);
        Ok(())
    }

    fn apply_active(&mut self, active: &[String]) {
        let trainable = self.trainable_names(active);
        let bias_all = trainable.iter().any(|n| {
            self.adapter_config(n)
                .is_some_and(|c| c.bias() == Bias::All)
        });
        let lora_only: Vec<String> = trainable
            .iter()
            .filter(|n| {
                self.adapter_config(n)
                    .is_some_and(|c| c.bias() == Bias::LoraOnly)
            })
            .cloned()
            .collect();
        let disabled = self.disabled;
        self.base_model.visit_linears_mut(&mut |_, layer| {
            layer.set_active(active);
            layer.disabled = disabled;
            for a in layer.lora.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
            }
            for a in layer.ia3.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
            }
            for a in layer.loha.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
            }
            for a in layer.lokr.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
            }
            for s in layer.modules_to_save.iter_mut() {
                s.set_require_grad(trainable.contains(&s.name));
            }
            if !bias_all {
                let on = layer.lora.iter().any(|a| lora_only.contains(&a.name));
                if let Some(b) = layer.bias.as_mut() {
                    *b = b.clone().set_require_grad(on);
                }
            }
        });
        self.base_model.visit_sublayers_mut(&mut |_, site| {
            site.active = active.to_vec();
            site.disabled = disabled;
            for a in site.adapters.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
            }
        });
        self.base_model.visit_prompt_mut(&mut |site| {
            site.active = active.to_vec();
            site.disabled = disabled;
            for a in site.adapters.iter_mut() {
                a.set_require_grad(trainable.contains(&a.name));
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

    /// The active adapters that train (not loaded in inference mode).
    fn trainable_names(&self, active: &[String]) -> Vec<String> {
        active
            .iter()
            .filter(|n| {
                self.adapter_config(n).is_some_and(|c| !c.inference_mode())
                    && !self.frozen.contains(n)
            })
            .cloned()
            .collect()
    }

    /// Freezes (or unfreezes) adapter `name` whatever its config says: what loading an
    /// AdapterHub adapter for inference does (AdapterHub configs have no `inference_mode`).
    pub fn set_frozen(&mut self, name: &str, frozen: bool) -> Result<()> {
        if self.adapter_config(name).is_none() {
            return Err(self.not_found(name));
        }
        self.frozen.retain(|n| n != name);
        if frozen {
            self.frozen.push(name.to_string());
        }
        let active = self.active.clone();
        self.apply_active(&active);
        Ok(())
    }

    /// Makes `names` the active adapters (their outputs are summed); others are frozen.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if self.adapter_config(n).is_none() {
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

    /// Runs `f` on the model with one adapter per row of the batch (PEFT's `adapter_names`):
    /// `names[i]` is the adapter of input row `i`, [`BASE`](crate::BASE) for none. The active
    /// adapters are ignored for the call. Generation works too: rows expanded per beam
    /// (`batch x num_beams`, input by input) take their input's adapter.
    ///
    /// LoRA rows share the base computation; IA3, `modules_to_save` and bottleneck rows run as
    /// one sub-batch per adapter (see [`crate::mixed`]). The result equals running each row
    /// alone with its adapter.
    ///
    /// Refused, as in PEFT, while adapters are merged, and for a name that is not loaded.
    ///
    /// ```
    /// # use burn::backend::NdArray;
    /// # use peft_core::{AdaptedLinear, AdapterHost};
    /// # #[derive(burn::module::Module, Debug)]
    /// # struct Tiny<B: burn::tensor::backend::Backend> { proj: AdaptedLinear<B> }
    /// # impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
    /// #     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) { f("proj", &self.proj) }
    /// #     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) { f("proj", &mut self.proj) }
    /// # }
    /// # let device = Default::default();
    /// use burn::tensor::Tensor;
    /// use peft_core::{BASE, LoraConfig, PeftModel, TargetModules};
    /// let model = Tiny::<NdArray> { proj: AdaptedLinear::new(16, 16, true, &device) };
    /// let config = || LoraConfig::new(4, 8.0, TargetModules::list(["proj"]));
    /// let mut peft = PeftModel::new(model, config(), "support").unwrap();
    /// peft.add_adapter("sales", config()).unwrap();
    /// let x = Tensor::<NdArray, 2>::ones([3, 16], &device);
    /// // Row 0 through `support`, row 1 through the base alone, row 2 through `sales`.
    /// let y = peft
    ///     .with_batch_adapters(&["support", BASE, "sales"], |m| m.proj.forward(x.clone()))
    ///     .unwrap();
    /// assert_eq!(y.dims(), [3, 16]);
    /// assert!(peft.with_batch_adapters(&["nope"], |_| ()).is_err());
    /// ```
    pub fn with_batch_adapters<R>(&mut self, names: &[&str], f: impl FnOnce(&M) -> R) -> Result<R> {
        if names.is_empty() {
            return Err(PeftError::InvalidConfig(
                "a mixed-adapter batch needs one adapter name per row; none were given".into(),
            ));
        }
        for n in names {
            if *n != crate::BASE && self.adapter_config(n).is_none() {
                return Err(self.not_found(n));
            }
        }
        if self.is_merged() {
            return Err(PeftError::Merged("run a mixed-adapter batch"));
        }
        // As PEFT's `_check_forward_args`: a DoRA row would need its own weight norm.
        if let Some(n) = names.iter().find(|n| {
            self.adapter_config(n)
                .is_some_and(AdapterConfig::is_prompt_learning)
        }) {
            return Err(PeftError::Unsupported(format!(
                "adapter `{n}` is a prompt-learning adapter, which mixed-adapter batches do not \
                 support (its virtual tokens change the sequence for the whole batch; PEFT \
                 refuses `adapter_names` with prompt learning too)"
            )));
        }
        if let Some(n) = names.iter().find(
            |n| matches!(self.adapter_config(n), Some(crate::AdapterConfig::Lora(c)) if c.use_dora),
        ) {
            return Err(PeftError::Unsupported(format!(
                "adapter `{n}` uses DoRA, which mixed-adapter batches do not support (PEFT \
                 refuses `adapter_names` with DoRA too); run it alone, or convert it to LoRA"
            )));
        }
        let routing = crate::BatchAdapters::new(names.iter().map(|s| s.to_string()).collect());
        self.set_batch_adapters(&routing);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&self.base_model)));
        // The routing never outlives the call, not even a panicking one.
        self.set_batch_adapters(&crate::BatchAdapters::none());
        match out {
            Ok(out) => Ok(out),
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    fn set_batch_adapters(&mut self, routing: &crate::BatchAdapters) {
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.batch_adapters = routing.clone());
        self.base_model
            .visit_sublayers_mut(&mut |_, site| site.batch_adapters = routing.clone());
    }

    /// Turns every adapter off: outputs equal the base model's exactly. Merged adapters are
    /// unmerged first, as PEFT does.
    pub fn disable_adapters(&mut self) {
        self.unmerge_adapter();
        self.disabled = true;
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.disabled = true);
        self.base_model
            .visit_sublayers_mut(&mut |_, site| site.disabled = true);
        self.base_model
            .visit_prompt_mut(&mut |site| site.disabled = true);
    }

    /// Turns the active adapters back on.
    pub fn enable_adapters(&mut self) {
        self.disabled = false;
        self.base_model
            .visit_linears_mut(&mut |_, layer| layer.disabled = false);
        self.base_model
            .visit_sublayers_mut(&mut |_, site| site.disabled = false);
        self.base_model
            .visit_prompt_mut(&mut |site| site.disabled = false);
    }

    /// Whether adapters are disabled.
    pub fn adapters_disabled(&self) -> bool {
        self.disabled
    }

    /// Removes adapter `name` everywhere. Refused while adapters are merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.adapter_config(name).is_none() {
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
        self.base_model
            .visit_sublayers_mut(&mut |_, site| site.delete(name));
        self.base_model
            .visit_prompt_mut(&mut |site| site.delete(name));
        self.configs.retain(|(n, _)| n != name);
        self.frozen.retain(|n| n != name);
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
                    if self.adapter_config(a).is_none() {
                        return Err(self.not_found(a));
                    }
                }
                n.iter().map(|s| s.to_string()).collect()
            }
            None => self.active.clone(),
        };
        if let Some(n) = names.iter().find(|n| {
            self.adapter_config(n)
                .is_some_and(AdapterConfig::is_prompt_learning)
        }) {
            return Err(PeftError::Unsupported(format!(
                "merging prompt-learning adapter `{n}`: virtual tokens are not a weight change, \
                 so they cannot be folded into the base weights"
            )));
        }
        if let Some(n) = names
            .iter()
            .find(|n| matches!(self.adapter_config(n), Some(AdapterConfig::Bottleneck(_))))
        {
            return Err(PeftError::Unsupported(format!(
                "merging bottleneck adapter `{n}`: a bottleneck is not linear, so it cannot be \
                 folded into the base weights"
            )));
        }
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
    ///
    /// ```
    /// # use burn::backend::NdArray;
    /// # use peft_core::{AdaptedLinear, AdapterHost};
    /// # #[derive(burn::module::Module, Debug)]
    /// # struct Tiny<B: burn::tensor::backend::Backend> { proj: AdaptedLinear<B> }
    /// # impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
    /// #     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) { f("proj", &self.proj) }
    /// #     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) { f("proj", &mut self.proj) }
    /// # }
    /// # let device = Default::default();
    /// use burn::tensor::Tensor;
    /// use peft_core::{InitLoraWeights, LoraConfig, PeftModel, TargetModules};
    /// let model = Tiny::<NdArray> { proj: AdaptedLinear::new(8, 8, true, &device) };
    /// let config = LoraConfig {
    ///     init_lora_weights: InitLoraWeights::Random, // a non-zero delta
    ///     ..LoraConfig::new(2, 4.0, TargetModules::list(["proj"]))
    /// };
    /// let peft = PeftModel::new(model, config, "default").unwrap();
    /// let x = Tensor::<NdArray, 2>::ones([1, 8], &device);
    /// let adapted = peft.base_model.proj.forward(x.clone());
    /// let plain: Tiny<NdArray> = peft.merge_and_unload(true).unwrap();
    /// assert!(plain.proj.lora.is_empty());
    /// let merged = plain.proj.forward(x);
    /// let v = |t: Tensor<NdArray, 2>| t.into_data().to_vec::<f32>().unwrap();
    /// let d = peft_core::check::max_abs_diff(&v(adapted), &v(merged));
    /// assert!(d < 1e-5, "{d}");
    /// ```
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
            .visit_sublayers_mut(&mut |_, site| *site = SublayerAdapters::new());
        self.base_model.visit_prompt_mut(&mut |site| {
            site.adapters.clear();
            site.active.clear();
        });
        self.base_model
    }

    /// Trainable and total parameter counts, as PEFT computes them after `get_peft_model`:
    /// all = every parameter once (adapters and `modules_to_save` copies included);
    /// trainable = the active adapters' parameters, their copies, and the biases `bias` frees.
    pub fn parameter_counts(&self) -> ParamCounts {
        let all = count_params::<B, M>(&self.base_model);
        let trainable_names = self.trainable_names(&self.active);
        let bias_all = trainable_names.iter().any(|n| {
            self.adapter_config(n)
                .is_some_and(|c| c.bias() == Bias::All)
        });
        let mut trainable = 0;
        self.base_model
            .visit_linears(&mut |_, layer: &AdaptedLinear<B>| {
                for n in &trainable_names {
                    layer.visit_adapter_params(n, &mut |p| trainable += p.param.num_elements());
                }
                let lora_only = layer.lora.iter().any(|a| {
                    trainable_names.contains(&a.name)
                        && self
                            .lora_config(&a.name)
                            .is_some_and(|c| c.bias == Bias::LoraOnly)
                });
                if lora_only
                    && !bias_all
                    && let Some(b) = &layer.bias
                {
                    trainable += b.lazy_shape().num_elements();
                }
            });
        self.base_model.visit_sublayers(&mut |_, site| {
            for a in site
                .adapters
                .iter()
                .filter(|a| trainable_names.contains(&a.name))
            {
                trainable += a.param_count();
            }
        });
        self.base_model.visit_prompt(&mut |site| {
            for a in site
                .adapters
                .iter()
                .filter(|a| trainable_names.contains(&a.name))
            {
                trainable += a.param_count();
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

    /// Every tensor adapter `name` owns, with the path of its site, in model order: on linear
    /// sites (LoRA, IA3, `modules_to_save` copies; keys relative to the layer) and on sub-layer
    /// sites (bottleneck; keys relative to `<path>.adapters.<name>`). Saving, the trainer's
    /// stable ids and gradient switching all walk this one list.
    pub fn visit_adapter_params(
        &self,
        name: &str,
        f: &mut dyn FnMut(&str, NamedParam<ParamRef<'_, B>>),
    ) {
        self.base_model.visit_linears(&mut |path, layer| {
            layer.visit_adapter_params(name, &mut |p| f(path, p));
        });
        self.base_model.visit_sublayers(&mut |site, adapters| {
            if let Some(a) = adapters.adapter(name) {
                a.visit_params(&mut |p| f(&site.path, p));
            }
        });
        self.base_model.visit_prompt(&mut |site| {
            if let Some(a) = site.adapter(name) {
                a.visit_params(&mut |p| f(PROMPT_ENCODER, p));
            }
        });
    }

    /// Like [`visit_adapter_params`](Self::visit_adapter_params), mutably.
    pub fn visit_adapter_params_mut(
        &mut self,
        name: &str,
        f: &mut dyn FnMut(&str, NamedParam<ParamMut<'_, B>>),
    ) {
        self.base_model.visit_linears_mut(&mut |path, layer| {
            layer.visit_adapter_params_mut(name, &mut |p| f(path, p));
        });
        self.base_model.visit_sublayers_mut(&mut |site, adapters| {
            if let Some(a) = adapters.adapter_mut(name) {
                a.visit_params_mut(&mut |p| f(&site.path, p));
            }
        });
        self.base_model.visit_prompt_mut(&mut |site| {
            if let Some(a) = site.adapter_mut(name) {
                a.visit_params_mut(&mut |p| f(PROMPT_ENCODER, p));
            }
        });
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_parameters_line(&self) -> String {
        self.parameter_counts().line()
    }
}
