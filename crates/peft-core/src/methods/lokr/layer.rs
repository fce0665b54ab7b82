//! One LoKr adapter on one linear layer.

use burn::module::{Initializer, Module, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use super::config::LokrInit;
use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

/// PEFT's `factorization`: `dimension = m n` with `m <= n`, `m` equal to `factor` when it divides
/// `dimension`, else the divisor pair closest to a square root (with `m` at most `factor` when
/// `factor > 0`).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// One Kronecker factor: a full matrix (`lokr_wN`), or a rank-`r` product (`lokr_wN_a`
/// `[rows, r]`, `lokr_wN_b` `[r, cols]`).
#[derive(Module, Debug)]
pub struct LokrFactor<B: Backend> {
    /// The full matrix, when the factor is not decomposed.
    pub full: Option<Param<Tensor<B, 2>>>,
    /// The product's left side.
    pub a: Option<Param<Tensor<B, 2>>>,
    /// The product's right side.
    pub b: Option<Param<Tensor<B, 2>>>,
}

impl<B: Backend> LokrFactor<B> {
    fn full(w: Param<Tensor<B, 2>>) -> Self {
        LokrFactor {
            full: Some(w),
            a: None,
            b: None,
        }
    }

    fn product(a: Param<Tensor<B, 2>>, b: Param<Tensor<B, 2>>) -> Self {
        LokrFactor {
            full: None,
            a: Some(a),
            b: Some(b),
        }
    }

    fn value(&self) -> Tensor<B, 2> {
        match (&self.full, &self.a, &self.b) {
            (Some(w), _, _) => w.val(),
            (None, Some(a), Some(b)) => a.val().matmul(b.val()),
            _ => unreachable!("a LoKr factor is full or a product"),
        }
    }
}

/// One LoKr adapter on one linear layer, its tensors in PEFT's shapes; the weight change
/// (PyTorch layout, `[out, in]`) is `kron(w1, w2) * scaling`, `w1` `[a, c]` and `w2` `[b, d]`
/// with `out = a b`, `in = c d`.
#[derive(Module, Debug)]
pub struct LokrAdapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// The left factor.
    pub w1: LokrFactor<B>,
    /// The right factor.
    pub w2: LokrFactor<B>,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `alpha / r`.
    pub scaling: f64,
    /// Training: probability of dropping each output row of the weight change.
    pub rank_dropout: f64,
    /// Training: rescale the rows kept by the share kept.
    pub rank_dropout_scale: bool,
    /// Training: probability of skipping the adapter for a forward pass.
    pub module_dropout: f64,
}

/// What [`LokrAdapter::new`] needs besides the layer's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct LokrSpec {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `decompose_both`.
    pub decompose_both: bool,
    /// `decompose_factor`.
    pub decompose_factor: i64,
    /// `rank_dropout`.
    pub rank_dropout: f64,
    /// `rank_dropout_scale`.
    pub rank_dropout_scale: bool,
    /// `module_dropout`.
    pub module_dropout: f64,
    /// `init_weights`.
    pub init: LokrInit,
}

impl<B: Backend> LokrAdapter<B> {
    /// A LoKr adapter for a `d_input -> d_output` layer, shaped and initialised as PEFT's
    /// `LoKrLayer.update_layer` does. Parameters are lazy.
    pub fn new(
        name: &str,
        d_input: usize,
        d_output: usize,
        spec: &LokrSpec,
        device: &B::Device,
    ) -> Self {
        let r = spec.r;
        let (in_m, in_n) = factorization(d_input, spec.decompose_factor);
        let (out_l, out_k) = factorization(d_output, spec.decompose_factor);
        // use_w1 / use_w2: a full factor unless the rank is below half its larger side.
        let full1 = !(spec.decompose_both && (r as f64) < out_l.max(in_m) as f64 / 2.0);
        let full2 = (r as f64) >= out_k.max(in_n) as f64 / 2.0;
        // `kaiming_uniform_(a=sqrt(5))` on a `[rows, cols]` tensor: U(+-1/sqrt(cols)).
        let kaiming = |shape: [usize; 2]| {
            Initializer::KaimingUniform {
                gain: 1.0 / 3.0f64.sqrt(),
                fan_out_only: false,
            }
            .init_with(shape, Some(shape[1]), Some(shape[0]), device)
        };
        let zeros = |shape: [usize; 2]| Initializer::Zeros.init(shape, device);
        let w1 = if full1 {
            let shape = [out_l, in_m];
            LokrFactor::full(match spec.init {
                LokrInit::Default => zeros(shape),
                _ => kaiming(shape),
            })
        } else {
            LokrFactor::product(
                match spec.init {
                    LokrInit::Default => zeros([out_l, r]),
                    _ => kaiming([out_l, r]),
                },
                kaiming([r, in_m]),
            )
        };
        let w2 = if full2 {
            let shape = [out_k, in_n];
            LokrFactor::full(match spec.init {
                LokrInit::Lycoris => zeros(shape),
                _ => kaiming(shape),
            })
        } else {
            LokrFactor::product(
                kaiming([out_k, r]),
                match spec.init {
                    LokrInit::Lycoris => zeros([r, in_n]),
                    _ => kaiming([r, in_n]),
                },
            )
        };
        LokrAdapter {
            name: name.to_string(),
            w1,
            w2,
            r,
            alpha: spec.alpha,
            scaling: spec.alpha / r as f64,
            rank_dropout: spec.rank_dropout,
            rank_dropout_scale: spec.rank_dropout_scale,
            module_dropout: spec.module_dropout,
        }
    }

    /// The weight change in PyTorch's `[out, in]` layout: `kron(w1, w2) * scaling`.
    fn delta_weight_torch(&self) -> Tensor<B, 2> {
        let (w1, w2) = (self.w1.value(), self.w2.value());
        let ([a, c], [b, d]) = (w1.dims(), w2.dims());
        (w1.reshape([a, 1, c, 1]) * w2.reshape([1, b, 1, d]))
            .reshape([a * b, c * d])
            .mul_scalar(self.scaling)
    }

    /// The weight change in burn's `[in, out]` layout (what merging adds to the base weight).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.delta_weight_torch().transpose()
    }

    /// The adapter's contribution `x dW^T`. In training (autodiff backends), `module_dropout`
    /// may skip it (`None`) and `rank_dropout` drops output rows of `dW` (the rest scaled by
    /// `1 / share kept` with `rank_dropout_scale`), as PEFT's `LoKrLayer`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Option<Tensor<B, D>> {
        crate::methods::lycoris::delta_activations(
            x,
            || self.delta_weight_torch(),
            self.rank_dropout,
            self.rank_dropout_scale,
            self.module_dropout,
        )
    }
}

/// Writes `LokrAdapter`'s tensor list once, for the shared and the mutable walk.
macro_rules! lokr_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
            for (keys, factor) in [
                (["lokr_w1", "lokr_w1_a", "lokr_w1_b"], & $($m)? self.w1),
                (["lokr_w2", "lokr_w2_a", "lokr_w2_b"], & $($m)? self.w2),
            ] {
                for (key, p) in keys
                    .into_iter()
                    .zip([& $($m)? factor.full, & $($m)? factor.a, & $($m)? factor.b])
                {
                    if let Some(p) = p {
                        f(NamedParam {
                            key,
                            layout: FileLayout::AsIs,
                            param: $P::D2(p),
                        });
                    }
                }
            }
        }
    };
}

impl<B: Backend> AdapterParams<B> for LokrAdapter<B> {
    lokr_params!(visit_params, ParamRef);
    lokr_params!(visit_params_mut, ParamMut, mut);
}

#[cfg(test)]
mod tests {
    use super::factorization;

    #[test]
    fn factorization_is_peft_s() {
        // PEFT's docstring examples.
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
    }
}
