//! Mixed-adapter batches: every row of a batch names its own adapter (PEFT's `adapter_names`,
//! with [`BASE`] for rows that take none).
//!
//! [`PeftModel::with_batch_adapters`](crate::PeftModel::with_batch_adapters) shares the names
//! with every adapter site for the length of one call; each site then routes rows:
//! - a linear layer with LoRA computes the base once for the whole batch and adds each adapter's
//!   low-rank delta to its own rows only (PEFT's `_mixed_batch_forward`);
//! - IA3 vectors, trainable copies (`modules_to_save`) and bottleneck adapters replace the
//!   computation for their rows, which run as one sub-batch per adapter (AdapterHub's
//!   `BatchSplit`) and are put back in place.
//!
//! A tensor whose first dimension is a multiple `k` of the number of names (beam search's
//! `batch x num_beams` rows, laid out input by input) gives row `r` the name of input `r / k`.

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The name of "no adapter" in a mixed batch, as in PEFT.
pub const BASE: &str = "__base__";

/// The per-row adapter names of the batch being run, shared by every site.
#[derive(Clone, Debug, Default)]
pub struct BatchAdapters(Option<Arc<Vec<String>>>);

/// The rows of one adapter (`None`: the base) in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroup {
    /// The adapter, or `None` for [`BASE`].
    pub adapter: Option<String>,
    /// Its rows, ascending.
    pub rows: Vec<usize>,
}

impl BatchAdapters {
    /// Names for the rows of a batch.
    pub fn new(names: Vec<String>) -> Self {
        BatchAdapters(Some(Arc::new(names)))
    }

    /// No mixed batch is running (the active adapters apply to every row).
    pub fn none() -> Self {
        BatchAdapters(None)
    }

    /// Whether a mixed batch is running.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The groups of a tensor with `rows` rows, in order of first appearance; `None` when no
    /// mixed batch is running.
    ///
    /// # Panics
    /// When `rows` is not a multiple of the number of names: the model was called with another
    /// batch than the one the names describe.
    pub fn groups(&self, rows: usize) -> Option<Vec<RowGroup>> {
        let names = self.0.as_ref()?;
        let n = names.len();
        assert!(
            n > 0 && rows.is_multiple_of(n),
            "a mixed-adapter batch of {n} rows was given a tensor of {rows} rows"
        );
        let k = rows / n;
        let mut groups: Vec<RowGroup> = Vec::new();
        for r in 0..rows {
            let name = names[r / k].as_str();
            let adapter = (name != BASE).then(|| name.to_string());
            match groups.iter_mut().find(|g| g.adapter == adapter) {
                Some(g) => g.rows.push(r),
                None => groups.push(RowGroup {
                    adapter,
                    rows: vec![r],
                }),
            }
        }
        Some(groups)
    }
}

/// The row indices as an index tensor.
pub fn row_index<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let v: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(v, [rows.len()]), device)
}

/// Runs `f` on each group's rows of `x` and puts the results back in their rows (every row is
/// written once, so the values are exactly `f`'s).
pub fn per_group<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    groups: &[RowGroup],
    out_shape: impl FnOnce([usize; D]) -> [usize; D],
    mut f: impl FnMut(Option<&str>, Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let device = x.device();
    if let [only] = groups {
        return f(only.adapter.as_deref(), x);
    }
    let mut out = Tensor::<B, D>::zeros(out_shape(x.dims()), &device);
    for g in groups {
        let idx = row_index::<B>(&g.rows, &device);
        let y = f(g.adapter.as_deref(), x.clone().select(0, idx.clone()));
        out = out.select_assign(0, idx, y, burn::tensor::IndexingUpdateOp::Add);
    }
    out
}
