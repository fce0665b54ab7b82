//! The linear adapter site: a frozen linear layer plus named LoRA adapters, IA3 vectors and
//! trainable copies.

use burn::module::{Initializer, Module, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Tensor};

use crate::error::{PeftError, Result};
use crate::methods::ia3::Ia3Adapter;
use crate::methods::lora::LoraAdapter;
use crate::nn::linear;
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
            modules_to_save: Vec::new(),
            backup: None,
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
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

    /// Whether adapter `name` (LoRA or IA3) changes this layer's computation.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.adapter(name).is_some() || self.ia3_adapter(name).is_some()
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
        for s in self.modules_to_save.iter_mut().filter(|s| s.name == name) {
            s.visit_params_mut(f);
        }
    }

    /// Adds a LoRA adapter (active only if [`set_active`](Self::set_active) says so).
    pub fn add_lora(&mut self, adapter: LoraAdapter<B>) -> Result<()> {
        if self.has_adapter(&adapter.name) {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.lora.push(adapter);
        Ok(())
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
        self.modules_to_save.retain(|s| s.name != name);
        self.active.retain(|a| a != name);
        Ok(())
    }

    /// Sets the active adapters (names this layer does not carry are ignored, as in PEFT).
    pub fn set_active(&mut self, names: &[String]) {
        self.active = names.to_vec();
    }

    /// Output: the base layer, plus the active adapters unless disabled or merged.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.disabled {
            // modules_to_save: the first active adapter with a copy replaces the base layer.
            if let Some(copy) = self.active.iter().find_map(|n| self.saved_copy(n)) {
                return linear(x, copy.weight.val(), copy.bias.as_ref().map(|b| b.val()));
            }
        }
        let bias = self.bias.as_ref().map(|b| b.val());
        if self.disabled || !self.merged.is_empty() {
            return linear(x, self.weight.val(), bias);
        }
        // IA3: the product of the active vectors scales the input (feed-forward targets) or
        // the output (others), as PEFT's `IA3Layer.forward`.
        let (mut scale_in, mut scale_out): (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>) =
            (None, None);
        for name in &self.active {
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
            Some(s) => linear(x.clone() * s.unsqueeze(), self.weight.val(), bias),
            None => linear(x.clone(), self.weight.val(), bias),
        };
        if let Some(s) = scale_out {
            y = y * s.unsqueeze();
        }
        for name in &self.active {
            if let Some(a) = self.adapter(name) {
                y = y + a.forward(x.clone());
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
            let a = self.adapter(n).expect("filtered above");
            weight = weight + a.delta_weight();
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
        self.modules_to_save.clear();
        self.backup = None;
        self.active.clear();
        self.merged.clear();
        self.disabled = false;
    }
}

/// PEFT saves a `modules_to_save` copy under the layer's own names, in PyTorch's layout.
impl<B: Backend> AdapterParams<B> for SavedLinear<B> {
    fn visit_params(&self, f: &mut dyn FnMut(NamedParam<ParamRef<'_, B>>)) {
        f(NamedParam {
            key: "weight",
            layout: FileLayout::Transposed,
            param: ParamRef::D2(&self.weight),
        });
        if let Some(b) = &self.bias {
            f(NamedParam {
                key: "bias",
                layout: FileLayout::AsIs,
                param: ParamRef::D1(b),
            });
        }
    }

    fn visit_params_mut(&mut self, f: &mut dyn FnMut(NamedParam<ParamMut<'_, B>>)) {
        f(NamedParam {
            key: "weight",
            layout: FileLayout::Transposed,
            param: ParamMut::D2(&mut self.weight),
        });
        if let Some(b) = &mut self.bias {
            f(NamedParam {
                key: "bias",
                layout: FileLayout::AsIs,
                param: ParamMut::D1(b),
            });
        }
    }
}
