//! Tensor operations the models call in their hot loops: the matrix product and the reshape.
//!
//! On every backend they mean what burn's `Tensor::matmul` and `Tensor::reshape` mean, and on
//! backends other than burn-ndarray they are exactly those calls. On burn-ndarray with `f32`
//! (`NdArray<f32>`, and `Autodiff<NdArray<f32>>` for training) they skip two costs of
//! burn-ndarray 0.21 (with the `ndarray` feature, on by default):
//!
//! - its `float_matmul` reshapes both operands to three dimensions, and its reshape copies even
//!   an array in standard layout (`to_shape` borrows, then `into_shared` copies), so every
//!   product copied its weight (the 66 MB LM head of mt0-small once per generated token), and
//!   every `reshape` of an activation copied it;
//! - a transposed or head-split operand (`swap_dims`) was made contiguous first.
//!
//! Here the product reads both operands where they lie, through their strides, with
//! [`peft_gemm::sgemm_strided`], and a reshape of a standard-layout array is a new view of the
//! same buffer. Under `Autodiff<NdArray<f32>>` both are autodiff operations of their own with
//! their backward pass (the product's gradients are products of the same kind on transposed
//! views), so training takes the same path. The product is the same `gemm` kernel that
//! burn-ndarray reaches through `cblas_sgemm`; results equal burn's up to the order of the
//! sums (a row-vector product, which burn-ndarray hands to `cblas_sgemv`, can round
//! differently).
//!
//! Anything else (another element type, broadcast batch dimensions, negative strides) falls
//! back to burn's own operation, and so does everything when the environment variable
//! `PEFT_HOST_OPS` is `burn` (read once per process; for side-by-side measurements with
//! `cargo xtask bench --compare-host-ops`).
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Tensor, TensorData};
//!
//! let device = Default::default();
//! let a = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]), &device);
//! let b = Tensor::<NdArray<f32>, 2>::from_data(TensorData::new(vec![5.0f32, 6.0, 7.0, 8.0], [2, 2]), &device);
//! let c = peft_core::ops::matmul(a.clone(), b.clone().transpose());
//! c.into_data().assert_eq(&a.matmul(b.transpose()).into_data(), true);
//! ```

use burn::tensor::Tensor;
#[cfg(feature = "ndarray")]
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::Backend;

/// Runs `f` on a worker thread of rayon's global pool and returns its result; the calling
/// thread waits. A thread outside the pool that calls these operations hands each parallel
/// kernel to sleeping workers and sleeps until they are done, hundreds of times per forward
/// pass. From inside the pool the kernels split their work with the thread that asked for
/// it. Measured on 2 cores: greedy generation about 10% faster, a LoRA training step about
/// 6% (`BENCHMARKS.md`). Results are the same either way: how the work is split does not
/// depend on which thread asks.
///
/// While `f` runs, the pool's other workers stay awake (the helpers of `ops/spin.rs`): each
/// runs the pending work of the pool until `f` returns, instead of sleeping between two
/// parallel kernels and being woken by the next one, and yields its core while there is
/// none, for at most a millisecond at a time. Measured on 2 cores: generation 6-15% faster,
/// inference about 8% (`BENCHMARKS.md`). `PEFT_POOL_SPIN=off` (read once) leaves the
/// workers to sleep as rayon does, for A/B measurements.
///
/// Called from a worker already, it runs `f` there (with the helpers, unless this thread
/// already runs an `on_pool` closure). The environment variable `PEFT_ON_POOL=off` (read at
/// each call) runs `f` on the calling thread instead, with no helpers, for A/B
/// measurements. Do not call it from a thread that must stay responsive with a long `f`:
/// a worker blocked in `f` is one thread fewer for other callers of the pool.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let sum = peft_core::ops::on_pool(|| {
///     let x = Tensor::<NdArray<f32>, 2>::ones([64, 64], &device);
///     peft_core::ops::matmul(x.clone(), x).sum().into_scalar()
/// });
/// assert_eq!(sum, 64.0 * 64.0 * 64.0);
/// ```
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var_os("PEFT_ON_POOL").is_some_and(|v| v.eq_ignore_ascii_case("off")) {
        return f();
    }
    if rayon::current_thread_index().is_some() {
        return spin::run(f);
    }
    rayon::join(|| spin::run(f), || ()).0
}

/// `lhs · rhs` over the last two dimensions, batched over the others: burn's
/// [`Tensor::matmul`], without copies on burn-ndarray (see the [module docs](self)).
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        return Tensor::from_primitive(TensorPrimitive::Float(host::matmul::<B>(l, r)));
    }
    lhs.matmul(rhs)
}

/// `x · weight` for `x` `[rows, in]`: [`matmul`], except that on burn-ndarray (without
/// autodiff) a product with at most [`peft_gemm::SMALL_M`] rows reads `weight`'s packed copy
/// from `pack` (when turned on), made at the second such product with the same weight
/// ([`DecodePack`]). The
/// values are the same either way. The decoding steps of generation take it through
/// [`crate::AdaptedLinear`].
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use peft_core::ops::{DecodePack, matmul, matmul_packed};
///
/// let device = Default::default();
/// let w = Tensor::<NdArray, 2>::random([256, 384], Distribution::Default, &device);
/// let x = Tensor::<NdArray, 2>::random([3, 256], Distribution::Default, &device);
/// let pack = DecodePack::default();
/// pack.on(); // a new slot does not pack
/// let first = matmul_packed(x.clone(), w.clone(), &pack); // in place; the weight is noted
/// let second = matmul_packed(x.clone(), w.clone(), &pack); // packs it, reads the copy
/// // Packed where the CPU has AVX2 and FMA (x86-64), unless PEFT_DECODE_PACK=off.
/// println!("packed: {} bytes", pack.bytes());
/// first.to_data().assert_eq(&matmul(x, w).into_data(), true);
/// second.into_data().assert_eq(&first.into_data(), true);
/// ```
pub fn matmul_packed<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    pack: &DecodePack,
) -> Tensor<B, 2> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() && x.dims()[0] <= peft_gemm::SMALL_M {
        let (l, r) = (
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        return match pack::host::matmul::<B>(l, r, pack) {
            Ok(y) => float(y),
            Err([l, r]) => matmul(float(l), float(r)),
        };
    }
    let _ = pack;
    matmul(x, weight)
}

/// burn's [`Tensor::reshape`] to a fully given shape, a view of the same buffer on burn-ndarray
/// when the input is in standard layout (see the [module docs](self)).
///
/// # Panics
/// When the element counts differ, as burn's reshape does.
pub fn reshape<B: Backend, const D1: usize, const D2: usize>(
    x: Tensor<B, D1>,
    shape: [usize; D2],
) -> Tensor<B, D2> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        assert_eq!(
            x.dims().iter().product::<usize>(),
            shape.iter().product::<usize>(),
            "reshape of {:?} to {shape:?}: element counts differ",
            x.dims()
        );
        let p = x.into_primitive().tensor();
        return Tensor::from_primitive(TensorPrimitive::Float(host::reshape::<B>(p, &shape)));
    }
    x.reshape(shape)
}

/// The positions `start..start + len` of dimension `dim`: burn's [`Tensor::narrow`], as a view
/// of the same buffer on burn-ndarray (whose slice copies). A KV cache with room to grow reads
/// its filled part through it. Autodiff and other backends take burn's `narrow`.
///
/// # Panics
/// As burn's `narrow`, when the range is out of bounds.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Tensor, TensorData};
///
/// let t = Tensor::<NdArray, 2>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]), &Default::default());
/// let n = peft_core::ops::narrow(t, 1, 1, 2);
/// n.into_data().assert_eq(&TensorData::new(vec![2.0f32, 3.0, 5.0, 6.0], [2, 2]), true);
/// ```
pub fn narrow<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    start: usize,
    len: usize,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        return match host::narrow::<B>(x.into_primitive().tensor(), dim, start, len) {
            Ok(y) => float(y),
            Err(x) => float::<B, D>(x).narrow(dim, start, len),
        };
    }
    x.narrow(dim, start, len)
}

/// For every row of the last dimension, the index of its largest value (the first one on a
/// tie): burn's `x.argmax(D - 1)` read into a `Vec`, row after row, with the same answers (a
/// NaN is never picked unless it comes first). Greedy decoding picks each step's tokens with
/// it. On burn-ndarray, one pass over each row where it lies: burn-ndarray's argmax walked
/// the `8 x 32128` logits of a decoding step through an index iterator, 0.5 ms a step.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Tensor, TensorData};
///
/// let t = Tensor::<NdArray, 2>::from_data(TensorData::new(vec![1.0f32, 3.0, 3.0, 5.0, 4.0, 0.0], [2, 3]), &Default::default());
/// assert_eq!(peft_core::ops::argmax_last(t), vec![1, 0]);
/// ```
pub fn argmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<usize> {
    #[cfg(feature = "ndarray")]
    let x = if host::is_host::<B>() {
        match host::argmax_last::<B>(x.into_primitive().tensor()) {
            Ok(ids) => return ids,
            Err(x) => float::<B, D>(x),
        }
    } else {
        x
    };
    let ids = x.argmax(D - 1).into_data().convert::<i64>();
    ids.iter::<i64>().map(|i| i as usize).collect()
}

/// `x` with `value` written at positions `start..start + len` of dimension `dim` (`len` is
/// `value`'s size there; the other dimensions equal `x`'s): burn's `slice_assign` over that
/// range. On burn-ndarray it writes into `x`'s buffer when no other tensor shares it, with a
/// plain loop: burn-ndarray's walked the `[8, 6, 1, 64]` keys of a decoding step through a
/// dynamic-rank iterator, about 1 ms a step over a decoder's caches. A KV cache appends
/// each step's keys and values through it. Elsewhere, burn's `slice_assign`.
///
/// # Panics
/// As burn's `slice_assign`, when the shapes do not fit.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Tensor, TensorData};
///
/// let device = Default::default();
/// let x = Tensor::<NdArray, 2>::zeros([2, 3], &device);
/// let v = Tensor::<NdArray, 2>::from_data(TensorData::new(vec![1.0f32, 2.0], [2, 1]), &device);
/// let y = peft_core::ops::assign_at(x, 1, 2, v);
/// y.into_data().assert_eq(&TensorData::new(vec![0.0f32, 0.0, 1.0, 0.0, 0.0, 2.0], [2, 3]), true);
/// ```
pub fn assign_at<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    start: usize,
    value: Tensor<B, D>,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let (x, value) = if host::is_host::<B>() {
        let (a, v) = (x.into_primitive().tensor(), value.into_primitive().tensor());
        match host::assign_at::<B>(a, dim, start, v) {
            Ok(y) => return float(y),
            Err([a, v]) => (float::<B, D>(a), float::<B, D>(v)),
        }
    } else {
        (x, value)
    };
    let len = value.dims()[dim];
    let ranges: [core::ops::Range<usize>; D] = core::array::from_fn(|d| {
        if d == dim {
            start..start + len
        } else {
            0..x.dims()[d]
        }
    });
    x.slice_assign(ranges, value)
}

/// `x` stored in standard (row-major) layout. On burn-ndarray, a tensor that is a transposed
/// or permuted view of another is copied (one pass per matrix, see [`matmul`]); so
/// `contiguous(k.swap_dims(2, 3)).swap_dims(2, 3)` is `k` with its last two axes swapped in
/// memory, which a product with `kᵀ` then reads with no copy. Elsewhere (autodiff, other
/// backends) `x` as it is: the values are the same either way.
pub fn contiguous<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        return float(host::contiguous::<B>(x.into_primitive().tensor()));
    }
    x
}

/// burn's `activation::softmax`, over the last dimension: one pass per row on burn-ndarray
/// (rows on rayon's threads, in place of five single-threaded passes and their temporaries),
/// with its own backward pass, `dx = y (g - sum(g y))`. Other backends, and other dimensions,
/// take burn's operation.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if dim + 1 == D && host::is_host::<B>() {
        match host::pointwise::<B>(x.into_primitive().tensor(), host::Pointwise::Softmax) {
            Ok(y) => return Tensor::from_primitive(TensorPrimitive::Float(y)),
            Err(x) => return burn::tensor::activation::softmax(float(x), dim),
        }
    }
    burn::tensor::activation::softmax(x, dim)
}

/// burn's `activation::log_softmax` over the last dimension: one pass per row on burn-ndarray
/// (rows on rayon's threads, in place of burn's max, subtract, exp, sum, log and subtract
/// passes), with its own backward pass, `dx = g - exp(y) sum(g)`. The cross-entropy over a
/// vocabulary of logits takes it. Other backends, and other dimensions, take burn's.
pub fn log_softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if dim + 1 == D && host::is_host::<B>() {
        match host::pointwise::<B>(x.into_primitive().tensor(), host::Pointwise::LogSoftmax) {
            Ok(y) => return Tensor::from_primitive(TensorPrimitive::Float(y)),
            Err(x) => return burn::tensor::activation::log_softmax(float(x), dim),
        }
    }
    burn::tensor::activation::log_softmax(x, dim)
}

/// `softmax(scores + bias)` over the last dimension, `bias` broadcast over the dimensions where
/// it has size 1 (T5's position bias `[1, heads, q, k]` plus its mask, BERT's mask
/// `[batch, 1, 1, k]`): attention's bias, mask and softmax in one pass per row on
/// burn-ndarray, with the backward pass for both inputs (the bias's gradient summed over its
/// broadcast dimensions). Elsewhere, burn's `softmax(scores + bias)`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Tensor, TensorData, Tolerance};
///
/// let device = Default::default();
/// let scores = Tensor::<NdArray, 4>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]), &device);
/// let mask = Tensor::<NdArray, 4>::from_data(TensorData::new(vec![0.0f32, f32::MIN], [1, 1, 1, 2]), &device);
/// let p = peft_core::ops::softmax_biased(scores, mask);
/// p.into_data().assert_approx_eq::<f32>(&TensorData::new(vec![1.0f32, 0.0, 1.0, 0.0], [1, 1, 2, 2]), Tolerance::default());
/// ```
pub fn softmax_biased<B: Backend, const D: usize>(
    scores: Tensor<B, D>,
    bias: Tensor<B, D>,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        let (s, b) = (
            scores.into_primitive().tensor(),
            bias.into_primitive().tensor(),
        );
        return match host::softmax_biased::<B>(s, b) {
            Ok(y) => float(y),
            Err([s, b]) => burn::tensor::activation::softmax(float::<B, D>(s) + float(b), D - 1),
        };
    }
    burn::tensor::activation::softmax(scores + bias, D - 1)
}

/// `lhs + rhs`: burn's `+`, in one pass on rayon's threads on burn-ndarray when both have
/// the same shape (residual connections), with the same values. Broadcasting operands and
/// other backends take burn's `+`.
pub fn add<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() && lhs.shape() == rhs.shape() {
        let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        return match host::elementwise::<B>(l, r, host::Elementwise::Add) {
            Ok(y) => float(y),
            Err([l, r]) => float::<B, D>(l) + float::<B, D>(r),
        };
    }
    lhs + rhs
}

/// `lhs + rhs * scale` (same shapes): burn's `lhs + rhs.mul_scalar(scale)` in one pass on
/// rayon's threads on burn-ndarray (a LoRA delta added to the base output), with the same
/// values and gradients; burn's operations elsewhere.
pub fn add_scaled<B: Backend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    scale: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() && lhs.shape() == rhs.shape() {
        let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        let kind = host::Elementwise::AddScaled(scale as f32);
        return match host::elementwise::<B>(l, r, kind) {
            Ok(y) => float(y),
            Err([l, r]) => float::<B, D>(l) + float::<B, D>(r).mul_scalar(scale),
        };
    }
    lhs + rhs.mul_scalar(scale)
}

/// `y + B(A(x)) * scaling`, with `bias` added to `B`'s output before the scaling: an unmerged
/// LoRA adapter's output on top of its base layer's (`a` is `[in, r]`, `b` is `[r, out]`).
///
/// On burn-ndarray without autodiff (inference and generation), with more than 8 rows, this
/// is one pass over the rows with burn's values bit for bit (see the kernel's module); with
/// fewer rows (a decoding step), under autodiff and on other backends it is burn's
/// operations ([`crate::nn::linear`] twice and [`add_scaled`]).
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
///
/// let dev = Default::default();
/// let y = Tensor::<NdArray, 2>::ones([2, 3], &dev);
/// let x = Tensor::<NdArray, 2>::ones([2, 4], &dev);
/// let a = Tensor::<NdArray, 2>::ones([4, 1], &dev);
/// let b = Tensor::<NdArray, 2>::ones([1, 3], &dev);
/// // 1 + (4 * 1) * 0.5 in every element.
/// let out = peft_core::ops::lora_add(y, x, a, b, None, 0.5);
/// assert_eq!(out.into_data().to_vec::<f32>().unwrap(), vec![3.0; 6]);
/// ```
pub fn lora_add<B: Backend, const D: usize>(
    y: Tensor<B, D>,
    x: Tensor<B, D>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    scaling: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let y = if host::is_host::<B>() {
        let fused = host::lora_add::<B>(
            y.into_primitive().tensor(),
            x.clone().into_primitive().tensor(),
            a.clone().into_primitive().tensor(),
            b.clone().into_primitive().tensor(),
            bias.clone().map(|t| t.into_primitive().tensor()),
            scaling as f32,
        );
        match fused {
            Ok(out) => return float(out),
            Err(y) => float(y),
        }
    } else {
        y
    };
    let delta = crate::nn::linear(crate::nn::linear(x, a, None), b, bias);
    add_scaled(y, delta, scaling)
}

/// `lhs * rhs` element by element: burn's `*`, in one pass on rayon's threads on
/// burn-ndarray when both have the same shape (the gated feed-forward's `act(x W0) * x W1`),
/// with the same values and gradients. Broadcasting operands and other backends take
/// burn's `*`.
pub fn mul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() && lhs.shape() == rhs.shape() {
        let (l, r) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
        return match host::elementwise::<B>(l, r, host::Elementwise::Mul) {
            Ok(y) => float(y),
            Err([l, r]) => float::<B, D>(l) * float::<B, D>(r),
        };
    }
    lhs * rhs
}

/// `gelu_tanh(a) * c` element by element (the gated feed-forward's `gelu_new(x W0) * x W1`):
/// [`mul`] of [`crate::nn::gelu_tanh`], with the same values. On burn-ndarray without
/// autodiff, when both have the same shape, one pass on rayon's threads instead of two (the
/// activation's output is never written out and read back). With autodiff, and on other
/// backends, the two operations.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let a = Tensor::<NdArray, 2>::from_floats([[-1.0, 0.0, 2.0]], &device);
/// let c = Tensor::<NdArray, 2>::from_floats([[3.0, 4.0, 0.5]], &device);
/// let fused = peft_core::ops::gelu_tanh_mul(a.clone(), c.clone());
/// let apart = peft_core::ops::mul(peft_core::nn::gelu_tanh(a), c);
/// fused.into_data().assert_eq(&apart.into_data(), true);
/// ```
pub fn gelu_tanh_mul<B: Backend, const D: usize>(a: Tensor<B, D>, c: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    let (a, c) = if host::is_host::<B>() && a.shape() == c.shape() {
        let (pa, pc) = (a.into_primitive().tensor(), c.into_primitive().tensor());
        match host::gelu_tanh_mul::<B>(pa, pc) {
            Ok(y) => return float(y),
            Err([a, c]) => (float::<B, D>(a), float::<B, D>(c)),
        }
    } else {
        (a, c)
    };
    mul(crate::nn::gelu_tanh(a), c)
}

/// T5's RMS norm over the last dimension, `x / sqrt(mean(x^2) + eps) * weight`: one pass per
/// row on burn-ndarray (rows on rayon's threads), with the backward pass for `x` and `weight`.
/// Elsewhere, the same formula in burn's operations.
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        let (p, w) = (
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        return match host::rms_norm::<B>(p, w, eps as f32) {
            Ok(y) => float(y),
            Err([p, w]) => rms_norm_composite(float::<B, D>(p), float(w), eps),
        };
    }
    rms_norm_composite(x, weight, eps)
}

fn rms_norm_composite<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let var = (x.clone() * x.clone()).mean_dim(D - 1);
    let x = x * (var + eps).sqrt().recip();
    x * weight.unsqueeze()
}

/// [`crate::nn::gelu_tanh`] in one pass on burn-ndarray (the same `f32` operations in the
/// same order, so the same values, on rayon's threads), with its analytic backward pass;
/// `None` where it does not apply, and `x` back.
pub(crate) fn gelu_tanh_host<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    #[cfg(feature = "ndarray")]
    if host::is_host::<B>() {
        return host::pointwise::<B>(x.into_primitive().tensor(), host::Pointwise::GeluTanh)
            .map(float)
            .map_err(float);
    }
    Err(x)
}

/// Dropout on burn-ndarray ([`crate::dropout`]): `x * mask` in one pass on rayon's threads,
/// the mask drawn from `stream` in the same pass and kept as one bit per element for the
/// backward pass (`g * mask`). The values are those of the product with the mask as values;
/// `x` back where it does not apply.
#[cfg(feature = "ndarray")]
pub(crate) fn dropout_host<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    stream: &crate::dropout::MaskStream,
    scale: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if host::is_host::<B>() {
        return host::dropout::<B>(x.into_primitive().tensor(), stream, scale)
            .map(float)
            .map_err(float);
    }
    Err(x)
}

/// One AdamW step on burn-ndarray ([`crate::optim`]): the moments updated in place and the
/// parameter written once, in chunks on rayon's threads, with burn's `f32` operations in
/// burn's order. The inputs back where it does not apply (another backend, not `f32`, not in
/// standard layout, shapes that differ).
#[cfg(feature = "ndarray")]
#[allow(clippy::type_complexity)]
pub(crate) fn adamw_host<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<(Tensor<B, D>, Tensor<B, D>)>,
    step: crate::optim::AdamWStep,
) -> Result<
    (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>),
    (
        Tensor<B, D>,
        Tensor<B, D>,
        Option<(Tensor<B, D>, Tensor<B, D>)>,
    ),
> {
    if !host::is_host::<B>() {
        return Err((tensor, grad, moments));
    }
    let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
    let moments = moments.map(|(m, v)| (prim(m), prim(v)));
    match host::adamw::<B>(prim(tensor), prim(grad), moments, step) {
        Ok((p, m, v)) => Ok((float(p), float(m), float(v))),
        Err((p, g, mv)) => Err((float(p), float(g), mv.map(|(m, v)| (float(m), float(v))))),
    }
}

#[cfg(feature = "ndarray")]
fn float<B: Backend, const D: usize>(p: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

#[cfg(feature = "ndarray")]
mod lora_kernel;
mod pack;
mod spin;

pub use pack::DecodePack;

#[cfg(feature = "ndarray")]
mod host {
    use core::any::{Any, TypeId};

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
    use burn::backend::ndarray::NdArrayTensor;
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::Shape;
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use std::mem::MaybeUninit;

    use ndarray::{ArcArray, ArrayViewD, CowArray, IxDyn};
    use rayon::prelude::*;

    /// A new vector's `n` elements, not yet written: the kernels below write every element of
    /// their output (no zeroing pass first), then [`filled`] gives it back.
    fn unwritten(n: usize) -> Vec<f32> {
        Vec::with_capacity(n)
    }

    /// `out` once its first `n` elements (all of them) were written through
    /// [`Vec::spare_capacity_mut`].
    ///
    /// # Safety
    /// Every element of `out.spare_capacity_mut()[..n]` was written.
    unsafe fn filled(mut out: Vec<f32>, n: usize) -> Vec<f32> {
        // SAFETY: the caller's contract; `n` is within the capacity it wrote.
        unsafe { out.set_len(n) };
        out
    }

    /// The same slice, read as values once every element was written.
    ///
    /// # Safety
    /// Every element of `o` was written.
    unsafe fn written(o: &mut [MaybeUninit<f32>]) -> &mut [f32] {
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and every element is initialised.
        unsafe { &mut *(o as *mut [MaybeUninit<f32>] as *mut [f32]) }
    }

    type Nd = NdArray<f32>;
    type Ad = Autodiff<Nd>;
    type AdTensor = FloatTensor<Ad>;

    /// Whether `B` is one of the two backends this module handles (and the copy-free path is
    /// not switched off with `PEFT_HOST_OPS=burn`, read once, for A/B measurements).
    pub(super) fn is_host<B: Backend>() -> bool {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let id = TypeId::of::<B>();
        (id == TypeId::of::<Nd>() || id == TypeId::of::<Ad>())
            && !*OFF.get_or_init(|| {
                std::env::var("PEFT_HOST_OPS").is_ok_and(|v| v.eq_ignore_ascii_case("burn"))
            })
    }

    /// `t` as a `U`, when `T` and `U` are the same type.
    pub(super) fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
        let mut slot = Some(t);
        match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
            Some(u) => Ok(u.take().expect("just filled")),
            None => Err(slot.take().expect("just filled")),
        }
    }

    /// Runs a host kernel on primitives of `B` (one of the two host backends). On NdArray, the
    /// kernel alone. Under autodiff, the kernel on the inner arrays, then `op` recorded with the
    /// state that `state` builds from the inputs, whether each is tracked, the output and the
    /// kernel's extra result (only when some input is tracked). The inputs come back when the
    /// kernel declines (`None`: not `f32`, or shapes it does not handle).
    #[allow(clippy::type_complexity)]
    fn run<B: Backend, O: Backward<Nd, N>, X, const N: usize>(
        inputs: [FloatTensor<B>; N],
        kernel: impl Fn(&[NdArrayTensor; N]) -> Option<(NdArrayTensor, X)>,
        op: O,
        state: impl FnOnce(&[NdArrayTensor; N], [bool; N], &NdArrayTensor, X) -> O::State,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; N]> {
        let inputs = match cast::<_, [NdArrayTensor; N]>(inputs) {
            Ok(nd) => {
                return match kernel(&nd) {
                    Some((y, _)) => Ok(back::<B, _>(y)),
                    None => Err(nd.map(back::<B, _>)),
                };
            }
            Err(inputs) => inputs,
        };
        let ad: [AdTensor; N] = cast(inputs).unwrap_or_else(|_| unreachable!("is_host checked B"));
        let prims = ad.each_ref().map(|t| t.primitive.clone());
        let Some((y, extra)) = kernel(&prims) else {
            return Err(ad.map(back::<B, _>));
        };
        let out = match op
            .prepare::<NoCheckpointing>(ad.each_ref().map(|t| t.node.clone()))
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let tracked = ad.each_ref().map(|t| t.is_tracked());
                prep.finish(state(&prims, tracked, &y, extra), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Ok(back::<B, _>(out))
    }

    /// `run` for a kernel that never declines (it falls back to burn-ndarray's own operation).
    fn run_total<B: Backend, O: Backward<Nd, N>, const N: usize>(
        inputs: [FloatTensor<B>; N],
        kernel: impl Fn(&[NdArrayTensor; N]) -> NdArrayTensor,
        op: O,
        state: impl FnOnce(&[NdArrayTensor; N], [bool; N]) -> O::State,
    ) -> FloatTensor<B> {
        run::<B, O, (), N>(
            inputs,
            |t| Some((kernel(t), ())),
            op,
            |t, tracked, _, _| state(t, tracked),
        )
        .unwrap_or_else(|_| unreachable!("the kernel always answers"))
    }

    pub(super) fn matmul<B: Backend>(lhs: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
        run_total::<B, _, 2>(
            [lhs, rhs],
            |[l, r]| nd_matmul(l, r, false, false, true),
            HostMatmul,
            // Each gradient needs the other operand.
            |[l, r], [l_tracked, r_tracked]| {
                (r_tracked.then(|| l.clone()), l_tracked.then(|| r.clone()))
            },
        )
    }

    pub(super) fn reshape<B: Backend>(x: FloatTensor<B>, shape: &[usize]) -> FloatTensor<B> {
        run_total::<B, _, 1>(
            [x],
            |[x]| nd_reshape(x.clone(), shape),
            HostReshape,
            |[x], _| burn::tensor::TensorMetadata::shape(x).to_vec(),
        )
    }

    /// A primitive of `B` (NdArray's or autodiff's) back as `B`'s.
    pub(super) fn back<B: Backend, T: 'static>(t: T) -> FloatTensor<B> {
        cast(t).unwrap_or_else(|_| unreachable!("B's own primitive"))
    }

    /// A view of positions `start..start + len` of axis `dim`, on plain NdArray `f32`; the
    /// input back otherwise (autodiff, another dtype, out of bounds).
    pub(super) fn narrow<B: Backend>(
        x: FloatTensor<B>,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<FloatTensor<B>, FloatTensor<B>> {
        match cast::<_, NdArrayTensor>(x)? {
            NdArrayTensor::F32(storage)
                if dim < storage.shape().len()
                    && start
                        .checked_add(len)
                        .is_some_and(|end| end <= storage.shape()[dim]) =>
            {
                let mut a = storage.into_shared();
                a.slice_axis_inplace(ndarray::Axis(dim), ndarray::Slice::from(start..start + len));
                Ok(back::<B, _>(NdArrayTensor::from(a)))
            }
            other => Err(back::<B, _>(other)),
        }
    }

    /// [`super::assign_at`] on plain NdArray `f32` whose buffer no other tensor shares; the
    /// inputs back otherwise (shared, another dtype, shapes that do not fit).
    pub(super) fn assign_at<B: Backend>(
        x: FloatTensor<B>,
        dim: usize,
        start: usize,
        value: FloatTensor<B>,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        let x = match cast::<_, NdArrayTensor>(x) {
            Ok(x) => x,
            Err(x) => return Err([x, value]),
        };
        let v = match cast::<_, NdArrayTensor>(value) {
            Ok(v) => v,
            Err(v) => return Err([back::<B, _>(x), v]),
        };
        let fits = |xs: &[usize], vs: &[usize]| {
            xs.len() == vs.len()
                && dim < xs.len()
                && xs.iter().zip(vs).enumerate().all(|(d, (&a, &b))| {
                    if d == dim {
                        start.checked_add(b).is_some_and(|end| end <= a)
                    } else {
                        a == b
                    }
                })
        };
        match (x, v) {
            (NdArrayTensor::F32(xs), NdArrayTensor::F32(vs))
                if xs.is_unique() && fits(xs.shape(), vs.shape()) =>
            {
                let mut a = xs.into_shared();
                let src = vs.view();
                let len = src.shape()[dim];
                let mut dst =
                    a.slice_axis_mut(ndarray::Axis(dim), ndarray::Slice::from(start..start + len));
                copy_strided(&mut dst, &src);
                Ok(back::<B, _>(NdArrayTensor::from(a)))
            }
            (x, v) => Err([back::<B, _>(x), back::<B, _>(v)]),
        }
    }

    /// `dst := src` (the same shape), element by element through both arrays' strides, the
    /// last axis in the inner loop.
    fn copy_strided(dst: &mut ndarray::ArrayViewMutD<'_, f32>, src: &ArrayViewD<'_, f32>) {
        let shape = src.shape().to_vec();
        if shape.contains(&0) {
            return;
        }
        let (ds, ss) = (dst.strides().to_vec(), src.strides().to_vec());
        let last = shape.len() - 1;
        let (d_base, s_base) = (dst.as_mut_ptr(), src.as_ptr());
        let mut index = vec![0usize; last];
        loop {
            let (mut d_off, mut s_off) = (0isize, 0isize);
            for (axis, &i) in index.iter().enumerate() {
                d_off += i as isize * ds[axis];
                s_off += i as isize * ss[axis];
            }
            for j in 0..shape[last] as isize {
                // SAFETY: the index is inside both arrays' (equal) shapes, so the offsets
                // through their strides are inside their buffers; dst and src do not overlap
                // (dst's buffer is unique to it).
                unsafe {
                    *d_base.offset(d_off + j * ds[last]) = *s_base.offset(s_off + j * ss[last])
                };
            }
            // The next index over the outer axes (an odometer), or done.
            let mut axis = last;
            loop {
                if axis == 0 {
                    return;
                }
                axis -= 1;
                index[axis] += 1;
                if index[axis] < shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
    }

    /// [`super::argmax_last`] on plain NdArray `f32`; the input back otherwise.
    pub(super) fn argmax_last<B: Backend>(x: FloatTensor<B>) -> Result<Vec<usize>, FloatTensor<B>> {
        match cast::<_, NdArrayTensor>(x)? {
            NdArrayTensor::F32(storage) if storage.shape().last().is_some_and(|&n| n > 0) => {
                let view = storage.view();
                let axis = ndarray::Axis(view.ndim() - 1);
                Ok(view
                    .lanes(axis)
                    .into_iter()
                    .map(|lane| match lane.as_slice() {
                        Some(row) => first_max_row(row),
                        None => first_max(lane.iter()),
                    })
                    .collect())
            }
            other => Err(back::<B, _>(other)),
        }
    }

    /// [`first_max`] on a contiguous row, in two passes the compiler vectorizes: the largest
    /// value (each lane keeps `x` only when `x > best`, so a NaN never enters unless it comes
    /// first, as in [`first_max`]), then the first position holding it.
    fn first_max_row(row: &[f32]) -> usize {
        const LANES: usize = 16;
        let Some(&first) = row.first() else { return 0 };
        if first.is_nan() {
            return 0;
        }
        let mut best = [first; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (b, &x) in best.iter_mut().zip(chunk) {
                *b = if x > *b { x } else { *b };
            }
        }
        let max = best
            .iter()
            .chain(tail)
            .fold(first, |m, &x| if x > m { x } else { m });
        row.iter().position(|&x| x == max).unwrap_or(0)
    }

    /// The index of the first largest value (burn-ndarray's rule: a later value replaces the
    /// best only when strictly greater, starting from the first).
    fn first_max<'a>(mut xs: impl Iterator<Item = &'a f32>) -> usize {
        let Some(&first) = xs.next() else { return 0 };
        let (mut best, mut at) = (first, 0);
        for (i, &x) in xs.enumerate() {
            if x > best {
                (best, at) = (x, i + 1);
            }
        }
        at
    }

    /// `x` in standard layout on plain NdArray `f32` ([`standard`]); as it is otherwise.
    pub(super) fn contiguous<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        match cast::<_, NdArrayTensor>(x) {
            Ok(NdArrayTensor::F32(storage)) if !storage.view().is_standard_layout() => {
                let copy = standard(&storage.view()).into_owned();
                back::<B, _>(NdArrayTensor::from(copy.into_shared()))
            }
            Ok(other) => back::<B, _>(other),
            Err(x) => x,
        }
    }

    /// [`super::adamw_host`] on plain NdArray.
    #[allow(clippy::type_complexity)]
    pub(super) fn adamw<B: Backend>(
        p: FloatTensor<B>,
        g: FloatTensor<B>,
        mv: Option<(FloatTensor<B>, FloatTensor<B>)>,
        step: crate::optim::AdamWStep,
    ) -> Result<
        (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
        (
            FloatTensor<B>,
            FloatTensor<B>,
            Option<(FloatTensor<B>, FloatTensor<B>)>,
        ),
    > {
        let p = match cast::<_, NdArrayTensor>(p) {
            Ok(p) => p,
            Err(p) => return Err((p, g, mv)),
        };
        let nd = |t: FloatTensor<B>| -> NdArrayTensor {
            cast(t).unwrap_or_else(|_| unreachable!("the same backend as the parameter"))
        };
        let (g, mv) = (nd(g), mv.map(|(m, v)| (nd(m), nd(v))));
        let shape = burn::tensor::TensorMetadata::shape(&p).to_vec();
        let usable = |t: &NdArrayTensor| {
            matches!(t, NdArrayTensor::F32(s)
                if s.view().is_standard_layout() && s.shape() == shape.as_slice())
        };
        if !(usable(&p) && usable(&g) && mv.as_ref().is_none_or(|(m, v)| usable(m) && usable(v))) {
            let back_nd = |t: NdArrayTensor| back::<B, _>(t);
            return Err((
                back_nd(p),
                back_nd(g),
                mv.map(|(m, v)| (back_nd(m), back_nd(v))),
            ));
        }
        let NdArrayTensor::F32(ps) = p else {
            unreachable!("checked f32 above")
        };
        let first = mv.is_none();
        let mut pa = ps.into_shared();
        let (mut ma, mut va) = match mv {
            Some((NdArrayTensor::F32(m), NdArrayTensor::F32(v))) => {
                (m.into_shared(), v.into_shared())
            }
            Some(_) => unreachable!("checked f32 above"),
            None => (
                ArcArray::zeros(IxDyn(pa.shape())),
                ArcArray::zeros(IxDyn(pa.shape())),
            ),
        };
        {
            let gv = view(&g).expect("f32");
            let gs = gv.as_slice().expect("standard layout, checked");
            // Unique buffers (copied first if shared), in standard layout (checked).
            let ps = pa.as_slice_mut().expect("standard layout");
            let ms = ma.as_slice_mut().expect("standard layout");
            let vs = va.as_slice_mut().expect("standard layout");
            let s = step;
            ps.par_chunks_mut(CHUNK)
                .zip(ms.par_chunks_mut(CHUNK))
                .zip(vs.par_chunks_mut(CHUNK))
                .zip(gs.par_chunks(CHUNK))
                .for_each(|(((p, m), v), g)| {
                    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                        let g2 = g * g;
                        let (mm, vv) = if first {
                            (g * s.factor_1, g2 * s.factor_2)
                        } else {
                            (
                                *m * s.beta_1 + g * s.factor_1,
                                *v * s.beta_2 + g2 * s.factor_2,
                            )
                        };
                        *m = mm;
                        *v = vv;
                        let delta =
                            (mm / s.correction_1) / ((vv / s.correction_2).sqrt() + s.epsilon);
                        *p = *p * s.keep - delta * s.lr;
                    }
                });
        }
        let out = |a: ArcArray<f32, IxDyn>| back::<B, _>(NdArrayTensor::from(a));
        Ok((out(pa), out(ma), out(va)))
    }

    /// The element-wise operations done in one pass here.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Pointwise {
        /// transformers' `gelu_new` as `x / (exp(-c x (1 + 0.044715 x^2)) + 1)`.
        GeluTanh,
        /// Softmax over the last axis.
        Softmax,
        /// Log-softmax over the last axis.
        LogSoftmax,
    }

    /// `2 sqrt(2 / pi)` as `nn::gelu_tanh`'s `mul_scalar` rounds it.
    fn gelu_c() -> f32 {
        (-(2.0 * (2.0 / std::f64::consts::PI).sqrt())) as f32
    }

    /// Elements per rayon task of the element-wise kernels.
    const CHUNK: usize = 1 << 14;

    /// The largest value of a row; NaN wins (`f32::max` would drop it): the last NaN of the
    /// row, as a left-to-right scan returns it.
    ///
    /// Eight running maxima (one per lane, so the loop vectorises), then the lanes in order;
    /// a row with a NaN is scanned again, one element at a time. Without NaN the value is the
    /// scan's, except that of equal maxima `0.0` and `-0.0` either may come back, which
    /// changes nothing downstream (`x - max` and `exp` do not see the sign of a zero `max`).
    fn row_max(row: &[f32]) -> f32 {
        let scan = |m: f32, v: f32| if v > m || v.is_nan() { v } else { m };
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut nan = false;
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (m, &v) in lanes.iter_mut().zip(c) {
                nan |= v.is_nan();
                *m = if v > *m { v } else { *m };
            }
        }
        if nan {
            return row.iter().copied().fold(f32::NEG_INFINITY, scan);
        }
        let m = lanes.into_iter().fold(f32::NEG_INFINITY, scan);
        rest.iter().copied().fold(m, scan)
    }

    /// The sum of a row in eight lanes (lane `i` adds the elements at `i`, `i + 8`, ...), the
    /// lanes then added pairwise, then the last `len % 8` elements in order. Not the
    /// left-to-right sum (burn's order), so the softmaxes agree with burn's to rounding; the
    /// order is fixed by the row's length alone, so a row's sum does not depend on its batch.
    pub(super) fn lane_sum(row: &[f32]) -> f32 {
        let mut lanes = [0.0; 8];
        let rest = add_lanes(&mut lanes, row);
        close_lanes(lanes, rest)
    }

    /// Adds `xs` into eight lanes (lane `i` takes elements `i`, `i + 8`, ...) and returns its
    /// last `len % 8` elements, not added.
    fn add_lanes<'a>(lanes: &mut [f32; 8], xs: &'a [f32]) -> &'a [f32] {
        let chunks = xs.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (s, &v) in lanes.iter_mut().zip(c) {
                *s += v;
            }
        }
        rest
    }

    /// The lanes added pairwise, then `rest` in order: the end of [`lane_sum`].
    fn close_lanes(lanes: [f32; 8], rest: &[f32]) -> f32 {
        let [a, b, c, d, e, f, g, h] = lanes;
        rest.iter()
            .fold(((a + e) + (b + f)) + ((c + g) + (d + h)), |s, &v| s + v)
    }

    /// The log-softmax of one row, in place: `(x - max) - ln(sum(exp(x - max)))`, as burn's
    /// composite computes it (the sum in [`lane_sum`]'s order). NaN wins the maximum, as in
    /// [`softmax_in_place`]. The exponentials go through [`exp_in_place`] (`f32::exp`'s
    /// values) a block at a time, in a buffer on the stack.
    fn log_softmax_in_place(row: &mut [f32]) {
        const BLOCK: usize = 512;
        let max = row_max(row);
        row.iter_mut().for_each(|v| *v -= max);
        let mut buf = [0.0f32; BLOCK];
        let mut lanes = [0.0f32; 8];
        // Every block but the last is a multiple of 8 long, so the lanes run on unbroken.
        let (blocks, mut sum) = (row.len().div_ceil(BLOCK), 0.0);
        for (i, block) in row.chunks(BLOCK).enumerate() {
            let e = &mut buf[..block.len()];
            e.copy_from_slice(block);
            exp_in_place(e);
            let rest = add_lanes(&mut lanes, e);
            if i + 1 == blocks {
                sum = close_lanes(lanes, rest);
            }
        }
        let lse = sum.ln();
        row.iter_mut().for_each(|v| *v -= lse);
    }

    /// The softmax of one row, in place: `exp(x - max) / sum`, as burn's composite computes it.
    /// NaN wins the maximum (`f32::max` would drop it), as it wins the sum.
    pub(super) fn softmax_in_place(row: &mut [f32]) {
        let max = row_max(row);
        let sum = exp_shifted(row, max);
        row.iter_mut().for_each(|v| *v /= sum);
    }

    /// `row[j] = exp(row[j] - max)` for every `j`, and the sum of the results (in
    /// [`lane_sum`]'s order). The exponentials are [`exp_in_place`]'s, the values of
    /// `f32::exp`.
    pub(super) fn exp_shifted(row: &mut [f32], max: f32) -> f32 {
        row.iter_mut().for_each(|v| *v -= max);
        exp_in_place(row);
        lane_sum(row)
    }

    /// `x = exp(x)` for every element, with the values of `f32::exp`, bit for bit: with AVX2
    /// and FMA, eight at a time by [`vexp::exp_avx2`], a lane-wise copy of glibc's `expf` (which
    /// is what `f32::exp` calls on Linux), else one at a time with `f32::exp`. The copy is
    /// used only after [`vexp::matches_libm`] has found it equal to `f32::exp` on this
    /// machine.
    pub(super) fn exp_in_place(xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if vexp::matches_libm() {
            if vexp::wide_matches_libm() {
                // SAFETY: `wide_matches_libm` is true only with AVX-512F present.
                unsafe { vexp::exp_avx512(xs) };
            } else {
                // SAFETY: `matches_libm` is true only with AVX2 and FMA present.
                unsafe { vexp::exp_avx2(xs) };
            }
            return;
        }
        xs.iter_mut().for_each(|v| *v = v.exp());
    }

    /// Whether [`exp_in_place`] takes the eight-lane path on this machine.
    #[cfg(test)]
    pub(super) fn vector_exp() -> bool {
        #[cfg(target_arch = "x86_64")]
        return vexp::matches_libm();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[cfg(target_arch = "x86_64")]
    pub(crate) mod vexp {
        use core::arch::x86_64::*;

        /// glibc's `__exp2f_data.tab`: `bits(2^(i/32)) - (i << 47)` (correctly rounded
        /// doubles; the same values come out of computing them).
        const TAB: [u64; 32] = [
            0x3ff0000000000000,
            0x3fefd9b0d3158574,
            0x3fefb5586cf9890f,
            0x3fef9301d0125b51,
            0x3fef72b83c7d517b,
            0x3fef54873168b9aa,
            0x3fef387a6e756238,
            0x3fef1e9df51fdee1,
            0x3fef06fe0a31b715,
            0x3feef1a7373aa9cb,
            0x3feedea64c123422,
            0x3feece086061892d,
            0x3feebfdad5362a27,
            0x3feeb42b569d4f82,
            0x3feeab07dd485429,
            0x3feea47eb03a5585,
            0x3feea09e667f3bcd,
            0x3fee9f75e8ec5f74,
            0x3feea11473eb0187,
            0x3feea589994cce13,
            0x3feeace5422aa0db,
            0x3feeb737b0cdc5e5,
            0x3feec49182a3f090,
            0x3feed503b23e255d,
            0x3feee89f995ad3ad,
            0x3feeff76f2fb5e47,
            0x3fef199bdd85529c,
            0x3fef3720dcef9069,
            0x3fef5818dcfba487,
            0x3fef7c97337b9b5f,
            0x3fefa4afa2a490da,
            0x3fefd0765b6e4540,
        ];
        /// `32 / ln 2`, the rounding shift `1.5 * 2^52`, and the polynomial for `2^(r/32)`.
        const INV_LN2_N: f64 = f64::from_bits(0x40471547652b82fe);
        const SHIFT: f64 = f64::from_bits(0x4338000000000000);
        const C: [f64; 3] = [
            f64::from_bits(0x3ebc6af84b912394),
            f64::from_bits(0x3f2ebfce50fac4f3),
            f64::from_bits(0x3f962e42ff0c52d6),
        ];

        /// Whether [`exp_avx2`] may stand in for `f32::exp` here: the CPU has AVX2 and FMA, and
        /// on a sweep of 2^20 inputs over the whole range it takes (`|x| < 88`) the two
        /// agree bit for bit. Checked once per process (a few milliseconds).
        pub(super) fn matches_libm() -> bool {
            static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *OK.get_or_init(|| {
                if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
                {
                    return false;
                }
                // SAFETY: AVX2 and FMA are present (checked above).
                sweep_matches(|xs| unsafe { exp_avx2(xs) })
            })
        }

        /// Whether `exp` gives `f32::exp`'s values on every 2^11-th bit pattern of each sign
        /// below 88.0 (so every exponent and table entry is met).
        fn sweep_matches(exp: impl FnOnce(&mut [f32])) -> bool {
            let mut xs: Vec<f32> = (0..0x42b0_0000u32)
                .step_by(1 << 11)
                .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
                .collect();
            let want: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
            exp(&mut xs);
            xs.iter().map(|y| y.to_bits()).eq(want)
        }

        /// Whether [`exp_avx512`] may stand in for `f32::exp` here: [`matches_libm`], the CPU
        /// has AVX-512F (unless `PEFT_HOST_AVX512=off`), and the sweep of [`matches_libm`]
        /// agrees bit for bit through it too.
        pub(super) fn wide_matches_libm() -> bool {
            static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *OK.get_or_init(|| {
                if !matches_libm()
                    || !std::is_x86_feature_detected!("avx512f")
                    || std::env::var("PEFT_HOST_AVX512")
                        .is_ok_and(|v| v.eq_ignore_ascii_case("off"))
                {
                    return false;
                }
                // SAFETY: AVX-512F, AVX2 and FMA are present (checked above).
                sweep_matches(|xs| unsafe { exp_avx512(xs) })
            })
        }

        /// [`exp_avx2`] sixteen at a time in 512-bit registers (eight doubles each), the
        /// table read by two two-register permutes instead of a gather; the same operations
        /// per lane, so the same values. The last `len % 16` go through [`exp_avx2`].
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub(crate) fn exp_avx512(xs: &mut [f32]) {
            // SAFETY: TAB is 32 u64, read as four vectors of eight.
            let tab: [__m512i; 4] =
                unsafe { [0, 8, 16, 24].map(|i| _mm512_loadu_si512(TAB.as_ptr().add(i).cast())) };
            let mut lanes = xs.chunks_exact_mut(16);
            for v in &mut lanes {
                // SAFETY: `v` holds exactly 16 floats (unaligned loads and stores).
                unsafe {
                    let x = _mm512_loadu_ps(v.as_ptr());
                    let top =
                        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7ff0_0000));
                    if _mm512_cmpgt_epi32_mask(top, _mm512_set1_epi32(0x42a0_0000)) != 0 {
                        v.iter_mut().for_each(|v| *v = v.exp());
                        continue;
                    }
                    let lo = exp8(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), &tab);
                    let hi = exp8(
                        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                            _mm512_castps_pd(x),
                        ))),
                        &tab,
                    );
                    let y = _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                        _mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(lo))),
                        _mm256_castps_pd(_mm512_cvtpd_ps(hi)),
                    ));
                    _mm512_storeu_ps(v.as_mut_ptr(), y);
                }
            }
            exp_avx2(lanes.into_remainder());
        }

        /// [`exp4`] on eight lanes.
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn exp8(x: __m512d, tab: &[__m512i; 4]) -> __m512d {
            let inv = _mm512_set1_pd(INV_LN2_N);
            let shift = _mm512_set1_pd(SHIFT);
            let kd = _mm512_fmadd_pd(inv, x, shift);
            let ki = _mm512_castpd_si512(kd);
            let kd = _mm512_sub_pd(kd, shift);
            let r = _mm512_fmsub_pd(inv, x, kd);
            // Entries 0..16 and 16..32 by the index's low four bits, then bit 4 picks one.
            let low = _mm512_permutex2var_epi64(tab[0], ki, tab[1]);
            let high = _mm512_permutex2var_epi64(tab[2], ki, tab[3]);
            let upper = _mm512_test_epi64_mask(ki, _mm512_set1_epi64(16));
            let t = _mm512_mask_blend_epi64(upper, low, high);
            let s = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64::<47>(ki)));
            let z = _mm512_fmadd_pd(_mm512_set1_pd(C[0]), r, _mm512_set1_pd(C[1]));
            let r2 = _mm512_mul_pd(r, r);
            let y = _mm512_fmadd_pd(_mm512_set1_pd(C[2]), r, _mm512_set1_pd(1.0));
            let y = _mm512_fmadd_pd(z, r2, y);
            _mm512_mul_pd(y, s)
        }

        /// `exp` of every element; eight at a time where all eight are below 88 in
        /// magnitude (glibc's main path), `f32::exp` for the rest (overflow, underflow, NaN
        /// and infinities, which glibc treats apart).
        #[target_feature(enable = "avx2,fma")]
        pub(crate) fn exp_avx2(xs: &mut [f32]) {
            let mut lanes = xs.chunks_exact_mut(8);
            for v in &mut lanes {
                // SAFETY: `v` holds exactly 8 floats (unaligned loads and stores).
                unsafe {
                    let x = _mm256_loadu_ps(v.as_ptr());
                    let top =
                        _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7ff0_0000));
                    let big = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(0x42a0_0000));
                    if _mm256_testz_si256(big, big) == 0 {
                        v.iter_mut().for_each(|v| *v = v.exp());
                        continue;
                    }
                    let lo = exp4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
                    let hi = exp4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
                    let y = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
                    _mm256_storeu_ps(v.as_mut_ptr(), y);
                }
            }
            lanes.into_remainder().iter_mut().for_each(|v| *v = v.exp());
        }

        /// glibc's `expf` main path on four lanes, in `f64`, with the fused multiply-adds
        /// of its FMA build (`__expf_fma`): `x 32 / ln 2 = k + r`, `exp(x) = 2^(k/32)
        /// 2^(r/32)`, `2^(k/32)` from the table with `k / 32` added to its exponent, `2^(r/32)`
        /// a cubic in `r`; rounded to `f32` at the end.
        #[target_feature(enable = "avx2,fma")]
        fn exp4(x: __m256d) -> __m256d {
            let inv = _mm256_set1_pd(INV_LN2_N);
            let shift = _mm256_set1_pd(SHIFT);
            let kd = _mm256_fmadd_pd(inv, x, shift);
            let ki = _mm256_castpd_si256(kd);
            let kd = _mm256_sub_pd(kd, shift);
            let r = _mm256_fmsub_pd(inv, x, kd);
            let index = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
            // SAFETY: every index is in 0..32 (masked above), inside TAB.
            let t = unsafe { _mm256_i64gather_epi64::<8>(TAB.as_ptr().cast(), index) };
            let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
            let z = _mm256_fmadd_pd(_mm256_set1_pd(C[0]), r, _mm256_set1_pd(C[1]));
            let r2 = _mm256_mul_pd(r, r);
            let y = _mm256_fmadd_pd(_mm256_set1_pd(C[2]), r, _mm256_set1_pd(1.0));
            let y = _mm256_fmadd_pd(z, r2, y);
            _mm256_mul_pd(y, s)
        }
    }

    /// `kind` applied to `x` (contiguous, `f32`) into a new array of its shape.
    fn nd_pointwise(x: &NdArrayTensor, kind: Pointwise) -> Option<NdArrayTensor> {
        let v = view(x)?;
        let shape = v.shape().to_vec();
        let v = standard(&v);
        let xs = v.as_slice()?;
        let n = xs.len();
        let mut out = unwritten(n);
        match kind {
            Pointwise::GeluTanh => {
                let c = gelu_c();
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(o, x)| with_avx2(|| gelu_chunk(o, x, c)));
            }
            Pointwise::Softmax | Pointwise::LogSoftmax => {
                let row = *shape.last()?;
                if row == 0 {
                    return Some(NdArrayTensor::from(
                        ArcArray::from_shape_vec(IxDyn(&shape), Vec::<f32>::new()).ok()?,
                    ));
                }
                let log = matches!(kind, Pointwise::LogSoftmax);
                let rows = (CHUNK / row).max(1) * row;
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(rows)
                    .zip(xs.par_chunks(rows))
                    .for_each(|(o, x)| {
                        for (o, x) in o.chunks_mut(row).zip(x.chunks(row)) {
                            let o = o.write_copy_of_slice(x);
                            if log {
                                log_softmax_in_place(o);
                            } else {
                                softmax_in_place(o);
                            }
                        }
                    });
            }
        }
        // SAFETY: both kinds wrote every element, chunk by chunk.
        let out = unsafe { filled(out, n) };
        Some(NdArrayTensor::from(
            ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?,
        ))
    }

    /// gelu (tanh form) of a chunk into `o` (every element written): the operations of
    /// `nn::gelu_tanh`'s composite, in its order, the exponentials eight at a time (the same
    /// values).
    #[inline(always)]
    fn gelu_chunk(o: &mut [MaybeUninit<f32>], x: &[f32], c: f32) {
        for (o, &x) in o.iter_mut().zip(x) {
            let t = x * x * 0.044_715f32 + 1.0;
            o.write(x * t * c);
        }
        // SAFETY: the loop above wrote every element of the chunk.
        let o = unsafe { written(o) };
        exp_in_place(o);
        for (o, &x) in o.iter_mut().zip(x) {
            *o = x / (*o + 1.0);
        }
    }

    /// gelu's input gradient for a chunk into `o` (every element written): `y = x s(z)`,
    /// `z = -c x (1 + a x^2)` with `c < 0` here, so `dy/dx = s + x s (1 - s) (-c) (1 + 3 a
    /// x^2)`. The exponentials go eight at a time through [`exp_in_place`] (the values of
    /// `f32::exp`), so the gradient is what one `exp` per element gave, bit for bit.
    #[inline(always)]
    fn gelu_backward_chunk(o: &mut [MaybeUninit<f32>], x: &[f32], g: &[f32], c: f32) {
        for (o, &x) in o.iter_mut().zip(x) {
            o.write(x * (x * x * 0.044_715f32 + 1.0) * c);
        }
        // SAFETY: the loop above wrote every element of the chunk.
        let o = unsafe { written(o) };
        exp_in_place(o);
        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
            let s = 1.0 / (*o + 1.0);
            let dz = -c * (1.0 + 3.0 * 0.044_715f32 * x * x);
            *o = g * (s + x * s * (1.0 - s) * dz);
        }
    }

    /// `f()`, compiled for AVX2 where the CPU has it, so that its loops go eight lanes at a
    /// time. Rust never contracts or reorders floating-point operations, so the values are
    /// those of the plain build.
    #[inline(always)]
    fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            #[target_feature(enable = "avx2")]
            fn run<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: AVX2 is present.
            return unsafe { run(f) };
        }
        f()
    }

    /// The input gradient of `kind` at input `x`, output `y`, output gradient `g`.
    fn nd_pointwise_backward(
        kind: Pointwise,
        x: &NdArrayTensor,
        y: &NdArrayTensor,
        g: &NdArrayTensor,
    ) -> NdArrayTensor {
        let (x, y, g) = (
            view(x).expect("f32 input"),
            view(y).expect("f32 output"),
            view(g).expect("f32 gradient"),
        );
        // Borrowed when already contiguous (the usual case), copied otherwise.
        let (x, y, g) = (standard(&x), standard(&y), standard(&g));
        let shape = g.shape().to_vec();
        let (xs, ys, gs) = (
            x.as_slice().expect("standard"),
            y.as_slice().expect("standard"),
            g.as_slice().expect("standard"),
        );
        let n = gs.len();
        let mut out = unwritten(n);
        match kind {
            Pointwise::GeluTanh => {
                let c = gelu_c();
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
                    .for_each(|(o, (x, g))| with_avx2(|| gelu_backward_chunk(o, x, g, c)));
            }
            Pointwise::Softmax | Pointwise::LogSoftmax => {
                // Softmax: dx = y (g - sum(g y)). Log-softmax, y = x - max - ln(sum(exp(x -
                // max))): dx = g - exp(y) sum(g). Per row.
                let log = matches!(kind, Pointwise::LogSoftmax);
                let row = *shape.last().expect("at least one axis");
                if let Some(per_task) = CHUNK.checked_div(row) {
                    let rows = per_task.max(1) * row;
                    out.spare_capacity_mut()[..n]
                        .par_chunks_mut(rows)
                        .zip(ys.par_chunks(rows).zip(gs.par_chunks(rows)))
                        .for_each(|(o, (y, g))| {
                            for (o, (y, g)) in
                                o.chunks_mut(row).zip(y.chunks(row).zip(g.chunks(row)))
                            {
                                if log {
                                    // exp(y) eight at a time (`f32::exp`'s values), then
                                    // g - exp(y) * total.
                                    let total = lane_sum(g);
                                    let o = o.write_copy_of_slice(y);
                                    exp_in_place(o);
                                    for (o, &g) in o.iter_mut().zip(g) {
                                        *o = g - *o * total;
                                    }
                                } else {
                                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                                        o.write(y * (g - dot));
                                    }
                                }
                            }
                        });
                }
            }
        }
        // SAFETY: every kind wrote every element (with an empty last axis there are none).
        let out = unsafe { filled(out, n) };
        NdArrayTensor::from(
            ArcArray::from_shape_vec(IxDyn(&shape), out).expect("shape of the gradient"),
        )
    }

    /// `softmax(s + bias)` over the last axis into a new array; `None` unless both hold `f32`,
    /// `bias` broadcasts to `s`'s shape, and the last axis is not empty.
    fn nd_softmax_biased(s: &NdArrayTensor, bias: &NdArrayTensor) -> Option<NdArrayTensor> {
        let (sv, bv) = (view(s)?, view(bias)?);
        let shape = sv.shape().to_vec();
        let row = *shape.last()?;
        if row == 0 || bv.ndim() != sv.ndim() {
            return None;
        }
        let bv = bv.broadcast(IxDyn(&shape))?;
        let sv = standard(&sv);
        let xs = sv.as_slice()?;
        let (b_strides, b_ptr) = (bv.strides().to_vec(), SharedPtr(bv.as_ptr()));
        let nd = shape.len();
        let n = xs.len();
        let mut out = unwritten(n);
        let rows_per_task = (CHUNK / row).max(1);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(rows_per_task * row)
            .zip(xs.par_chunks(rows_per_task * row))
            .enumerate()
            .for_each(|(task, (o, x))| {
                let base = b_ptr.get();
                for (i, (o, x)) in o.chunks_mut(row).zip(x.chunks(row)).enumerate() {
                    // The bias row of row `r`: its multi-index through the bias's strides.
                    let mut r = task * rows_per_task + i;
                    let mut offset = 0isize;
                    for axis in (0..nd - 1).rev() {
                        offset += (r % shape[axis]) as isize * b_strides[axis];
                        r /= shape[axis];
                    }
                    let last = b_strides[nd - 1];
                    for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                        // SAFETY: the broadcast view covers every (row, j) at these offsets.
                        o.write(x + unsafe { *base.offset(offset + j as isize * last) });
                    }
                    // SAFETY: the loop above wrote every element of the row.
                    softmax_in_place(unsafe { written(o) });
                }
            });
        // SAFETY: the rows cover all `n` elements, each written above.
        let out = unsafe { filled(out, n) };
        Some(NdArrayTensor::from(
            ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?,
        ))
    }

    /// The softmax's input gradient summed down to `shape` over the axes where `shape` has
    /// size 1 and the gradient does not (the broadcast bias's gradient).
    fn reduce_to(grad: NdArrayTensor, shape: &[usize]) -> NdArrayTensor {
        let dims = view(&grad).expect("f32 gradient").shape().to_vec();
        let mut grad = grad;
        for (axis, (&g, &b)) in dims.iter().zip(shape).enumerate() {
            if b == 1 && g != 1 {
                grad = Nd::float_sum_dim(grad, axis);
            }
        }
        grad
    }

    /// The biased softmax as an autodiff operation.
    #[derive(Debug)]
    struct HostSoftmaxBiased;

    impl Backward<Nd, 2> for HostSoftmaxBiased {
        /// The output and the bias's shape.
        type State = (NdArrayTensor, Vec<usize>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (y, bias_shape) = ops.state;
            let dz = |g: NdArrayTensor| nd_pointwise_backward(Pointwise::Softmax, &y, &y, &g);
            binary::<Nd, _, _>(ops.parents, ops.node, grads, dz, |g| {
                reduce_to(dz(g), &bias_shape)
            });
        }
    }

    /// [`super::softmax_biased`] on primitives of `B` (one of the two host backends), or both
    /// inputs back when it does not apply.
    pub(super) fn softmax_biased<B: Backend>(
        s: FloatTensor<B>,
        bias: FloatTensor<B>,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        run::<B, _, _, 2>(
            [s, bias],
            |[s, bias]| Some((nd_softmax_biased(s, bias)?, ())),
            HostSoftmaxBiased,
            |[_, bias], _, y, ()| {
                (
                    y.clone(),
                    burn::tensor::TensorMetadata::shape(bias).to_vec(),
                )
            },
        )
    }

    /// RMS norm of `x`'s rows (`f32`, last axis `d`) scaled by `w` (`[d]`): the output and
    /// each row's `1 / sqrt(mean(x^2) + eps)`.
    fn nd_rms_norm(
        x: &NdArrayTensor,
        w: &NdArrayTensor,
        eps: f32,
    ) -> Option<(NdArrayTensor, Vec<f32>)> {
        let (xv, wv) = (view(x)?, view(w)?);
        let shape = xv.shape().to_vec();
        let d = *shape.last()?;
        if d == 0 || wv.shape() != [d] {
            return None;
        }
        let (xv, wv) = (standard(&xv), standard(&wv));
        let (xs, ws) = (xv.as_slice()?, wv.as_slice()?);
        let (n, rows) = (xs.len(), xs.len() / d);
        let mut out = unwritten(n);
        let mut inv = vec![0.0f32; rows];
        let per_task = (CHUNK / d).max(1);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(per_task * d)
            .zip(inv.par_chunks_mut(per_task))
            .zip(xs.par_chunks(per_task * d))
            .for_each(|((o, inv), x)| {
                for ((o, r), x) in o.chunks_mut(d).zip(inv.iter_mut()).zip(x.chunks(d)) {
                    let mean = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                    *r = (mean + eps).sqrt().recip();
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(ws) {
                        o.write(x * *r * w);
                    }
                }
            });
        // SAFETY: the rows cover all `n` elements (`d` divides `n`), each written above.
        let out = unsafe { filled(out, n) };
        Some((
            NdArrayTensor::from(ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?),
            inv,
        ))
    }

    /// The RMS norm as an autodiff operation.
    #[derive(Debug)]
    struct HostRmsNorm;

    impl Backward<Nd, 2> for HostRmsNorm {
        /// Input, weight, and each row's `1 / rms`.
        type State = (NdArrayTensor, NdArrayTensor, Vec<f32>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, w, inv) = ops.state;
            let xv = view(&x).expect("f32 input");
            let shape = xv.shape().to_vec();
            let xv = standard(&xv);
            let wv = view(&w).expect("f32 weight");
            let wv = standard(&wv);
            let (xs, ws) = (
                xv.as_slice().expect("standard"),
                wv.as_slice().expect("standard"),
            );
            let d = ws.len();
            let per_task = (CHUNK / d).max(1);
            binary::<Nd, _, _>(
                ops.parents,
                ops.node,
                grads,
                |g| {
                    // dx = r (g w) - x r^3 mean((g w) x), per row.
                    let gv = view(&g).expect("f32 gradient");
                    let gv = standard(&gv);
                    let gs = gv.as_slice().expect("standard");
                    let n = gs.len();
                    let mut out = unwritten(n);
                    out.spare_capacity_mut()[..n]
                        .par_chunks_mut(per_task * d)
                        .zip(gs.par_chunks(per_task * d).zip(xs.par_chunks(per_task * d)))
                        .zip(inv.par_chunks(per_task))
                        .for_each(|((o, (g, x)), inv)| {
                            for (((o, g), x), &r) in
                                o.chunks_mut(d).zip(g.chunks(d)).zip(x.chunks(d)).zip(inv)
                            {
                                let dot: f32 =
                                    g.iter().zip(ws).zip(x).map(|((g, w), x)| g * w * x).sum();
                                let k = r * r * r * dot / d as f32;
                                for (((o, &g), &w), &x) in o.iter_mut().zip(g).zip(ws).zip(x) {
                                    o.write(r * g * w - x * k);
                                }
                            }
                        });
                    // SAFETY: the rows cover all `n` elements, each written above.
                    let out = unsafe { filled(out, n) };
                    NdArrayTensor::from(
                        ArcArray::from_shape_vec(IxDyn(&shape), out).expect("input's shape"),
                    )
                },
                |g| {
                    // dw = sum over rows of g x r: partial sums per task, added in task order.
                    let gv = view(&g).expect("f32 gradient");
                    let gv = standard(&gv);
                    let gs = gv.as_slice().expect("standard");
                    let partial: Vec<Vec<f32>> = gs
                        .par_chunks(per_task * d)
                        .zip(xs.par_chunks(per_task * d).zip(inv.par_chunks(per_task)))
                        .map(|(g, (x, inv))| {
                            let mut acc = vec![0.0f32; d];
                            for ((g, x), &r) in g.chunks(d).zip(x.chunks(d)).zip(inv) {
                                for ((a, &g), &x) in acc.iter_mut().zip(g).zip(x) {
                                    *a += g * x * r;
                                }
                            }
                            acc
                        })
                        .collect();
                    let mut dw = vec![0.0f32; d];
                    for p in partial {
                        dw.iter_mut().zip(p).for_each(|(a, p)| *a += p);
                    }
                    NdArrayTensor::from(
                        ArcArray::from_shape_vec(IxDyn(&[d]), dw).expect("weight's shape"),
                    )
                },
            );
        }
    }

    /// [`super::rms_norm`] on primitives of `B` (one of the two host backends), or both
    /// inputs back when it does not apply.
    pub(super) fn rms_norm<B: Backend>(
        x: FloatTensor<B>,
        w: FloatTensor<B>,
        eps: f32,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        run::<B, _, _, 2>(
            [x, w],
            |[x, w]| nd_rms_norm(x, w, eps),
            HostRmsNorm,
            |[x, w], _, _, inv| (x.clone(), w.clone(), inv),
        )
    }

    /// An element-wise operation as an autodiff operation.
    #[derive(Debug)]
    struct HostPointwise(Pointwise);

    impl Backward<Nd, 1> for HostPointwise {
        /// Input and output.
        type State = (NdArrayTensor, NdArrayTensor);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, y) = ops.state;
            unary::<Nd, _>(ops.parents, ops.node, grads, |g| {
                nd_pointwise_backward(self.0, &x, &y, &g)
            });
        }
    }

    /// `kind` on a primitive of `B` (one of the two host backends), or the input back when it
    /// does not hold `f32`.
    pub(super) fn pointwise<B: Backend>(
        x: FloatTensor<B>,
        kind: Pointwise,
    ) -> Result<FloatTensor<B>, FloatTensor<B>> {
        run::<B, _, _, 1>(
            [x],
            |[x]| Some((nd_pointwise(x, kind)?, ())),
            HostPointwise(kind),
            |[x], _, y, ()| (x.clone(), y.clone()),
        )
        .map_err(|[x]| x)
    }

    /// [`super::gelu_tanh_mul`] on plain NdArray `f32` (no autodiff) of one shape: each
    /// chunk's gelu as [`Pointwise::GeluTanh`] computes it, then times `c`'s elements, in the
    /// same task. The inputs back elsewhere.
    pub(super) fn gelu_tanh_mul<B: Backend>(
        a: FloatTensor<B>,
        c: FloatTensor<B>,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        let a = match cast::<_, NdArrayTensor>(a) {
            Ok(a) => a,
            Err(a) => return Err([a, c]),
        };
        let c = match cast::<_, NdArrayTensor>(c) {
            Ok(c) => c,
            Err(c) => return Err([back::<B, _>(a), c]),
        };
        match nd_gelu_tanh_mul(&a, &c) {
            Some(y) => Ok(back::<B, _>(y)),
            None => Err([back::<B, _>(a), back::<B, _>(c)]),
        }
    }

    /// `gelu_tanh(a) * c` into a new array of their (equal) shape; `None` unless both hold
    /// `f32` in that shape.
    fn nd_gelu_tanh_mul(a: &NdArrayTensor, c: &NdArrayTensor) -> Option<NdArrayTensor> {
        let (av, cv) = (view(a)?, view(c)?);
        if av.shape() != cv.shape() {
            return None;
        }
        let shape = av.shape().to_vec();
        let (av, cv) = (standard(&av), standard(&cv));
        let (xs, ys) = (av.as_slice()?, cv.as_slice()?);
        let n = xs.len();
        let k = gelu_c();
        let mut out = unwritten(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(ys.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| {
                with_avx2(|| {
                    gelu_chunk(o, x, k);
                    // SAFETY: `gelu_chunk` wrote every element of the chunk.
                    let o = unsafe { written(o) };
                    for (o, &y) in o.iter_mut().zip(y) {
                        *o *= y;
                    }
                })
            });
        // SAFETY: every chunk was written above.
        let out = unsafe { filled(out, n) };
        Some(NdArrayTensor::from(
            ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?,
        ))
    }

    /// The element-wise binary operations of [`super::add`] and [`super::mul`].
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Elementwise {
        Add,
        Mul,
        /// `x + y * scale`, `scale` rounded to `f32` as burn's `mul_scalar` rounds it.
        AddScaled(f32),
    }

    /// `f(x[j], y[j])` for every `j`, into a new vector, in chunks on rayon's threads.
    fn zip_map(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
        let n = xs.len().min(ys.len());
        let mut out = unwritten(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(ys.par_chunks(CHUNK)))
            .for_each(|(o, (x, y))| {
                for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                    o.write(f(x, y));
                }
            });
        // SAFETY: the chunks cover all `n` elements, and each was written above.
        unsafe { filled(out, n) }
    }

    /// `f(x[j])` for every `j`, into a new vector, in chunks on rayon's threads.
    fn map(xs: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let mut out = unwritten(xs.len());
        out.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    o.write(f(x));
                }
            });
        // SAFETY: the chunks cover all `xs.len()` elements, and each was written above.
        unsafe { filled(out, xs.len()) }
    }

    /// `x op y` for two `f32` arrays of the same shape, in standard layout (copied into it
    /// when they are not); `None` otherwise.
    fn nd_elementwise(
        x: &NdArrayTensor,
        y: &NdArrayTensor,
        kind: Elementwise,
    ) -> Option<NdArrayTensor> {
        let (xv, yv) = (view(x)?, view(y)?);
        if xv.shape() != yv.shape() {
            return None;
        }
        let shape = xv.shape().to_vec();
        let (xv, yv) = (standard(&xv), standard(&yv));
        let (xs, ys) = (xv.as_slice()?, yv.as_slice()?);
        let out = match kind {
            Elementwise::Add => zip_map(xs, ys, |x, y| x + y),
            Elementwise::Mul => zip_map(xs, ys, |x, y| x * y),
            Elementwise::AddScaled(scale) => zip_map(xs, ys, |x, y| x + y * scale),
        };
        Some(NdArrayTensor::from(
            ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?,
        ))
    }

    /// An element-wise binary operation as an autodiff operation. Addition passes the
    /// gradient to both operands; multiplication multiplies it by the other operand, as
    /// burn's backward passes do.
    #[derive(Debug)]
    struct HostElementwise(Elementwise);

    impl Backward<Nd, 2> for HostElementwise {
        /// For a product, the operands the gradients need: `lhs` when `rhs` is tracked, and
        /// the reverse.
        type State = (Option<NdArrayTensor>, Option<NdArrayTensor>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (lhs, rhs) = ops.state;
            let times = |g: NdArrayTensor, other: Option<NdArrayTensor>| {
                let other = other.expect("kept for the gradient");
                nd_elementwise(&g, &other, Elementwise::Mul)
                    .unwrap_or_else(|| Nd::float_mul(g, other))
            };
            match self.0 {
                Elementwise::Add => {
                    binary::<Nd, _, _>(ops.parents, ops.node, grads, |g| g, |g| g);
                }
                Elementwise::AddScaled(scale) => {
                    binary::<Nd, _, _>(
                        ops.parents,
                        ops.node,
                        grads,
                        |g| g,
                        |g| {
                            let v = view(&g).expect("f32 gradient");
                            let shape = v.shape().to_vec();
                            let v = standard(&v);
                            let out = map(v.as_slice().expect("standard"), |x| x * scale);
                            NdArrayTensor::from(
                                ArcArray::from_shape_vec(IxDyn(&shape), out)
                                    .expect("shape of the gradient"),
                            )
                        },
                    );
                }
                Elementwise::Mul => binary::<Nd, _, _>(
                    ops.parents,
                    ops.node,
                    grads,
                    |g| times(g, rhs),
                    |g| times(g, lhs),
                ),
            }
        }
    }

    /// [`super::add`] / [`super::mul`] on primitives of `B` (one of the two host backends), or
    /// both back when they do not apply.
    pub(super) fn elementwise<B: Backend>(
        lhs: FloatTensor<B>,
        rhs: FloatTensor<B>,
        kind: Elementwise,
    ) -> Result<FloatTensor<B>, [FloatTensor<B>; 2]> {
        run::<B, _, _, 2>(
            [lhs, rhs],
            |[l, r]| Some((nd_elementwise(l, r, kind)?, ())),
            HostElementwise(kind),
            move |[l, r], [l_tracked, r_tracked], _, ()| match kind {
                Elementwise::Add | Elementwise::AddScaled(_) => (None, None),
                Elementwise::Mul => (r_tracked.then(|| l.clone()), l_tracked.then(|| r.clone())),
            },
        )
    }

    /// [`super::lora_add`] on plain NdArray `f32` (no autodiff), into `y`'s buffer when no
    /// other tensor shares it: `y` comes back unchanged elsewhere, or when the kernel
    /// declines (no AVX2, shapes that disagree).
    pub(super) fn lora_add<B: Backend>(
        y: FloatTensor<B>,
        x: FloatTensor<B>,
        a: FloatTensor<B>,
        b: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        scale: f32,
    ) -> Result<FloatTensor<B>, FloatTensor<B>> {
        let y = cast::<_, NdArrayTensor>(y)?;
        let Some(lora) = LoraOperands::new::<B>(x, a, b, bias) else {
            return Err(back::<B, _>(y));
        };
        // The shapes agree, and the pass gives burn's values for them: `x A`'s depth blocks
        // (checked before `y` is touched, so that a declined call copies nothing).
        let kc = view(&y).and_then(|v| {
            let same = v.ndim() == lora.x.ndim()
                && v.shape()[..v.ndim() - 1] == lora.x.shape()[..v.ndim() - 1]
                && v.shape()[v.ndim() - 1] == lora.n;
            if !same {
                return None;
            }
            super::lora_kernel::blocks(v.len() / lora.n.max(1), lora.k, lora.r, lora.n)
        });
        let NdArrayTensor::F32(storage) = y else {
            return Err(back::<B, _>(y));
        };
        let Some(kc) = kc else {
            return Err(back::<B, _>(NdArrayTensor::F32(storage)));
        };
        // Unique in standard layout (the base layer's fresh output): in place. Otherwise a
        // standard-layout copy of it.
        let mut ya = storage.into_shared();
        if !ya.is_standard_layout() {
            ya = ya.as_standard_layout().into_owned().into_shared();
        }
        let (x, a, b) = (lora.x.view(), lora.a.view(), lora.b.view());
        let (xv, av, bv) = (standard(&x), standard(&a), standard(&b));
        let biasv = lora.bias.as_ref().map(|t| t.view());
        let biasv = biasv.as_ref().map(standard);
        let slices = (|| {
            Some(super::lora_kernel::Lora {
                x: xv.as_slice()?,
                a: av.as_slice()?,
                b: bv.as_slice()?,
                bias: match &biasv {
                    Some(v) => Some(v.as_slice()?),
                    None => None,
                },
                k: lora.k,
                r: lora.r,
                n: lora.n,
                kc,
                scale,
            })
        })();
        let done = match (slices, ya.as_slice_mut()) {
            (Some(l), Some(ys)) => super::lora_kernel::lora_add(ys, &l).is_some(),
            _ => false,
        };
        let y = NdArrayTensor::from(ya);
        if done {
            Ok(back::<B, _>(y))
        } else {
            Err(back::<B, _>(y))
        }
    }

    /// The adapter's operands of [`lora_add`], checked: `x` `[.., k]`, `a` `[k, r]`, `b`
    /// `[r, n]`, `bias` `[n]`, all `f32`.
    struct LoraOperands {
        x: ndarray::ArcArray<f32, IxDyn>,
        a: ndarray::ArcArray<f32, IxDyn>,
        b: ndarray::ArcArray<f32, IxDyn>,
        bias: Option<ndarray::ArcArray<f32, IxDyn>>,
        k: usize,
        r: usize,
        n: usize,
    }

    impl LoraOperands {
        fn new<B: Backend>(
            x: FloatTensor<B>,
            a: FloatTensor<B>,
            b: FloatTensor<B>,
            bias: Option<FloatTensor<B>>,
        ) -> Option<Self> {
            let f32_array = |t: NdArrayTensor| match t {
                NdArrayTensor::F32(s) => Some(s.into_shared()),
                _ => None,
            };
            let [x, a, b] = cast::<_, [NdArrayTensor; 3]>([x, a, b]).ok()?;
            let (x, a, b) = (f32_array(x)?, f32_array(a)?, f32_array(b)?);
            let bias = match bias {
                Some(t) => Some(f32_array(cast::<_, NdArrayTensor>(t).ok()?)?),
                None => None,
            };
            if x.ndim() == 0 || a.ndim() != 2 || b.ndim() != 2 {
                return None;
            }
            let (k, r, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
            if b.shape()[0] != r
                || x.shape()[x.ndim() - 1] != k
                || bias.as_ref().is_some_and(|t| t.shape() != [n])
            {
                return None;
            }
            Some(LoraOperands {
                x,
                a,
                b,
                bias,
                k,
                r,
                n,
            })
        }
    }

    /// Dropout as an autodiff operation; its state is the keep bits and the scale.
    #[derive(Debug)]
    struct HostDropout;

    impl Backward<Nd, 1> for HostDropout {
        type State = (Vec<u64>, f32);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (bits, scale) = ops.state;
            unary::<Nd, _>(ops.parents, ops.node, grads, |g| {
                let g = view(&g).expect("f32 gradient");
                let shape = g.shape().to_vec();
                let g = standard(&g);
                let out = masked(g.as_slice().expect("standard"), &bits, scale);
                NdArrayTensor::from(
                    ArcArray::from_shape_vec(IxDyn(&shape), out).expect("shape of the gradient"),
                )
            });
        }
    }

    /// `x[j] * (scale if bit j of bits is set, else 0)`, in chunks on rayon's threads.
    fn masked(xs: &[f32], bits: &[u64], scale: f32) -> Vec<f32> {
        let n = xs.len();
        let mut out = unwritten(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .zip(bits.par_chunks(CHUNK / 64))
            .for_each(|((o, x), b)| apply_mask(o, x, b, scale));
        // SAFETY: apply_mask wrote every element of every chunk.
        unsafe { filled(out, n) }
    }

    /// Writes every element of `out` (as long as `xs`, with a bit of `bits` per element).
    fn apply_mask(out: &mut [MaybeUninit<f32>], xs: &[f32], bits: &[u64], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            unsafe { apply_mask_avx2(out, xs, bits, scale) };
            return;
        }
        apply_mask_scalar(out, xs, bits, scale);
    }

    /// [`apply_mask`] eight elements at a time: a byte of the word, spread over the lanes and
    /// tested bit by bit, selects `scale` or `+0.0`, which multiplies `x` as the scalar code
    /// does (the same values).
    ///
    /// # Safety
    /// AVX2 is present.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn apply_mask_avx2(out: &mut [MaybeUninit<f32>], xs: &[f32], bits: &[u64], scale: f32) {
        use std::arch::x86_64::*;
        let lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let scale_v = _mm256_set1_ps(scale);
        for ((o, x), &word) in out.chunks_mut(64).zip(xs.chunks(64)).zip(bits) {
            let n = o.len().min(x.len());
            let full = n / 8;
            for byte in 0..full {
                let b = _mm256_set1_epi32((word >> (8 * byte) & 0xff) as i32);
                let on = _mm256_cmpeq_epi32(_mm256_and_si256(b, lane_bits), lane_bits);
                let factor = _mm256_and_ps(_mm256_castsi256_ps(on), scale_v);
                // SAFETY: elements 8 * byte .. 8 * byte + 8 lie inside both chunks (byte <
                // full = n / 8), and `MaybeUninit<f32>` has `f32`'s layout.
                unsafe {
                    let v = _mm256_loadu_ps(x.as_ptr().add(8 * byte));
                    _mm256_storeu_ps(
                        o.as_mut_ptr().add(8 * byte) as *mut f32,
                        _mm256_mul_ps(v, factor),
                    );
                }
            }
            if 8 * full < n {
                let j = 8 * full;
                apply_mask_scalar(&mut o[j..n], &x[j..n], &[word >> j], scale);
            }
        }
    }

    fn apply_mask_scalar(out: &mut [MaybeUninit<f32>], xs: &[f32], bits: &[u64], scale: f32) {
        for ((o, x), &word) in out.chunks_mut(64).zip(xs.chunks(64)).zip(bits) {
            for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
                o.write(x * if word >> j & 1 == 1 { scale } else { 0.0 });
            }
        }
    }

    /// [`super::dropout_host`] on primitives of `B` (one of the two host backends), or the
    /// input back when it does not hold `f32`.
    pub(super) fn dropout<B: Backend>(
        x: FloatTensor<B>,
        stream: &crate::dropout::MaskStream,
        scale: f32,
    ) -> Result<FloatTensor<B>, FloatTensor<B>> {
        run::<B, _, _, 1>(
            [x],
            |[x]| {
                let v = view(x)?;
                let shape = v.shape().to_vec();
                let v = standard(&v);
                let xs = v.as_slice()?;
                let n = xs.len();
                let mut bits = vec![0u64; n.div_ceil(64)];
                let mut out = unwritten(n);
                out.spare_capacity_mut()[..n]
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .zip(bits.par_chunks_mut(CHUNK / 64))
                    .enumerate()
                    .for_each(|(i, ((o, x), b))| {
                        stream.fill(i * (CHUNK / 64), b);
                        apply_mask(o, x, b, scale);
                    });
                // SAFETY: apply_mask wrote every element of every chunk.
                let out = unsafe { filled(out, n) };
                let y = NdArrayTensor::from(ArcArray::from_shape_vec(IxDyn(&shape), out).ok()?);
                Some((y, bits))
            },
            HostDropout,
            move |_, _, _, bits| (bits, scale),
        )
        .map_err(|[x]| x)
    }

    /// `v` in standard (row-major) layout: borrowed when it already is, copied otherwise,
    /// matrix by matrix over the last two axes (rows with `copy_from_slice`, transposed
    /// matrices in tiles that stay in the L1 cache), the matrices on rayon's threads. The same
    /// values as ndarray's `as_standard_layout`, which walks a dynamic-rank view one element
    /// at a time: copying attention's transposed keys that way was the largest single cost
    /// of a decoding step.
    pub(super) fn standard<'b>(v: &'b ArrayViewD<'_, f32>) -> CowArray<'b, f32, IxDyn> {
        let nd = v.ndim();
        if v.is_standard_layout() || nd < 2 || v.is_empty() {
            return v.as_standard_layout();
        }
        let shape = v.shape();
        let (rows, cols) = (shape[nd - 2], shape[nd - 1]);
        let strides = v.strides();
        let (rs, cs) = (strides[nd - 2], strides[nd - 1]);
        let batch = &shape[..nd - 2];
        let count: usize = batch.iter().product();
        let len = v.len();
        let mut out = Vec::<f32>::with_capacity(len);
        let p = Ptrs {
            a: v.as_ptr(),
            b: v.as_ptr(),
            c: out.as_mut_ptr(),
        };
        let one = |i: usize| {
            let (src, _, dst) = p.parts();
            let mut offset = 0isize;
            let mut rest = i;
            for axis in (0..nd - 2).rev() {
                offset += (rest % batch[axis]) as isize * strides[axis];
                rest /= batch[axis];
            }
            // SAFETY: matrix `i` of the view starts at `offset` from its first element and
            // covers `rows x cols` elements at strides `rs`, `cs` (ndarray's invariants);
            // block `i` of the output is `rows * cols` elements inside `out`'s capacity,
            // disjoint from every other block.
            unsafe {
                let (src, dst) = (src.offset(offset), dst.add(i * rows * cols));
                if cs == 1 {
                    for r in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            src.offset(r as isize * rs),
                            dst.add(r * cols),
                            cols,
                        );
                    }
                } else {
                    const TILE: usize = 32;
                    for r0 in (0..rows).step_by(TILE) {
                        for c0 in (0..cols).step_by(TILE) {
                            for r in r0..(r0 + TILE).min(rows) {
                                let (s, d) = (src.offset(r as isize * rs), dst.add(r * cols));
                                for c in c0..(c0 + TILE).min(cols) {
                                    *d.add(c) = *s.offset(c as isize * cs);
                                }
                            }
                        }
                    }
                }
            }
        };
        if count > 1 && len >= CHUNK {
            (0..count).into_par_iter().for_each(one);
        } else {
            (0..count).for_each(one);
        }
        // SAFETY: every one of the `len` elements was written above.
        unsafe { out.set_len(len) };
        CowArray::from(ndarray::Array::from_shape_vec(IxDyn(shape), out).expect("the view's shape"))
    }

    /// The `f32` view of a tensor, if it holds `f32`.
    pub(super) fn view(t: &NdArrayTensor) -> Option<ArrayViewD<'_, f32>> {
        match t {
            NdArrayTensor::F32(storage) => Some(storage.view()),
            _ => None,
        }
    }

    /// `op(a) · op(b)`, `op` swapping the last two axes when asked; through [`product`] when it
    /// applies, burn-ndarray's own product otherwise. `row_major`: see [`product`].
    fn nd_matmul(
        a: &NdArrayTensor,
        b: &NdArrayTensor,
        ta: bool,
        tb: bool,
        row_major: bool,
    ) -> NdArrayTensor {
        fn swap(mut v: ArrayViewD<'_, f32>, t: bool) -> ArrayViewD<'_, f32> {
            if t {
                let n = v.ndim();
                v.swap_axes(n - 2, n - 1);
            }
            v
        }
        if let (Some(va), Some(vb)) = (view(a), view(b))
            && let Some(out) = product(swap(va, ta), swap(vb, tb), row_major)
        {
            return NdArrayTensor::from(out);
        }
        let op = |t: &NdArrayTensor, swap: bool| {
            if swap {
                Nd::float_transpose(t.clone())
            } else {
                t.clone()
            }
        };
        Nd::float_matmul(op(a, ta), op(b, tb))
    }

    /// A `Sync` wrapper for the raw pointers the batched loop shares between threads; each
    /// thread writes its own disjoint block of the output.
    #[derive(Clone, Copy)]
    struct Ptrs {
        a: *const f32,
        b: *const f32,
        c: *mut f32,
    }
    // SAFETY: the pointers are only read from (a, b) or written to in disjoint blocks (c)
    // while the arrays they point into are alive (the borrows in `product`).
    unsafe impl Send for Ptrs {}
    unsafe impl Sync for Ptrs {}

    /// One read-only pointer shared by the tasks of a parallel loop.
    #[derive(Clone, Copy)]
    struct SharedPtr(*const f32);
    // SAFETY: only read through, while the array it points into is alive.
    unsafe impl Send for SharedPtr {}
    unsafe impl Sync for SharedPtr {}

    impl SharedPtr {
        /// A method, so that closures capture the `Sync` wrapper and not the raw pointer.
        fn get(&self) -> *const f32 {
            self.0
        }
    }

    impl Ptrs {
        fn parts(&self) -> (*const f32, *const f32, *mut f32) {
            (self.a, self.b, self.c)
        }
    }

    /// `a · b` over the last two axes, batched over the others, read through the views'
    /// strides into a new standard-layout array. `None` when the shapes do not match without
    /// broadcasting or a stride is negative.
    ///
    /// `row_major`: an operand whose rows are not contiguous (a transposed view) is first copied
    /// into row-major layout, as burn-ndarray does with every operand. The kernel sums in a
    /// different order for a column-major operand, and the order would then depend on the
    /// number of rows; with this the forward products equal burn-ndarray's bit for bit, and a
    /// row's result does not depend on the batch it came in. Operands in row-major layout with
    /// a row stride of their own (heads split by `swap_dims`, a sliced cache) are read in
    /// place. The backward pass passes `false`: its transposed weights are read as they lie.
    fn product(
        a: ArrayViewD<'_, f32>,
        b: ArrayViewD<'_, f32>,
        row_major: bool,
    ) -> Option<ArcArray<f32, IxDyn>> {
        super::spin::rearm();
        let nd = a.ndim();
        if nd < 2 || b.ndim() != nd {
            return None;
        }
        let (m, k) = (a.shape()[nd - 2], a.shape()[nd - 1]);
        let n = b.shape()[nd - 1];
        if b.shape()[nd - 2] != k || a.shape()[..nd - 2] != b.shape()[..nd - 2] {
            return None;
        }
        if a.strides().iter().chain(b.strides()).any(|&s| s < 0) {
            return None;
        }
        let rows_contiguous =
            |v: &ArrayViewD<'_, f32>| v.shape()[nd - 1] <= 1 || v.strides()[nd - 1] == 1;
        let (a_copy, b_copy);
        let a = if row_major && !rows_contiguous(&a) {
            a_copy = standard(&a);
            a_copy.view()
        } else {
            a
        };
        let b = if row_major && !rows_contiguous(&b) {
            b_copy = standard(&b);
            b_copy.view()
        } else {
            b
        };
        let batch = &a.shape()[..nd - 2];
        let count: usize = batch.iter().product();
        let mut shape = batch.to_vec();
        shape.extend([m, n]);
        let len = count.checked_mul(m)?.checked_mul(n)?;
        let mut out = Vec::<f32>::with_capacity(len);
        let (sa, sb) = (a.strides(), b.strides());
        // Element offset of batch number `i` (row-major over the batch axes) in `a` and `b`.
        let offsets = |mut i: usize| {
            let (mut oa, mut ob) = (0isize, 0isize);
            for axis in (0..nd - 2).rev() {
                let idx = (i % batch[axis]) as isize;
                i /= batch[axis];
                oa += idx * sa[axis];
                ob += idx * sb[axis];
            }
            (oa, ob)
        };
        let p = Ptrs {
            a: a.as_ptr(),
            b: b.as_ptr(),
            c: out.as_mut_ptr(),
        };
        let one = |i: usize, threaded: bool| {
            // A method call, so that the closure captures all of `p` (which is `Sync`), not its
            // raw-pointer fields one by one (which are not).
            let (pa, pb, pc) = p.parts();
            let (oa, ob) = offsets(i);
            // SAFETY: the views cover `m x k` and `k x n` elements at these offsets and
            // strides; the output block `i` is `m x n` contiguous inside `out`'s capacity and
            // disjoint from every other block; `out` does not overlap the inputs.
            unsafe {
                peft_gemm::sgemm_strided(
                    m,
                    n,
                    k,
                    pa.offset(oa),
                    sa[nd - 2],
                    sa[nd - 1],
                    pb.offset(ob),
                    sb[nd - 2],
                    sb[nd - 1],
                    pc.add(i * m * n),
                    n as isize,
                    1,
                    threaded,
                );
            }
        };
        if count > 1 && count >= rayon::current_num_threads() {
            (0..count).into_par_iter().for_each(|i| one(i, false));
        } else {
            (0..count).for_each(|i| one(i, true));
        }
        // SAFETY: every one of the `len` elements was written above.
        unsafe { out.set_len(len) };
        ArcArray::from_shape_vec(IxDyn(&shape), out).ok()
    }

    /// A view of the same buffer under the new shape when `x` is `f32` in standard layout, a
    /// copy into standard layout ([`standard`]) viewed under the new shape when it is `f32` in
    /// another layout, burn-ndarray's reshape otherwise.
    fn nd_reshape(x: NdArrayTensor, shape: &[usize]) -> NdArrayTensor {
        if let NdArrayTensor::F32(storage) = &x
            && storage.is_owned()
            && storage.view().is_standard_layout()
        {
            let NdArrayTensor::F32(storage) = x else {
                unreachable!("matched above")
            };
            let array = storage.into_shared();
            return match array.into_shape_with_order(IxDyn(shape)) {
                Ok(a) => NdArrayTensor::from(a),
                Err(e) => panic!("reshape to {shape:?}: {e}"),
            };
        }
        if let NdArrayTensor::F32(storage) = &x {
            // One copy into standard layout (attention's merge of its heads), then a view.
            let copy = standard(&storage.view()).into_owned();
            return match copy.into_shape_with_order(IxDyn(shape)) {
                Ok(a) => NdArrayTensor::from(a.into_shared()),
                Err(e) => panic!("reshape to {shape:?}: {e}"),
            };
        }
        Nd::float_reshape(x, Shape::from(shape.to_vec()))
    }

    /// The product as an autodiff operation: its gradients are `grad · rhsᵀ` and `lhsᵀ · grad`
    /// (through [`nd_matmul`] on transposed views, so the backward pass copies nothing either).
    #[derive(Debug)]
    struct HostMatmul;

    impl Backward<Nd, 2> for HostMatmul {
        /// The operands the gradients need: `lhs` when `rhs` is tracked, and the reverse.
        type State = (Option<NdArrayTensor>, Option<NdArrayTensor>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (lhs, rhs) = ops.state;
            binary::<Nd, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| nd_matmul(&grad, &rhs.expect("kept for lhs"), false, true, false),
                |grad| nd_matmul(&lhs.expect("kept for rhs"), &grad, true, false, false),
            );
        }
    }

    /// The reshape as an autodiff operation: the gradient is reshaped back.
    #[derive(Debug)]
    struct HostReshape;

    impl Backward<Nd, 1> for HostReshape {
        /// The input's shape.
        type State = Vec<usize>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let shape = ops.state;
            unary::<Nd, _>(ops.parents, ops.node, grads, |grad| {
                nd_reshape(grad, &shape)
            });
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::{Distribution, Tensor, Tolerance};

    use super::{host, matmul, reshape};

    type Nd = NdArray<f32>;
    type Ad = Autodiff<Nd>;

    fn random<B: burn::tensor::backend::Backend, const D: usize>(
        shape: [usize; D],
    ) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &Default::default())
    }

    /// The fused unmerged-LoRA pass equals burn's two products, bias, scaling and sum: on
    /// ranks that fill one, one and a half and several vectors (the last past the stack
    /// buffer), row counts that split into tasks with a tail, columns with a tail, with and
    /// without a bias, and a transposed input; decoding steps of 2-8 rows, and depths past
    /// one of `gemm`'s blocks (`x A` summed in blocks). Bit for bit where the pass runs and
    /// where it declines (one row: burn's operations, through the reference's route); for the
    /// transposed input to 1e-5; under autodiff it is burn's operations exactly.
    #[test]
    fn lora_add_equals_burns_operations() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 11);
        let composite = |y: Tensor<Nd, 3>,
                         x: Tensor<Nd, 3>,
                         a: Tensor<Nd, 2>,
                         b: Tensor<Nd, 2>,
                         bias: Option<Tensor<Nd, 1>>| {
            let h = x.matmul(a.unsqueeze::<3>());
            let d = h.matmul(b.unsqueeze::<3>());
            let d = match bias {
                Some(bias) => d + bias.unsqueeze::<3>(),
                None => d,
            };
            y + d.mul_scalar(0.375)
        };
        for &(batch, rows, k, r, n, with_bias) in &[
            (2usize, 35usize, 64usize, 8usize, 37usize, false),
            (1, 70, 33, 12, 16, true),
            (3, 11, 40, 20, 9, true),
            (1, 1, 512, 8, 384, false),
            (1, 8, 17, 1, 5, true),
            (2, 64, 512, 8, 384, false),
            (8, 1, 512, 8, 384, false),
            (1, 8, 512, 16, 384, true),
            (1, 2, 512, 8, 384, false),
            (4, 2, 1024, 8, 1024, false),
            (1, 5, 700, 8, 300, true),
            (1, 20, 1024, 8, 300, false),
            (1, 100, 2048, 8, 300, false),
            (1, 8, 512, 64, 1024, false),
            (1, 7, 8, 8, 8, false),
        ] {
            let y = random::<Nd, 3>([batch, rows, n]);
            let x = random::<Nd, 3>([batch, rows, k]);
            let a = random::<Nd, 2>([k, r]);
            let b = random::<Nd, 2>([r, n]);
            let bias = with_bias.then(|| random::<Nd, 1>([n]));
            let want = composite(y.clone(), x.clone(), a.clone(), b.clone(), bias.clone());
            let got = super::lora_add(
                y.clone(),
                x.clone(),
                a.clone(),
                b.clone(),
                bias.clone(),
                0.375,
            );
            let (g, w) = (got.into_data(), want.into_data());
            assert!(
                g.iter::<f32>().all(f32::is_finite),
                "{batch}x{rows}x{k} r {r} -> {n}: every element written"
            );
            let pass = super::lora_kernel::blocks(batch * rows, k, r, n).is_some();
            if pass {
                // The pass sums burn's two products in the same chains.
                g.assert_eq(&w, true);
            } else {
                // burn's operations, through another route than the reference's.
                g.assert_approx_eq::<f32>(&w, Tolerance::rel_abs(1e-5, 1e-5));
            }
            // A `y` no other tensor shares is written in place: the same values.
            let fresh = y.clone().mul_scalar(1.0);
            super::lora_add(fresh, x.clone(), a.clone(), b.clone(), bias.clone(), 0.375)
                .into_data()
                .assert_eq(&g, true);
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && (batch * rows > 1 && r >= 2 && std::env::var_os("PEFT_GEMM_KERNEL").is_none())
            {
                assert!(pass, "{batch}x{rows}x{k} r {r} -> {n}: the pass declined");
                let prim = |t: &Tensor<Nd, 3>| t.clone().into_primitive().tensor();
                let fused = host::lora_add::<Nd>(
                    prim(&y),
                    prim(&x),
                    a.clone().into_primitive().tensor(),
                    b.clone().into_primitive().tensor(),
                    bias.clone().map(|t| t.into_primitive().tensor()),
                    0.375,
                );
                assert!(
                    fused.is_ok(),
                    "the fused pass takes {batch}x{rows}x{k} r {r}"
                );
            }
            // The input as a transposed view: read in standard layout first.
            let xt = random::<Nd, 3>([batch, k, rows]).swap_dims(1, 2);
            let want = composite(y.clone(), xt.clone(), a.clone(), b.clone(), bias.clone());
            super::lora_add(y, xt, a, b, bias, 0.375)
                .into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
        }
        // Under autodiff: burn's operations, with their gradients.
        let (y, x) = (random::<Ad, 3>([2, 5, 7]), random::<Ad, 3>([2, 5, 6]));
        let (a, b) = (
            random::<Ad, 2>([6, 4]).require_grad(),
            random::<Ad, 2>([4, 7]),
        );
        let got = super::lora_add(y.clone(), x.clone(), a.clone(), b.clone(), None, 2.0);
        let want = crate::nn::linear(crate::nn::linear(x, a.clone(), None), b, None);
        let want = super::add_scaled(y, want, 2.0);
        got.clone().into_data().assert_eq(&want.into_data(), true);
        assert!(a.grad(&got.sum().backward()).is_some(), "A is trained");
    }

    /// Batched products of every operand layout the models make (contiguous, transposed,
    /// head-split), including empty and one-element shapes, against burn's own product.
    #[test]
    fn products_equal_burns_on_every_layout() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (8, 64, 33),
            (1, 512, 300),
            (130, 17, 9),
            (4, 0, 3),
            (0, 4, 3),
        ] {
            let a = random::<Nd, 2>([m, k]);
            let b = random::<Nd, 2>([k, n]);
            if m * k == 0 {
                // burn-ndarray's own product divides by `m * k` here; the answer is zeros.
                let zeros = Tensor::<Nd, 2>::zeros([m, n], &Default::default()).into_data();
                matmul(a, b).into_data().assert_eq(&zeros, true);
                continue;
            }
            let want = a.clone().matmul(b.clone()).into_data();
            matmul(a.clone(), b.clone())
                .into_data()
                .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
            // Transposed views of both operands.
            let at = random::<Nd, 2>([k, m]);
            let bt = random::<Nd, 2>([n, k]);
            let want = at
                .clone()
                .transpose()
                .matmul(bt.clone().transpose())
                .into_data();
            matmul(at.transpose(), bt.transpose())
                .into_data()
                .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
        }
        // Attention: [batch, len, heads, d] split into heads by swap_dims, keys transposed.
        let q = random::<Nd, 4>([2, 7, 3, 5]).swap_dims(1, 2);
        let k = random::<Nd, 4>([2, 9, 3, 5]).swap_dims(1, 2);
        let want = q.clone().matmul(k.clone().swap_dims(2, 3)).into_data();
        matmul(q, k.swap_dims(2, 3))
            .into_data()
            .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
        // A sliced view (a KV cache read up to its fill).
        let v = random::<Nd, 3>([4, 10, 6]).slice([0..4, 0..7, 0..6]);
        let p = random::<Nd, 3>([4, 2, 7]);
        let want = p.clone().matmul(v.clone()).into_data();
        matmul(p, v)
            .into_data()
            .assert_approx_eq::<f32>(&want, Tolerance::rel_abs(1e-5, 1e-5));
    }

    /// Gradients through the product and the reshape, under `Autodiff<NdArray>`, equal those
    /// through burn's operations, for a tracked and an untracked (frozen) operand.
    #[test]
    fn gradients_equal_burns() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 11);
        let x0 = random::<Ad, 3>([2, 6, 8]);
        let w0 = random::<Ad, 2>([8, 5]);
        let frozen = random::<Ad, 2>([5, 4]);
        let run = |ours: bool| {
            let x = x0.clone().require_grad();
            let w = w0.clone().require_grad();
            let (flat, y, z) = if ours {
                let flat = reshape(x.clone(), [12, 8]);
                let y = matmul(flat.clone(), w.clone());
                let z = matmul(y.clone(), frozen.clone());
                (flat, y, reshape(z, [2, 6, 4]))
            } else {
                let flat = x.clone().reshape([12, 8]);
                let y = flat.clone().matmul(w.clone());
                let z = y.clone().matmul(frozen.clone());
                (flat, y, z.reshape([2, 6, 4]))
            };
            let _ = (flat, y);
            // A batched product of the result with a transposed view of itself.
            let att = matmul(z.clone(), z.clone().swap_dims(1, 2));
            let loss = (att.sum() + z.powi_scalar(2).sum()).backward();
            (
                x.grad(&loss).unwrap().into_data(),
                w.grad(&loss).unwrap().into_data(),
            )
        };
        let (gx, gw) = run(true);
        let (hx, hw) = run(false);
        gx.assert_approx_eq::<f32>(&hx, Tolerance::absolute(1e-4));
        gw.assert_approx_eq::<f32>(&hw, Tolerance::absolute(1e-4));
    }

    /// `add`, `mul` and `add_scaled` equal burn's `+`, `*` and `+ mul_scalar` bit for bit,
    /// values and gradients, on
    /// operands spanning several rayon tasks, one of them a transposed view; a broadcasting
    /// operand takes burn's path.
    #[test]
    fn elementwise_kernels_equal_burns() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 3);
        let a0 = random::<Ad, 3>([3, 129, 257]);
        let b0 = random::<Ad, 3>([3, 257, 129]).swap_dims(1, 2);
        let g0 = random::<Ad, 3>([3, 129, 257]);
        for which in ["add", "mul", "add_scaled"] {
            let run = |ours: bool| {
                let (a, b) = (a0.clone().require_grad(), b0.clone().require_grad());
                let y = match (which, ours) {
                    ("mul", true) => super::mul(a.clone(), b.clone()),
                    ("mul", false) => a.clone() * b.clone(),
                    ("add", true) => super::add(a.clone(), b.clone()),
                    ("add", false) => a.clone() + b.clone(),
                    (_, true) => super::add_scaled(a.clone(), b.clone(), 4.0 / 3.0),
                    (_, false) => a.clone() + b.clone().mul_scalar(4.0 / 3.0),
                };
                let grads = (y.clone() * g0.clone()).sum().backward();
                let ga = a.grad(&grads).unwrap().into_data();
                let gb = b.grad(&grads).unwrap().into_data();
                (y.into_data(), ga, gb)
            };
            let (ours, theirs) = (run(true), run(false));
            ours.0.assert_eq(&theirs.0, true);
            ours.1.assert_eq(&theirs.1, true);
            ours.2.assert_eq(&theirs.2, true);
        }
        let (a, row) = (random::<Nd, 2>([4, 5]), random::<Nd, 2>([1, 5]));
        super::add(a.clone(), row.clone())
            .into_data()
            .assert_eq(&(a.clone() + row.clone()).into_data(), true);
        super::mul(a.clone(), row.clone())
            .into_data()
            .assert_eq(&(a * row).into_data(), true);
    }

    /// `gelu_tanh_mul` equals `mul(gelu_tanh(a), c)` bit for bit: one pass on operands
    /// spanning several rayon tasks with a tail (plain and with a transposed `c`), values
    /// from -12 to 12 and the scalar path's (`|x| >= 88`, infinities, NaN); under autodiff it
    /// is the two operations, values and gradients.
    #[test]
    fn gelu_tanh_mul_equals_gelu_then_mul() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 5);
        let dev = Default::default();
        let a = Tensor::<Nd, 3>::random([3, 129, 257], Distribution::Uniform(-12.0, 12.0), &dev);
        let c = random::<Nd, 3>([3, 129, 257]);
        let ct = random::<Nd, 3>([3, 257, 129]).swap_dims(1, 2);
        let edges = Tensor::<Nd, 2>::from_floats(
            [[
                -100.0,
                100.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                -0.0,
                88.5,
                -88.5,
            ]],
            &dev,
        );
        let edge_c =
            Tensor::<Nd, 2>::from_floats([[2.0, -3.0, 1.0, 1.0, 1.0, 5.0, 0.5, 7.0]], &dev);
        let apart = |a: Tensor<Nd, 3>, c: Tensor<Nd, 3>| super::mul(crate::nn::gelu_tanh(a), c);
        for c in [c, ct] {
            super::gelu_tanh_mul(a.clone(), c.clone())
                .into_data()
                .assert_eq(&apart(a.clone(), c).into_data(), true);
        }
        let fused = super::gelu_tanh_mul(edges.clone(), edge_c.clone()).into_data();
        let want = super::mul(crate::nn::gelu_tanh(edges), edge_c).into_data();
        let bits = |d: burn::tensor::TensorData| -> Vec<u32> {
            d.to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(fused), bits(want));
        let (a, c) = (random::<Ad, 2>([7, 300]), random::<Ad, 2>([7, 300]));
        let run = |fused: bool| {
            let (a, c) = (a.clone().require_grad(), c.clone().require_grad());
            let y = if fused {
                super::gelu_tanh_mul(a.clone(), c.clone())
            } else {
                super::mul(crate::nn::gelu_tanh(a.clone()), c.clone())
            };
            let grads = y.clone().sum().backward();
            let (ga, gc) = (a.grad(&grads).unwrap(), c.grad(&grads).unwrap());
            (y.into_data(), ga.into_data(), gc.into_data())
        };
        let (ours, theirs) = (run(true), run(false));
        ours.0.assert_eq(&theirs.0, true);
        ours.1.assert_eq(&theirs.1, true);
        ours.2.assert_eq(&theirs.2, true);
    }

    /// The eight-lane `exp` (softmax, gelu) equals `f32::exp` bit for bit: on every 97th bit
    /// pattern of both signs (all exponents, every table entry, the fast path and the
    /// scalar one for `|x| >= 88`), and on NaN, the infinities and the overflow and
    /// underflow edges; and `exp_shifted` sums what it wrote.
    #[test]
    fn eight_lane_exp_equals_f32_exp() {
        let mut xs: Vec<f32> = (0..0x7f80_0000u32)
            .step_by(97)
            .flat_map(|b| [f32::from_bits(b), -f32::from_bits(b)])
            .collect();
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            88.72,
            88.73,
            -103.9,
            -104.0,
            0.0,
        ]);
        #[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            assert!(
                host::vector_exp(),
                "glibc's expf, copied, should take the fast path here"
            );
        }
        let want: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
        let check = |got: &[f32], path: &str| {
            for ((x, w), g) in xs.iter().zip(&want).zip(got) {
                assert!(
                    g.to_bits() == *w || (x.is_nan() && g.is_nan()),
                    "{path}: exp({x}): {g} against {}",
                    f32::from_bits(*w)
                );
            }
        };
        let mut got = xs.clone();
        host::exp_in_place(&mut got);
        check(&got, "exp_in_place");
        // Both vector paths, whichever `exp_in_place` takes here (an odd length, so that the
        // 16-lane path hands a tail to the 8-lane one).
        #[cfg(target_arch = "x86_64")]
        if host::vector_exp() {
            let mut got = xs.clone();
            // SAFETY: `vector_exp` is true only with AVX2 and FMA present.
            unsafe { host::vexp::exp_avx2(&mut got) };
            check(&got, "exp_avx2");
            if std::is_x86_feature_detected!("avx512f") {
                let mut got = xs.clone();
                got.push(1.5);
                // SAFETY: AVX-512F, AVX2 and FMA are present.
                unsafe { host::vexp::exp_avx512(&mut got) };
                assert_eq!(got.pop().map(f32::to_bits), Some(1.5f32.exp().to_bits()));
                check(&got, "exp_avx512");
            }
        }
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let copy = row.clone();
        let sum = host::exp_shifted(&mut row, 2.0);
        for (y, x) in row.iter().zip(&copy) {
            assert_eq!(y.to_bits(), (x - 2.0).exp().to_bits());
        }
        assert_eq!(sum, host::lane_sum(&row));
    }

    /// Every one of the 2,237,661,184 `f32` inputs below 88 in magnitude (the copy of glibc's
    /// main path) against `f32::exp`, bit for bit: through `exp_in_place` and, where the CPU
    /// has them, the eight-lane path alone as well (the sixteen-lane one is `exp_in_place`'s
    /// there). About 20 s a path:
    /// `cargo test --release -p peft-core --lib exp_equals_f32_exp_everywhere -- --ignored`.
    #[test]
    #[ignore = "exhaustive, about 20 s a path; run when the vector exp changes"]
    fn exp_equals_f32_exp_everywhere() {
        /// A named way to take `exp` of a slice in place.
        type ExpPath = (&'static str, fn(&mut [f32]));
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut paths: Vec<ExpPath> = vec![("exp_in_place", host::exp_in_place)];
        #[cfg(target_arch = "x86_64")]
        if host::vector_exp() {
            // SAFETY: `vector_exp` is true only with AVX2 and FMA present.
            paths.push(("exp_avx2", |xs| unsafe { host::vexp::exp_avx2(xs) }));
        }
        let mut xs = vec![0.0f32; 1 << 20];
        for (path, exp) in paths {
            for sign in [0u32, 0x8000_0000] {
                for start in (0..0x42b0_0000u32).step_by(1 << 20) {
                    for (i, x) in xs.iter_mut().enumerate() {
                        *x = f32::from_bits((start + i as u32).min(0x42af_ffff) | sign);
                    }
                    let want: Vec<u32> = xs.iter().map(|x| x.exp().to_bits()).collect();
                    exp(&mut xs);
                    let same = xs.iter().zip(&want).all(|(g, w)| g.to_bits() == *w);
                    assert!(
                        same,
                        "{path}: a difference among the inputs from bit pattern {start:#x}"
                    );
                }
            }
        }
    }

    /// The one-pass softmax and gelu: values equal to burn's composite (gelu bit for bit, the
    /// same `f32` operations), gradients to 1e-5, on rows spanning several rayon tasks.
    #[test]
    fn pointwise_kernels_equal_the_composites() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 5);
        let x0 = random::<Ad, 3>([3, 700, 37]).mul_scalar(6.0);
        let g0 = random::<Ad, 3>([3, 700, 37]);
        let composite_gelu = |x: Tensor<Ad, 3>| {
            let c = 2.0 * (2.0 / std::f64::consts::PI).sqrt();
            let x2 = x.clone() * x.clone();
            let u = (x.clone() * (x2.mul_scalar(0.044715).add_scalar(1.0))).mul_scalar(-c);
            x / u.exp().add_scalar(1.0)
        };
        for which in ["gelu", "softmax", "log_softmax"] {
            let run = |ours: bool| {
                let x = x0.clone().require_grad();
                let y = match (which, ours) {
                    ("gelu", true) => crate::nn::gelu_tanh(x.clone()),
                    ("gelu", false) => composite_gelu(x.clone()),
                    ("softmax", true) => super::softmax(x.clone(), 2),
                    ("softmax", false) => burn::tensor::activation::softmax(x.clone(), 2),
                    (_, true) => super::log_softmax(x.clone(), 2),
                    (_, false) => burn::tensor::activation::log_softmax(x.clone(), 2),
                };
                let grads = (y.clone() * g0.clone()).sum().backward();
                (y.into_data(), x.grad(&grads).unwrap().into_data())
            };
            let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
            if which == "gelu" {
                y.assert_eq(&y_ref, true);
            } else {
                y.assert_approx_eq::<f32>(&y_ref, Tolerance::rel_abs(1e-6, 1e-7));
            }
            g.assert_approx_eq::<f32>(&g_ref, Tolerance::rel_abs(1e-5, 1e-6));
        }
    }

    /// Bias, mask and softmax in one pass: values and both gradients equal burn's
    /// `softmax(scores + bias)` for T5's `[1, heads, q, k]` bias and BERT's `[batch, 1, 1, k]`
    /// mask (with `f32::MIN` entries), on scores read through a transposed view.
    #[test]
    fn biased_softmax_equals_the_composite() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 9);
        for bias_shape in [[1, 3, 20, 30], [2, 1, 1, 30], [2, 3, 20, 30]] {
            let s0 = random::<Ad, 4>([2, 3, 30, 20]).mul_scalar(4.0);
            let mut b0 = random::<Ad, 4>(bias_shape).mul_scalar(3.0);
            if bias_shape[1] == 1 {
                // A masked key, as BERT's extended mask writes it.
                b0 = b0.slice_fill([0..1, 0..1, 0..1, 5..6], f32::MIN);
            }
            let g0 = random::<Ad, 4>([2, 3, 20, 30]);
            let run = |ours: bool| {
                let s = s0.clone().require_grad();
                let b = b0.clone().require_grad();
                let st = s.clone().swap_dims(2, 3);
                let y = if ours {
                    super::softmax_biased(st, b.clone())
                } else {
                    burn::tensor::activation::softmax(st + b.clone(), 3)
                };
                let grads = (y.clone() * g0.clone()).sum().backward();
                (
                    y.into_data(),
                    s.grad(&grads).unwrap().into_data(),
                    b.grad(&grads).unwrap().into_data(),
                )
            };
            let ((y, gs, gb), (y_ref, gs_ref, gb_ref)) = (run(true), run(false));
            y.assert_approx_eq::<f32>(&y_ref, Tolerance::rel_abs(1e-6, 1e-7));
            gs.assert_approx_eq::<f32>(&gs_ref, Tolerance::rel_abs(1e-5, 1e-6));
            gb.assert_approx_eq::<f32>(&gb_ref, Tolerance::rel_abs(1e-5, 1e-6));
        }
    }

    /// T5's RMS norm in one pass: values and both gradients equal the composite's.
    #[test]
    fn rms_norm_equals_the_composite() {
        <Nd as burn::tensor::backend::Backend>::seed(&Default::default(), 13);
        let x0 = random::<Ad, 3>([3, 700, 48]).mul_scalar(3.0);
        let w0 = random::<Ad, 1>([48]);
        let g0 = random::<Ad, 3>([3, 700, 48]);
        let run = |ours: bool| {
            let x = x0.clone().require_grad();
            let w = w0.clone().require_grad();
            let y = if ours {
                super::rms_norm(x.clone(), w.clone(), 1e-6)
            } else {
                super::rms_norm_composite(x.clone(), w.clone(), 1e-6)
            };
            let grads = (y.clone() * g0.clone()).sum().backward();
            (
                y.into_data(),
                x.grad(&grads).unwrap().into_data(),
                w.grad(&grads).unwrap().into_data(),
            )
        };
        let ((y, gx, gw), (y_ref, gx_ref, gw_ref)) = (run(true), run(false));
        y.assert_approx_eq::<f32>(&y_ref, Tolerance::rel_abs(1e-6, 1e-7));
        gx.assert_approx_eq::<f32>(&gx_ref, Tolerance::rel_abs(1e-5, 1e-6));
        // The weight's gradient sums 2,100 rows, in another order than the composite's.
        gw.assert_approx_eq::<f32>(&gw_ref, Tolerance::rel_abs(1e-4, 1e-5));
    }

    /// The layout copy gives ndarray's `as_standard_layout` element for element, on every view
    /// the models make and some they do not (reversed axes, tile edges, one matrix or many,
    /// small and past the parallel threshold).
    #[test]
    fn standard_layout_copies_equal_ndarrays() {
        use ndarray::{Array, Axis, IxDyn};
        for shape in [
            vec![70usize, 45],
            vec![2, 3, 5, 7],
            vec![4, 6, 40, 70],
            vec![1, 1, 33, 1],
        ] {
            let len: usize = shape.iter().product();
            let a = Array::from_shape_vec(IxDyn(&shape), (0..len).map(|i| i as f32).collect())
                .expect("shape");
            let nd = shape.len();
            let mut views = vec![a.view()];
            let mut t = a.view();
            t.swap_axes(nd - 2, nd - 1);
            views.push(t);
            let mut t = a.view();
            t.swap_axes(0, nd - 2);
            views.push(t);
            let mut t = a.view();
            t.invert_axis(Axis(nd - 1));
            t.swap_axes(0, nd - 1);
            views.push(t);
            let mut t = a.view();
            t.invert_axis(Axis(0));
            views.push(t);
            for v in views {
                let ours = super::host::standard(&v);
                assert!(ours.is_standard_layout());
                assert_eq!(ours.shape(), v.shape());
                assert_eq!(
                    ours.as_slice(),
                    v.as_standard_layout().as_slice(),
                    "{shape:?}"
                );
            }
        }
    }

    /// A reshape of a standard-layout array shares its buffer; one of a transposed view is
    /// still right (burn's copying reshape).
    #[test]
    fn reshapes_are_views_and_stay_right() {
        fn address<const D: usize>(t: &Tensor<Nd, D>) -> *const f32 {
            match t.clone().into_primitive().tensor() {
                burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().as_ptr(),
                _ => panic!("f32 expected"),
            }
        }
        let a = random::<Nd, 2>([6, 4]);
        let r = reshape(a.clone(), [2, 3, 4]);
        assert_eq!(
            address(&r),
            address(&a),
            "a standard-layout reshape shares the buffer"
        );
        assert_ne!(
            address(&a.clone().reshape([2, 3, 4])),
            address(&a),
            "burn's reshape copies (if this fails, burn stopped copying and ops::reshape can go)"
        );
        r.into_data()
            .assert_eq(&a.clone().reshape([2, 3, 4]).into_data(), true);
        let t = reshape(a.clone().transpose(), [4, 6]);
        t.into_data().assert_eq(&a.transpose().into_data(), true);
    }

    /// `argmax_last` answers what burn's `argmax` over the last dimension does: the first
    /// largest value, a NaN only when it comes first; on rows of 1 to 40 values (the
    /// 16-lane pass and its tail), with ties, infinities, a transposed view and a 3-D input.
    #[test]
    fn argmax_last_equals_burns() {
        use burn::tensor::TensorData;
        let burns = |t: Tensor<Nd, 2>| -> Vec<usize> {
            let ids = t.argmax(1).into_data().convert::<i64>();
            ids.iter::<i64>().map(|i| i as usize).collect()
        };
        let device = Default::default();
        for n in [1usize, 2, 15, 16, 17, 33, 40] {
            let mut rows: Vec<Vec<f32>> = (0..6)
                .map(|r| {
                    (0..n)
                        .map(|j| ((j * 7 + r * 3) % 11) as f32 - 5.0)
                        .collect()
                })
                .collect();
            rows[1] = vec![2.0; n];
            rows[2][n - 1] = f32::INFINITY;
            rows[3][0] = f32::NAN;
            rows[4][n / 2] = f32::NAN;
            rows[5] = vec![f32::NEG_INFINITY; n];
            let flat: Vec<f32> = rows.concat();
            let t = Tensor::<Nd, 2>::from_data(TensorData::new(flat, [6, n]), &device);
            assert_eq!(
                super::argmax_last(t.clone()),
                burns(t.clone()),
                "{n} columns"
            );
            let tt = t.transpose();
            assert_eq!(
                super::argmax_last(tt.clone()),
                burns(tt),
                "{n} rows, transposed"
            );
        }
        let t = random::<Nd, 3>([3, 4, 50]);
        let want: Vec<usize> = {
            let ids = t.clone().argmax(2).into_data().convert::<i64>();
            ids.iter::<i64>().map(|i| i as usize).collect()
        };
        assert_eq!(super::argmax_last(t), want);
    }

    /// `assign_at` equals burn's `slice_assign`, in place when the buffer is not shared (a
    /// KV cache's append) and without touching another tensor that shares it; on a
    /// transposed buffer (the keys' layout), along each dimension.
    #[test]
    fn assign_at_equals_slice_assign_and_writes_in_place_only_unshared() {
        let address = |t: &Tensor<Nd, 4>| match t.clone().into_primitive().tensor() {
            burn::backend::ndarray::NdArrayTensor::F32(s) => s.view().as_ptr() as usize,
            _ => unreachable!("f32"),
        };
        for dim in 0..4 {
            let mut shape = [3usize, 2, 5, 4];
            let base = random::<Nd, 4>(shape).swap_dims(2, 3);
            shape.swap(2, 3);
            let mut vshape = shape;
            vshape[dim] = 1;
            let value = random::<Nd, 4>(vshape);
            let start = shape[dim] - 1;
            let ranges: [core::ops::Range<usize>; 4] = core::array::from_fn(|d| {
                if d == dim {
                    start..start + 1
                } else {
                    0..shape[d]
                }
            });
            let want = base.clone().slice_assign(ranges, value.clone());
            // Shared: the other holder keeps its values.
            let kept = base.clone().into_data();
            let shared = super::assign_at(base.clone(), dim, start, value.clone());
            shared
                .into_data()
                .assert_eq(&want.clone().into_data(), true);
            base.clone().into_data().assert_eq(&kept, true);
            // Unshared: written in place.
            let before = address(&base);
            let unshared = super::assign_at(base, dim, start, value);
            assert_eq!(
                address(&unshared),
                before,
                "dimension {dim}: written in place"
            );
            unshared.into_data().assert_eq(&want.into_data(), true);
        }
    }

    /// `matmul_packed` equals `matmul` bit for bit at every call: the first in place, the
    /// second packing the weight, later ones reading the copy; a new weight drops the copy
    /// (the stale one is not read) and is packed at its own second product; more than 16
    /// rows and a small weight stay in place; clones share the slot; `clear` empties it.
    #[test]
    fn packed_products_equal_products_in_place() {
        use super::{DecodePack, matmul_packed};
        let packs = peft_gemm::packed_matches_in_place(8, 384, 256, 1)
            && std::env::var_os("PEFT_DECODE_PACK").is_none();
        let pack = DecodePack::default();
        pack.on();
        let w = random::<Nd, 2>([256, 384]);
        let bytes = 384 * 256 * 4;
        for (call, rows) in [3usize, 16, 1, 8].into_iter().enumerate() {
            let x = random::<Nd, 2>([rows, 256]);
            let y = matmul_packed(x.clone(), w.clone(), &pack);
            y.into_data()
                .assert_eq(&matmul(x, w.clone()).into_data(), true);
            let want = if packs && call >= 1 { bytes } else { 0 };
            assert_eq!(pack.bytes(), want, "after call {call}");
        }
        // 17 rows: in place, the copy kept.
        let x = random::<Nd, 2>([17, 256]);
        let y = matmul_packed(x.clone(), w.clone(), &pack);
        y.into_data()
            .assert_eq(&matmul(x, w.clone()).into_data(), true);
        assert_eq!(pack.bytes(), if packs { bytes } else { 0 });
        // A new weight (as after an optimizer step or a merge): the stale copy goes.
        let w2 = w.clone().add_scalar(1.0);
        for call in 0..3 {
            let x = random::<Nd, 2>([4, 256]);
            let y = matmul_packed(x.clone(), w2.clone(), &pack.clone());
            y.into_data()
                .assert_eq(&matmul(x, w2.clone()).into_data(), true);
            let want = if packs && call >= 1 { bytes } else { 0 };
            assert_eq!(pack.bytes(), want, "new weight, call {call}");
        }
        pack.clear();
        assert_eq!(pack.bytes(), 0);
        // Turned off: in place, nothing kept.
        pack.off();
        for _ in 0..3 {
            let x = random::<Nd, 2>([4, 256]);
            let y = matmul_packed(x.clone(), w2.clone(), &pack);
            y.into_data()
                .assert_eq(&matmul(x, w2.clone()).into_data(), true);
        }
        assert_eq!(pack.bytes(), 0);
        pack.on();
        // A small weight (it stays in cache) is never packed.
        let small = random::<Nd, 2>([64, 96]);
        for _ in 0..3 {
            let x = random::<Nd, 2>([2, 64]);
            let y = matmul_packed(x.clone(), small.clone(), &pack);
            y.into_data()
                .assert_eq(&matmul(x, small.clone()).into_data(), true);
        }
        assert_eq!(pack.bytes(), 0);
        // Under autodiff: burn's product, nothing packed.
        let pack = DecodePack::default();
        pack.on();
        let wa = random::<Ad, 2>([256, 384]);
        for _ in 0..3 {
            let x = random::<Ad, 2>([2, 256]);
            let y = matmul_packed(x.clone(), wa.clone(), &pack);
            y.into_data()
                .assert_eq(&matmul(x, wa.clone()).into_data(), true);
        }
        assert_eq!(pack.bytes(), 0);
    }

    /// Products with one slot from many of rayon's jobs at once (a thread waiting inside one
    /// job's packing may take up another job's product with the same slot): they all finish,
    /// under a watchdog, and each equals the product in place.
    #[test]
    fn packed_products_from_many_jobs_finish_and_agree() {
        use rayon::prelude::*;
        use std::time::Duration;

        use super::{DecodePack, matmul_packed};
        let w = random::<Nd, 2>([256, 384]);
        let xs: Vec<Tensor<Nd, 2>> = (0..48).map(|_| random::<Nd, 2>([4, 256])).collect();
        let want: Vec<_> = xs
            .iter()
            .map(|x| matmul(x.clone(), w.clone()).into_data())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pack = DecodePack::default();
            pack.on();
            let mut all = Vec::new();
            for _ in 0..3 {
                let got: Vec<_> = xs
                    .par_iter()
                    .map(|x| matmul_packed(x.clone(), w.clone(), &pack).into_data())
                    .collect();
                all.push(got);
            }
            tx.send(all).ok();
        });
        let all = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("every product finished");
        for got in all {
            for (g, w) in got.iter().zip(&want) {
                g.assert_eq(w, true);
            }
        }
    }
}
