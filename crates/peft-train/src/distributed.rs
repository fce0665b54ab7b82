//! Data parallelism: several workers, each holding the frozen base and a shard of every batch,
//! take identical optimizer steps because the gradients of the trainable parameters (and only
//! those: for LoRA a few MB) are summed across workers before each step.
//!
//! The trainer talks to the other workers through one trait, [`Collective`]: an all-reduce
//! (sum) of a vector of `f32`. With the `collective` feature, [`WorkerGroup`] implements it on
//! Burn's own collective layer (`burn-collective`, one node per process, its global
//! orchestrator on rank 0), with a rendezvous and liveness monitor next to it so that a worker
//! that dies stops the others with an error naming it instead of leaving them waiting.
//!
//! What the trainer does with it (see [`Trainer::with_collective`](crate::Trainer::with_collective)):
//! - the global micro-batch is `per_device_train_batch_size x world_size` examples of the seeded
//!   data order, and rank `r` takes the `r`-th slice of it, so N workers with batch `b` see the
//!   batches one process with batch `N x b` sees;
//! - each worker weights its shard's mean loss by its share of the global micro-batch's loss
//!   targets ([`Task::count_targets`](crate::Task::count_targets)), so the summed gradient is
//!   the global batch's gradient even when shards hold different numbers of tokens;
//! - clipping, the learning rate and AdamW run on the reduced gradient, identical everywhere;
//! - a Ctrl-C on any worker is agreed through the same reduce, so all stop after the same step;
//! - evaluation is sharded and its sums reduced;
//! - rank 0 alone locks the output directory and writes checkpoints, metrics and the adapter.

use std::time::Duration;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::error::Result;

/// A group of data-parallel workers, as the trainer sees it.
pub trait Collective {
    /// This worker's rank, `0..world_size`. Rank 0 writes the output directory.
    fn rank(&self) -> usize;

    /// Workers in the group.
    fn world_size(&self) -> usize;

    /// Sums `data` elementwise over all workers; every worker gets bit-identical values back.
    /// Every worker must call it with a vector of the same length, in the same order.
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Result<Vec<f32>>;

    /// The run ended well on this worker: the others are told it leaves on purpose.
    fn finish(&mut self) {}

    /// The run failed on this worker with `reason`: the others are told, and stop.
    fn abort(&mut self, _reason: &str) {}
}

impl<C: Collective + ?Sized> Collective for &mut C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&mut self, data: Vec<f32>) -> Result<Vec<f32>> {
        (**self).all_reduce_sum(data)
    }
    fn finish(&mut self) {
        (**self).finish()
    }
    fn abort(&mut self, reason: &str) {
        (**self).abort(reason)
    }
}

/// Time and payload of the all-reduces of one optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReduceStats {
    /// Seconds spent waiting in the all-reduce.
    pub seconds: f64,
    /// Bytes of the reduced vector (gradients plus a few counters), per worker.
    pub payload_bytes: usize,
}

/// Times a call to [`Collective::all_reduce_sum`].
pub(crate) fn timed_reduce(
    c: &mut dyn Collective,
    data: Vec<f32>,
) -> Result<(Vec<f32>, ReduceStats)> {
    let payload_bytes = data.len() * 4;
    let t = std::time::Instant::now();
    let out = c.all_reduce_sum(data)?;
    Ok((
        out,
        ReduceStats {
            seconds: t.elapsed().as_secs_f64(),
            payload_bytes,
        },
    ))
}

/// Rows `[rank * per_rank, (rank + 1) * per_rank)` of a global micro-batch, clipped to its end.
pub(crate) fn shard<T>(global: &[T], per_rank: usize, rank: usize) -> &[T] {
    let start = (rank * per_rank).min(global.len());
    let end = ((rank + 1) * per_rank).min(global.len());
    &global[start..end]
}

/// Appends every trainable parameter's gradient (zeros where this worker has none) to `out`,
/// in module order, then one presence count per parameter. Module order is the same on every
/// worker because the model is.
pub(crate) fn flatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    out: &mut Vec<f32>,
) {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        out: &'a mut Vec<f32>,
        present: Vec<f32>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(g) => {
                    self.out.extend(g.into_data().iter::<f32>());
                    self.present.push(1.0);
                }
                None => {
                    let n = value.shape().num_elements();
                    self.out.extend(std::iter::repeat_n(0.0f32, n));
                    self.present.push(0.0);
                }
            }
        }
    }
    let mut v = Flatten {
        grads,
        out,
        present: Vec::new(),
    };
    module.visit(&mut v);
    let present = v.present;
    out.extend(present);
}

/// The inverse of [`flatten_grads`] over reduced values: every trainable parameter that some
/// worker had a gradient for gets the reduced gradient (times `scale`); the others get none,
/// as in one process. Returns the number of values read.
pub(crate) fn unflatten_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    reduced: &[f32],
) -> (GradientsParams, usize) {
    struct Count(usize, usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0 += value.shape().num_elements();
                self.1 += 1;
            }
        }
    }
    struct Unflatten<'a> {
        values: &'a [f32],
        present: &'a [f32],
        offset: usize,
        index: usize,
        grads: GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Unflatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if !value.is_require_grad() {
                return;
            }
            let shape = value.shape();
            let n = shape.num_elements();
            let slice = &self.values[self.offset..self.offset + n];
            self.offset += n;
            let present = self.present[self.index] > 0.0;
            self.index += 1;
            if present {
                let g = Tensor::<B::InnerBackend, D>::from_data(
                    TensorData::new(slice.to_vec(), shape),
                    &value.device(),
                );
                self.grads.register(param.id, g);
            }
        }
    }
    let mut count = Count(0, 0);
    module.visit(&mut count);
    let (values, rest) = reduced.split_at(count.0);
    let mut v = Unflatten {
        values,
        present: &rest[..count.1],
        offset: 0,
        index: 0,
        grads: GradientsParams::new(),
    };
    module.visit(&mut v);
    (v.grads, count.0 + count.1)
}

/// Appends every trainable parameter's value to `out`, in module order.
pub(crate) fn flatten_params<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    out: &mut Vec<f32>,
) {
    struct Values<'a>(&'a mut Vec<f32>);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Values<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            if value.is_require_grad() {
                self.0.extend(value.into_data().iter::<f32>());
            }
        }
    }
    module.visit(&mut Values(out));
}

/// A 64-bit value as four 16-bit chunks, exactly representable in `f32` and summable over up to
/// 256 workers without rounding: how workers compare their run fingerprints with one reduce.
pub(crate) fn chunks16(v: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|s| ((v >> s) & 0xFFFF) as f32)
}

/// How long a worker waits for the others (to join, or inside one all-reduce) before it gives
/// up, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(feature = "collective")]
mod group;
#[cfg(feature = "collective")]
pub use group::{WorkerGroup, WorldConfig};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_global_batch_in_order() {
        let global: Vec<usize> = (0..5).collect();
        assert_eq!(shard(&global, 4, 0), &[0, 1, 2, 3]);
        assert_eq!(shard(&global, 4, 1), &[4]);
        assert!(shard(&global, 4, 2).is_empty());
        assert_eq!(shard(&global, 2, 2), &[4]);
    }

    #[test]
    fn fingerprint_chunks_are_exact_in_f32() {
        let v = 0xFFFF_1234_ABCD_0001u64;
        let c = chunks16(v);
        let back = c
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, x)| acc | ((*x as u64) << (16 * i)));
        assert_eq!(back, v);
        // Summed over 256 workers, a chunk is still exact.
        assert_eq!(c[3] * 256.0, 65535.0 * 256.0);
    }
}
