//! The linear adapter site: a frozen linear layer plus named LoRA adapters, IA3 vectors and
//! trainable copies.

use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use crate::error::{PeftError, Result};
use crate::methods::ia3::Ia3Adapter;
use crate::methods::loha::LohaAdapter;
use crate::methods::lokr::LokrAdapter;
use crate::methods::lora::LoraAdapter;
use crate::mixed::{BatchAdapters, RowGroup, per_group, row_index};
use crate::nn::{linear, linear_packed};
use crate::ops::DecodePack;
use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

/// A trainable copy of a linear layer for one adapter (PEFT's `modules_to_save`).
#[derive(Module, Debug)]
pub struct SavedLinear<B: Backend> {
    /// The adapter the copy belongs to.
    pub name: String,
    /// Weight, `[in, out]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Bias, `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

/// The original weights of a layer while adapters are merged into it, so that unmerging restores
/// them bit for bit.
#[derive(Module, Debug)]
pub struct MergeBackup<B: Backend> {
    /// The unmerged weight.
    pub weight: Tensor<B, 2>,
    /// The unmerged bias.
    pub bias: Option<Tensor<B, 1>>,
}

/// A linear layer that can carry adapters: the model-facing type for every adaptable linear.
///
/// With no adapters it is exactly a linear layer: `y = x W + b` (`W` is `[in, out]`, burn's
/// layout). With adapters: `y = base(x) + sum over active adapters of B(A(dropout(x))) * s`.
/// Disabled adapters give exactly `base(x)`. Merging folds the active adapters into `W`.
#[derive(Module, Debug)]
pub struct AdaptedLinear<B: Backend> {
    /// Base weight, `[d_input, d_output]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Base bias, `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// LoRA adapters, by name.
    pub lora: Vec<LoraAdapter<B>>,
    /// IA3 vectors, by name.
    pub ia3: Vec<Ia3Adapter<B>>,
    /// LoHa adapters, by name.
    pub loha: Vec<LohaAdapter<B>>,
    /// LoKr adapters, by name.
    pub lokr: Vec<LokrAdapter<B>>,
    /// Trainable copies (`modules_to_save`), by adapter name.
    pub modules_to_save: Vec<SavedLinear<B>>,
    /// Original weights while merged.
    pub backup: Option<MergeBackup<B>>,
    /// Names of the active adapters (their deltas are summed).
    pub active: Vec<String>,
    /// Names of the adapters merged into `weight`, in merge order.
    pub merged: Vec<String>,
    /// When true the layer computes `base(x)` alone.
    pub disabled: bool,
    /// The per-row adapters of a mixed batch while one runs (see [`crate::mixed`]).
    #[module(skip)]
    pub batch_adapters: BatchAdapters,
    /// The base weight packed for decoding products (see [`crate::ops::DecodePack`]).
    #[module(skip)]
    pub decode_pack: DecodePack,
}

impl<B: Backend> AdaptedLinear<B> {
    /// A plain linear layer, initialised as PyTorch's `nn.Linear` (lazily).
    pub fn new(d_input: usize, d_output: usize, bias: bool, device: &B::Device) -> Self {
        let kaiming = Initializer::KaimingUniform {
            gain: 1.0 / 3.0f64.sqrt(),
            fan_out_only: false,
        };
        let bound = 1.0 / (d_input as f64).sqrt();
        Self::from_params(
            kaiming.init_with([d_input, d_output], Some(d_input), Some(d_output), device),
            bias.then(|| {
                Initializer::Uniform {
                    min: -bound,
                    max: bound,
                }
                .init([d_output], device)
            }),
        )
    }

    /// A linear layer over existing weights (`weight` is `[in, out]`).
    pub fn from_params(weight: Param<Tensor<B, 2>>, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        AdaptedLinear {
            weight,
            bias,
            lora: Vec::new(),
            ia3: Vec::new(),
            loha: Vec::new(),
            lokr: Vec::new(),
            modules_to_save: Vec::new(),
            backup: None,
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
            batch_adapters: BatchAdapters::none(),
            decode_pack: DecodePack::default(),
        }
    }

    /// A linear layer from tensors (`weight` is `[in, out]`).
    pub fn from_tensors(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self::from_params(Param::from_tensor(weight), bias.map(Param::from_tensor))
    }

    /// `d_input`.
    pub fn d_input(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[0]
    }

    /// `d_output`.
    pub fn d_output(&self) -> usize {
        self.weight.lazy_shape().dims::<2>()[1]
    }

    /// Number of base parameters (weight and bias), without materialising lazy ones.
    pub fn base_num_params(&self) -> usize {
        self.weight.lazy_shape().num_elements()
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.lazy_shape().num_elements())
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter<B>> {
        self.lora.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, mutably.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut LoraAdapter<B>> {
        self.lora.iter_mut().find(|a| a.name == name)
    }

    /// The IA3 vector named `name`.
    pub fn ia3_adapter(&self, name: &str) -> Option<&Ia3Adapter<B>> {
        self.ia3.iter().find(|a| a.name == name)
    }

    /// The IA3 vector named `name`, mutably.
    pub fn ia3_adapter_mut(&mut self, name: &str) -> Option<&mut Ia3Adapter<B>> {
        self.ia3.iter_mut().find(|a| a.name == name)
    }

    /// The LoHa adapter named `name`.
    pub fn loha_adapter(&self, name: &str) -> Option<&LohaAdapter<B>> {
        self.loha.iter().find(|a| a.name == name)
    }

    /// The LoKr adapter named `name`.
    pub fn lokr_adapter(&self, name: &str) -> Option<&LokrAdapter<B>> {
        self.lokr.iter().find(|a| a.name == name)
    }

    /// Adds a LoKr adapter (active only if [`set_active`](Self::set_active) says so).
    pub fn add_lokr(&mut self, adapter: LokrAdapter<B>) -> Result<()> {
        if self.has_adapter(&adapter.name) {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.lokr.push(adapter);
        Ok(())
    }

    /// Whether adapter `name` (LoRA, IA3, LoHa or LoKr) changes this layer's computation.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapter(name).is_some()
            || self.ia3_adapter(name).is_some()
            || self.loha_adapter(name).is_some()
            || self.lokr_adapter(name).is_some()
    }

    /// Adds a LoHa adapter (active only if [`set_active`](Self::set_active) says so).
    pub fn add_loha(&mut self, adapter: LohaAdapter<B>) -> Result<()> {
        if self.has_adapter(&adapter.name) {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.loha.push(adapter);
        Ok(())
    }

    /// Adds an IA3 vector (active only if [`set_active`](Self::set_active) says so).
    pub fn add_ia3(&mut self, adapter: Ia3Adapter<B>) -> Result<()> {
        if self.has_adapter(&adapter.name) {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.ia3.push(adapter);
        Ok(())
    }

    /// The trainable copy for adapter `name`, if this layer is one of its `modules_to_save`.
    pub fn saved_copy(&self, name: &str) -> Option<&SavedLinear<B>> {
        self.modules_to_save.iter().find(|s| s.name == name)
    }

    /// Names of all adapters on this layer (LoRA and saved copies).
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lora.iter().map(|a| a.name.clone()).collect();
        names.extend(self.ia3.iter().map(|a| a.name.clone()));
        names.extend(self.loha.iter().map(|a| a.name.clone()));
        names.extend(self.lokr.iter().map(|a| a.name.clone()));
        for s in &self.modules_to_save {
            if !names.contains(&s.name) {
                names.push(s.name.clone());
            }
        }
        names
    }

    /// Every tensor adapter `name` owns on this layer (LoRA, IA3, its `modules_to_save` copy),
    /// keys relative to the layer's path.
    pub fn visit_adapter_params(&self, name: &str, f: &mut dyn FnMut(NamedParam<ParamRef<'_, B>>)) {
        for a in self.lora.iter().filter(|a| a.name == name) {
            a.visit_params(f);
        }
        for a in self.ia3.iter().filter(|a| a.name == name) {
            a.visit_params(f);
        }
        for a in self.loha.iter().filter(|a| a.name == name) {
            a.visit_params(f);
        }
        for a in self.lokr.iter().filter(|a| a.name == name) {
            a.visit_params(f);
        }
        for s in self.modules_to_save.iter().filter(|s| s.name == name) {
            s.visit_params(f);
        }
    }

    /// Like [`visit_adapter_params`](Self::visit_adapter_params), mutably.
    pub fn visit_adapter_params_mut(
        &mut self,
        name: &str,
        f: &mut dyn FnMut(NamedParam<ParamMut<'_, B>>),
    ) {
        for a in self.lora.iter_mut().filter(|a| a.name == name) {
            a.visit_params_mut(f);
        }
        for a in self.ia3.iter_mut().filter(|a| a.name == name) {
            a.visit_params_mut(f);
        }
        for a in self.loha.iter_mut().filter(|a| a.name == name) {
            a.visit_params_mut(f);
        }
        for a in self.lokr.iter_mut().filter(|a| a.name == name) {
            a.visit_params_mut(f);
        }
        for s in self.modules_to_save.iter_mut().filter(|s| s.name == name) {
            s.visit_params_mut(f);
        }
    }

    /// Adds a LoRA adapter (active only if [`set_active`](Self::set_active) says so). A DoRA
    /// adapter gets its magnitude here, as PEFT's `dora_init`: the norm of every output's
    /// weights in `W + scaling * B A` (this materialises the layer's weight and the adapter).
    pub fn add_lora(&mut self, mut adapter: LoraAdapter<B>) -> Result<()> {
        if self.has_adapter(&adapter.name) {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        if adapter.use_dora && adapter.magnitude.is_none() {
            let norm = dora_weight_norm(self.weight.val(), adapter.delta_weight()).detach();
            adapter.magnitude = Some(Param::from_tensor(norm.require_grad()));
        }
        self.lora.push(adapter);
        Ok(())
    }

    /// The base weight without merged adapters (what DoRA's norm is taken of).
    fn unmerged_weight(&self) -> Tensor<B, 2> {
        match &self.backup {
            Some(b) => b.weight.clone(),
            None => self.weight.val(),
        }
    }

    /// Adds a trainable copy of this layer's base weights for adapter `name`.
    pub fn add_saved_copy(&mut self, name: &str) -> Result<()> {
        if self.saved_copy(name).is_some() {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        // A detached copy of the current values: fresh parameters, trainable.
        let weight = Param::initialized(ParamId::new(), self.weight.val().detach().require_grad());
        let bias = self
            .bias
            .as_ref()
            .map(|b| Param::initialized(ParamId::new(), b.val().detach().require_grad()));
        self.modules_to_save.push(SavedLinear {
            name: name.to_string(),
            weight,
            bias,
        });
        Ok(())
    }

    /// Removes every trace of adapter `name` from this layer.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        if !self.merged.is_empty() {
            return Err(PeftError::Merged("delete an adapter"));
        }
        self.lora.retain(|a| a.name != name);
        self.ia3.retain(|a| a.name != name);
        self.loha.retain(|a| a.name != name);
        self.lokr.retain(|a| a.name != name);
        self.modules_to_save.retain(|s| s.name != name);
        self.active.retain(|a| a != name);
        Ok(())
    }

    /// Sets the active adapters (names this layer does not carry are ignored, as in PEFT).
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names.to_vec();
    }

    /// Output: the base layer, plus the active adapters unless disabled or merged. During a
    /// mixed-adapter batch each row takes its own adapter instead (see [`crate::mixed`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.disabled
            && let Some(groups) = self.batch_adapters.groups(x.dims()[0])
        {
            return self.forward_mixed(x, &groups);
        }
        self.forward_with(x, &self.active)
    }

    /// A mixed batch: LoRA-only rows share one base product and get their deltas added in
    /// place (PEFT's `_mixed_batch_forward`); rows whose adapter has IA3 vectors or a trainable
    /// copy here run as a sub-batch of their own.
    fn forward_mixed<const D: usize>(&self, x: Tensor<B, D>, groups: &[RowGroup]) -> Tensor<B, D> {
        let replaces = |name: Option<&str>| {
            name.is_some_and(|n| {
                self.ia3_adapter(n).is_some()
                    || self.loha_adapter(n).is_some()
                    || self.lokr_adapter(n).is_some()
                    || self.saved_copy(n).is_some()
            })
        };
        if groups.iter().any(|g| replaces(g.adapter.as_deref())) {
            let d_out = self.d_output();
            return per_group(
                x,
                groups,
                |mut s| {
                    s[D - 1] = d_out;
                    s
                },
                |name, xs| {
                    let active: Vec<String> = name.into_iter().map(str::to_string).collect();
                    self.forward_with(xs, &active)
                },
            );
        }
        let device = x.device();
        let mut y = self.base(x.clone(), self.bias.as_ref().map(|b| b.val()));
        for g in groups {
            let Some(a) = g.adapter.as_deref().and_then(|n| self.adapter(n)) else {
                continue;
            };
            let idx = row_index::<B>(&g.rows, &device);
            // B(A(dropout(x))) * scaling for the group's rows, through the pass a row alone
            // takes (`ops::lora_add`, here onto zeros), so that each row's sum is the same as
            // when it runs alone.
            let xs = a.dropout.forward(x.clone().select(0, idx.clone()));
            let mut dims = xs.dims();
            dims[D - 1] = self.d_output();
            let delta = crate::ops::lora_add(
                Tensor::zeros(dims, &device),
                xs,
                a.lora_a.val(),
                a.lora_b.val(),
                a.lora_bias.as_ref().map(|b| b.val()),
                a.scaling,
            );
            y = y.select_assign(0, idx, delta, burn::tensor::IndexingUpdateOp::Add);
        }
        y
    }

    /// The output with `active` as the active adapters.
    /// `x W + b` with the base weight (packed for decoding products, see
    /// [`crate::ops::DecodePack`]).
    fn base<const D: usize>(&self, x: Tensor<B, D>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
        linear_packed(x, self.weight.val(), bias, &self.decode_pack)
    }

    fn forward_with<const D: usize>(&self, x: Tensor<B, D>, active: &[String]) -> Tensor<B, D> {
        if !self.disabled {
            // modules_to_save: the first active adapter with a copy replaces the base layer.
            if let Some(copy) = active.iter().find_map(|n| self.saved_copy(n)) {
                return linear(x, copy.weight.val(), copy.bias.as_ref().map(|b| b.val()));
            }
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        if self.disabled || !self.merged.is_empty() {
            return self.base(x, bias);
        }
        // IA3: the product of the active vectors scales the input (feed-forward targets) or
        // the output (others), as PEFT's `IA3Layer.forward`.
        let (mut scale_in, mut scale_out): (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>) =
            (None, None);
        for name in active {
            if let Some(a) = self.ia3_adapter(name) {
                let slot = if a.feedforward {
                    &mut scale_in
                } else {
                    &mut scale_out
                };
                *slot = Some(match slot.take() {
                    Some(s) => s * a.ia3_l.val(),
                    None => a.ia3_l.val(),
                });
            }
        }
        let mut y = match scale_in {
            Some(s) => self.base(x.clone() * s.unsqueeze(), bias),
            None => self.base(x.clone(), bias),
        };
        if let Some(s) = scale_out {
            y = y * s.unsqueeze();
        }
        for name in active {
            let Some(a) = self.adapter(name) else {
                continue;
            };
            let Some(m) = &a.magnitude else {
                // y + B(A(dropout(x))) * scaling: in inference on burn-ndarray one pass over
                // the rows; otherwise the two products, then the scaling and the sum in one pass.
                y = crate::ops::lora_add(
                    y,
                    a.dropout.forward(x.clone()),
                    a.lora_a.val(),
                    a.lora_b.val(),
                    a.lora_bias.as_ref().map(|b| b.val()),
                    a.scaling,
                );
                continue;
            };
            // DoRA, as PEFT's `DoraLinearLayer.forward`: the norm of W + s B A is detached;
            // without active dropout the base product is the output so far minus the bias,
            // with it, the product of the dropped-out input (no bias).
            let w = self.weight.val();
            let norm = dora_weight_norm(w.clone(), a.delta_weight().detach()).detach();
            let scale = (m.val() / norm).unsqueeze::<D>();
            let (xa, base) = if a.dropout.is_active::<B>(&x.device()) {
                let xd = a.dropout.forward(x.clone());
                (xd.clone(), linear(xd, w, None))
            } else {
                let base = match self.bias.as_ref().map(|b| b.val()) {
                    Some(b) => y.clone() - b.unsqueeze::<D>(),
                    None => y.clone(),
                };
                (x.clone(), base)
            };
            let lora = a.branch(xa);
            y = y + base * (scale.clone() - 1.0) + lora * scale;
        }
        for name in active {
            if let Some(delta) = self.loha_adapter(name).and_then(|a| a.forward(x.clone())) {
                y = y + delta;
            }
            if let Some(delta) = self.lokr_adapter(name).and_then(|a| a.forward(x.clone())) {
                y = y + delta;
            }
        }
        y
    }

    /// Folds the given adapters (default: the active ones carried here) into the base weights.
    ///
    /// With `safe`, the merged weights are computed aside and checked for NaN/Inf first; on
    /// failure the layer is left untouched. The original weights are kept, so
    /// [`unmerge`](Self::unmerge) restores them exactly.
    pub fn merge(&mut self, path: &str, names: Option<&[String]>, safe: bool) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => n.to_vec(),
            None => self.active.clone(),
        };
        let names: Vec<String> = names
            .into_iter()
            .filter(|n| self.has_adapter(n) && !self.merged.contains(n))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let mut weight = self.weight.val();
        let mut bias = self.bias.as_ref().map(|b| b.val());
        for n in &names {
            if let Some(a) = self.ia3_adapter(n) {
                // PEFT's IA3 merge: rows of W (PyTorch columns) for feed-forward targets,
                // output columns and the bias otherwise.
                let l = a.ia3_l.val();
                if a.feedforward {
                    weight = weight * l.unsqueeze_dim::<2>(1);
                } else {
                    bias = bias.map(|b| b * l.clone());
                    weight = weight * l.unsqueeze_dim::<2>(0);
                }
                continue;
            }
            if let Some(a) = self.loha_adapter(n) {
                weight = weight + a.delta_weight();
                continue;
            }
            if let Some(a) = self.lokr_adapter(n) {
                weight = weight + a.delta_weight();
                continue;
            }
            let a = self.adapter(n).expect("filtered above");
            let delta = a.delta_weight();
            weight = match &a.magnitude {
                // DoRA (PEFT's `DoraLinearVariant.merge`): W' = m / |W0 + dW| * (W + dW), the
                // norm taken of the unmerged base W0.
                Some(m) => {
                    let norm = dora_weight_norm(self.unmerged_weight(), delta.clone());
                    (weight + delta) * (m.val() / norm).unsqueeze_dim::<2>(0)
                }
                None => weight + delta,
            };
            if let Some(db) = a.delta_bias() {
                bias = Some(match bias {
                    Some(b) => b + db,
                    None => {
                        return Err(PeftError::Unsupported(format!(
                            "merging `{n}` into `{path}`: lora_bias=True but the base layer has no bias"
                        )));
                    }
                });
            }
        }
        if safe {
            let finite = weight
                .clone()
                .is_finite()
                .all()
                .into_scalar()
                .elem::<bool>()
                && bias
                    .as_ref()
                    .is_none_or(|b| b.clone().is_finite().all().into_scalar().elem::<bool>());
            if !finite {
                return Err(PeftError::NonFiniteMerge {
                    site: path.to_string(),
                    adapter: names.join(", "),
                });
            }
        }
        if self.backup.is_none() {
            self.backup = Some(MergeBackup {
                weight: self.weight.val(),
                bias: self.bias.as_ref().map(|b| b.val()),
            });
        }
        self.weight = Param::initialized(self.weight.id, weight.detach());
        if let (Some(old), Some(new)) = (&self.bias, bias) {
            self.bias = Some(Param::initialized(old.id, new.detach()));
        }
        self.merged.extend(names);
        Ok(())
    }

    /// Restores the weights from before the first merge, bit for bit.
    pub fn unmerge(&mut self) {
        if let Some(b) = self.backup.take() {
            self.weight = Param::initialized(self.weight.id, b.weight);
            if let (Some(old), Some(new)) = (&self.bias, b.bias) {
                self.bias = Some(Param::initialized(old.id, new));
            }
        }
        self.merged.clear();
    }

    /// Keeps the merged weights as the new base and drops every adapter: a plain linear layer.
    pub fn unload(&mut self, keep_merged: bool) {
        if !keep_merged {
            self.unmerge();
        }
        // The active adapter's saved copy becomes the layer itself (PEFT's merge_and_unload).
        if keep_merged && let Some(copy) = self.active.iter().find_map(|n| self.saved_copy(n)) {
            let (weight, bias) = (copy.weight.clone(), copy.bias.clone());
            self.weight = weight;
            self.bias = bias;
        }
        self.lora.clear();
        self.ia3.clear();
        self.loha.clear();
        self.lokr.clear();
        self.modules_to_save.clear();
        self.backup = None;
        self.active.clear();
        self.merged.clear();
        self.disabled = false;
    }
}

/// DoRA's weight norm: the L2 norm of every output's weights in `weight + delta` (`[in, out]`,
/// so the norm runs over the input dimension), `[out]`.
pub fn dora_weight_norm<B: Backend>(weight: Tensor<B, 2>, delta: Tensor<B, 2>) -> Tensor<B, 1> {
    let d_out = weight.dims()[1];
    (weight + delta)
        .powi_scalar(2)
        .sum_dim(0)
        .sqrt()
        .reshape([d_out])
}

/// Writes `SavedLinear`'s tensor list once, for the shared and the mutable walk (`$m` is
/// empty or `mut`): PEFT saves a `modules_to_save` copy under the layer's own names, in
/// PyTorch's layout.
macro_rules! saved_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
        f(NamedParam {
            key: "weight",
            layout: FileLayout::Transposed,
            param: $P::D2(& $($m)? self.weight),
        });
        if let Some(b) = & $($m)? self.bias {
            f(NamedParam {
                key: "bias",
                layout: FileLayout::AsIs,
                param: $P::D1(b),
            });
        }
        }
    };
}

impl<B: Backend> AdapterParams<B> for SavedLinear<B> {
    saved_params!(visit_params, ParamRef);
    saved_params!(visit_params_mut, ParamMut, mut);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::max_abs_diff;
    use crate::methods::lora::{InitLoraWeights, LoraSpec};
    use burn::tensor::TensorData;

    type NB = burn::backend::NdArray<f32>;

    const D_IN: usize = 5;
    const D_OUT: usize = 3;
    const TOL: f32 = 1e-5;

    fn values<const D: usize>(t: Tensor<NB, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    fn bits<const D: usize>(t: Tensor<NB, D>) -> Vec<u32> {
        values(t).iter().map(|v| v.to_bits()).collect()
    }

    /// Irregular, deterministic values in (-1, 1).
    fn fill(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * 0.731 + seed).sin() * 0.9)
            .collect()
    }

    fn t2(v: Vec<f32>, shape: [usize; 2]) -> Tensor<NB, 2> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn t1(v: Vec<f32>) -> Tensor<NB, 1> {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }

    fn base_layer() -> AdaptedLinear<NB> {
        AdaptedLinear::from_tensors(
            t2(fill(D_IN * D_OUT, 0.1), [D_IN, D_OUT]),
            Some(t1(fill(D_OUT, 0.2))),
        )
    }

    /// A LoRA adapter of rank 2 with the given A (`[in, r]`) and B (`[r, out]`) values.
    fn lora(name: &str, a: Vec<f32>, b: Vec<f32>, bias: Option<Vec<f32>>) -> LoraAdapter<NB> {
        let spec = LoraSpec {
            r: 2,
            alpha: 3.0,
            dropout: 0.0,
            use_rslora: false,
            init: InitLoraWeights::Default,
            lora_bias: bias.is_some(),
            use_dora: false,
        };
        let mut ad = LoraAdapter::new(name, D_IN, D_OUT, &spec, &Default::default());
        ad.lora_a = Param::from_tensor(t2(a, [D_IN, 2]));
        ad.lora_b = Param::from_tensor(t2(b, [2, D_OUT]));
        ad.lora_bias = bias.map(|b| Param::from_tensor(t1(b)));
        ad
    }

    fn good(name: &str, seed: f32, with_bias: bool) -> LoraAdapter<NB> {
        lora(
            name,
            fill(D_IN * 2, seed),
            fill(2 * D_OUT, seed + 0.5),
            with_bias.then(|| fill(D_OUT, seed + 0.9)),
        )
    }

    fn input() -> Tensor<NB, 2> {
        t2(fill(4 * D_IN, 0.3), [4, D_IN])
    }

    /// `W + scaling * A @ B`, computed on the host.
    fn merged_by_hand(w: &[f32], ads: &[&LoraAdapter<NB>]) -> Vec<f32> {
        let mut out = w.to_vec();
        for ad in ads {
            let (a, b) = (values(ad.lora_a.val()), values(ad.lora_b.val()));
            for i in 0..D_IN {
                for j in 0..D_OUT {
                    let dot: f32 = (0..ad.r).map(|k| a[i * ad.r + k] * b[k * D_OUT + j]).sum();
                    out[i * D_OUT + j] += dot * ad.scaling as f32;
                }
            }
        }
        out
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn merge_then_unmerge_restores_the_weights_bit_for_bit() {
        let mut l = base_layer();
        let (w0, b0) = (bits(l.weight.val()), bits(l.bias.as_ref().unwrap().val()));
        let w0_values = values(l.weight.val());
        let (a, b) = (good("a", 0.0, false), good("b", 1.3, true));
        let expected = merged_by_hand(&w0_values, &[&a, &b]);
        let b_bias: Vec<f32> = values(b.delta_bias().unwrap());
        l.add_lora(a).unwrap();
        l.add_lora(b).unwrap();
        l.set_active(&names(&["a", "b"]));
        let x = input();
        let adapted = values(l.forward(x.clone()));

        // Merged in two steps: the backup is the weight from before the first merge.
        l.merge("enc.q", Some(&names(&["a"])), true).unwrap();
        l.merge("enc.q", None, true).unwrap();
        assert_eq!(l.merged, ["a", "b"]);
        let d = max_abs_diff(&values(l.weight.val()), &expected);
        assert!(d <= TOL, "merged weight off by {d:e}");
        let bias0 = values(base_layer().bias.unwrap().val());
        let bias_expected: Vec<f32> = bias0.iter().zip(&b_bias).map(|(x, y)| x + y).collect();
        let d = max_abs_diff(&values(l.bias.as_ref().unwrap().val()), &bias_expected);
        assert!(d <= TOL, "merged bias off by {d:e}");
        let d = max_abs_diff(&values(l.forward(x.clone())), &adapted);
        assert!(d <= TOL, "merged output off by {d:e}");
        // Merging what is merged changes nothing.
        let merged_bits = bits(l.weight.val());
        l.merge("enc.q", None, true).unwrap();
        assert_eq!(bits(l.weight.val()), merged_bits);

        l.unmerge();
        assert_eq!(bits(l.weight.val()), w0, "weight restored bit for bit");
        assert_eq!(bits(l.bias.as_ref().unwrap().val()), b0, "bias restored");
        assert!(l.merged.is_empty() && l.backup.is_none());
        let d = max_abs_diff(&values(l.forward(x)), &adapted);
        assert_eq!(d, 0.0, "unmerged output is the adapted output again");
    }

    #[test]
    fn a_non_finite_safe_merge_is_refused_and_changes_nothing() {
        let mut l = base_layer();
        let (w0, b0) = (bits(l.weight.val()), bits(l.bias.as_ref().unwrap().val()));
        l.add_lora(good("ok", 0.0, false)).unwrap();
        let mut b = fill(2 * D_OUT, 0.5);
        b[4] = f32::NAN;
        l.add_lora(lora("nan", fill(D_IN * 2, 0.0), b, None))
            .unwrap();
        // Finite tensors whose product overflows to infinity.
        l.add_lora(lora(
            "inf",
            vec![1e30; D_IN * 2],
            vec![1e30; 2 * D_OUT],
            None,
        ))
        .unwrap();

        for bad in ["nan", "inf"] {
            l.set_active(&names(&["ok", bad]));
            match l.merge("enc.q", None, true) {
                Err(PeftError::NonFiniteMerge { site, adapter }) => {
                    assert_eq!(site, "enc.q");
                    assert!(adapter.contains(bad), "{adapter}");
                }
                other => panic!("{bad}: {other:?}"),
            }
            assert_eq!(bits(l.weight.val()), w0, "{bad}: weight untouched");
            assert_eq!(
                bits(l.bias.as_ref().unwrap().val()),
                b0,
                "{bad}: bias untouched"
            );
            assert!(l.merged.is_empty() && l.backup.is_none(), "{bad}");
        }

        // Refused on top of a good merge: the good merge stays as it was.
        l.set_active(&names(&["ok"]));
        l.merge("enc.q", None, true).unwrap();
        let merged = bits(l.weight.val());
        let err = l.merge("enc.q", Some(&names(&["nan"])), true);
        assert!(
            matches!(err, Err(PeftError::NonFiniteMerge { .. })),
            "{err:?}"
        );
        assert_eq!(bits(l.weight.val()), merged);
        assert_eq!(l.merged, ["ok"]);
        l.unmerge();
        assert_eq!(bits(l.weight.val()), w0);
    }

    #[test]
    fn a_disabled_layer_is_exactly_the_base_layer() {
        let x = input();
        let base = values(base_layer().forward(x.clone()));
        let mut l = base_layer();
        l.add_lora(good("a", 0.0, true)).unwrap();
        l.add_ia3(Ia3Adapter {
            name: "s".into(),
            ia3_l: Param::from_tensor(t1(fill(D_OUT, 2.0))),
            feedforward: false,
        })
        .unwrap();
        l.add_lora(good("c", 0.7, false)).unwrap();
        l.add_saved_copy("c").unwrap();
        l.modules_to_save[0].weight =
            Param::from_tensor(t2(fill(D_IN * D_OUT, 3.0), [D_IN, D_OUT]));

        for active in [&["a"][..], &["s"], &["a", "s"], &["c"]] {
            l.set_active(&names(active));
            l.disabled = false;
            let on = values(l.forward(x.clone()));
            let d = max_abs_diff(&on, &base);
            assert!(
                d.is_finite() && d > 1e-3,
                "{active:?} changes the output: {d:e}"
            );
            l.disabled = true;
            let off = values(l.forward(x.clone()));
            assert_eq!(max_abs_diff(&off, &base), 0.0, "{active:?} disabled");
            assert_eq!(
                off.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                base.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{active:?}: bit for bit"
            );
        }
    }

    #[test]
    fn deleting_an_adapter_while_merged_is_refused() {
        let mut l = base_layer();
        l.add_lora(good("a", 0.0, false)).unwrap();
        l.add_lora(good("b", 0.4, false)).unwrap();
        l.add_saved_copy("a").unwrap();
        l.set_active(&names(&["a", "b"]));
        l.merge("enc.q", Some(&names(&["b"])), true).unwrap();
        let merged = bits(l.weight.val());
        for name in ["a", "b"] {
            assert!(
                matches!(l.delete(name), Err(PeftError::Merged(_))),
                "{name}"
            );
        }
        assert!(l.adapter("a").is_some() && l.adapter("b").is_some());
        assert!(l.saved_copy("a").is_some());
        assert_eq!(l.active, ["a", "b"]);
        assert_eq!(bits(l.weight.val()), merged);

        l.unmerge();
        l.delete("a").unwrap();
        assert!(l.adapter("a").is_none() && l.saved_copy("a").is_none());
        assert_eq!(l.active, ["b"]);
        assert_eq!(l.adapter_names(), ["b"]);
    }
}
