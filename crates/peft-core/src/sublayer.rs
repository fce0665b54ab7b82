//! The sub-layer adapter site: where a transformer sub-layer adds its residual.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::error::{PeftError, Result};
use crate::methods::bottleneck::BottleneckAdapter;
use crate::mixed::{BatchAdapters, row_index};

/// The bottleneck site of one sub-layer: named adapters (none by default), the active ones,
/// and whether adapters are disabled. The model-facing type: every model calls
/// [`forward`](Self::forward) where the sub-layer adds its residual.
#[derive(Module, Debug)]
pub struct SublayerAdapters<B: Backend> {
    /// Bottleneck adapters, by name.
    pub adapters: Vec<BottleneckAdapter<B>>,
    /// Active adapters, applied in order (AdapterHub's `Stack`).
    pub active: Vec<String>,
    /// When true the site computes the model's own residual (and LayerNorm).
    pub disabled: bool,
    /// The per-row adapters of a mixed batch while one runs (see [`crate::mixed`]).
    #[module(skip)]
    pub batch_adapters: BatchAdapters,
}

impl<B: Backend> Default for SublayerAdapters<B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> SublayerAdapters<B> {
    /// An empty site.
    pub fn new() -> Self {
        SublayerAdapters {
            adapters: Vec::new(),
            active: Vec::new(),
            disabled: false,
            batch_adapters: BatchAdapters::none(),
        }
    }

    /// The adapter named `name`.
    pub fn adapter(&self, name: &str) -> Option<&BottleneckAdapter<B>> {
        self.adapters.iter().find(|a| a.name == name)
    }

    /// The adapter named `name`, mutably.
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut BottleneckAdapter<B>> {
        self.adapters.iter_mut().find(|a| a.name == name)
    }

    /// Adds an adapter (active only if [`active`](Self::active) says so).
    pub fn add(&mut self, adapter: BottleneckAdapter<B>) -> Result<()> {
        if self.adapter(&adapter.name).is_some() {
            return Err(PeftError::AdapterExists(adapter.name));
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Removes adapter `name`.
    pub fn delete(&mut self, name: &str) {
        self.adapters.retain(|a| a.name != name);
        self.active.retain(|a| a != name);
    }

    /// The sub-layer output with the residual added: through the active adapters, or the
    /// model's own `layer_norm(hidden + residual)` (`hidden + residual` without a LayerNorm).
    pub fn forward<const D: usize>(
        &self,
        hidden: Tensor<B, D>,
        residual: Tensor<B, D>,
        layer_norm: Option<&dyn Fn(Tensor<B, D>) -> Tensor<B, D>>,
    ) -> Tensor<B, D> {
        if !self.disabled
            && let Some(groups) = self.batch_adapters.groups(hidden.dims()[0])
        {
            // AdapterHub's BatchSplit: each adapter's rows (and the base's) as a sub-batch,
            // put back in place.
            let stack_of = |name: Option<&str>| -> Vec<&BottleneckAdapter<B>> {
                name.and_then(|n| self.adapter(n)).into_iter().collect()
            };
            if let [only] = groups.as_slice() {
                return Self::run_stack(
                    &stack_of(only.adapter.as_deref()),
                    hidden,
                    residual,
                    layer_norm,
                );
            }
            let device = hidden.device();
            let mut out = Tensor::<B, D>::zeros(hidden.dims(), &device);
            for g in &groups {
                let idx = row_index::<B>(&g.rows, &device);
                let o = Self::run_stack(
                    &stack_of(g.adapter.as_deref()),
                    hidden.clone().select(0, idx.clone()),
                    residual.clone().select(0, idx.clone()),
                    layer_norm,
                );
                out = out.select_assign(0, idx, o, burn::tensor::IndexingUpdateOp::Add);
            }
            return out;
        }
        let stack: Vec<&BottleneckAdapter<B>> = if self.disabled {
            Vec::new()
        } else {
            self.active.iter().filter_map(|n| self.adapter(n)).collect()
        };
        Self::run_stack(&stack, hidden, residual, layer_norm)
    }

    fn run_stack<const D: usize>(
        stack: &[&BottleneckAdapter<B>],
        hidden: Tensor<B, D>,
        residual: Tensor<B, D>,
        layer_norm: Option<&dyn Fn(Tensor<B, D>) -> Tensor<B, D>>,
    ) -> Tensor<B, D> {
        let Some(last) = stack.last() else {
            return match layer_norm {
                Some(ln) => ln(crate::ops::add(hidden, residual)),
                None => crate::ops::add(hidden, residual),
            };
        };
        let mut h = hidden;
        for a in stack {
            let (x, res) = a.pre_forward(h, &residual, layer_norm);
            h = a.core(x, res);
        }
        last.post_forward(h, residual, layer_norm)
    }
}
