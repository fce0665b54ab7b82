//! PEFT's LoRA inits that need no data (`init_lora_weights`): `pissa` and `pissa_niter_N`
//! (feature `svd`), `olora` (feature `svd`) and `orthogonal`.
//!
//! - PiSSA: with `W = V S U^T` (the base weight, `[out, in]`), `A = sqrt(S_r / s) U_r^T`,
//!   `B = V_r sqrt(S_r / s)`, and the base becomes the residual `W - s B A`;
//!   `pissa_niter_N` takes the top `r` triplets from a randomized SVD with `N` subspace
//!   iterations (PEFT's `svd_lowrank`; its random draws come from the backend's seeded RNG,
//!   not torch's, so the factors agree with PEFT's only as far as the iteration converges).
//! - OLoRA: with `W = Q R`, `A = R[:r]`, `B = Q[:, :r]`, and the base becomes `W - s B A`.
//! - orthogonal: `A` and `B` from one random orthogonal `r x r` matrix's odd and even rows, so
//!   that `B A = 0` while neither is zero; the base is unchanged.
//!
//! PiSSA and OLoRA change the base weight, so their adapter only holds on the residual base.
//! [`to_plain_lora`] turns one into an adapter of the original base (PEFT's
//! `path_initial_model_for_weight_conversion`): `A' = [A; A_0]`, `B' = [B, -B_0]` at twice the
//! rank.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

use super::config::{InitLoraWeights, LoraConfig};
use super::layer::LoraAdapter;
use crate::adapted_linear::AdaptedLinear;
use crate::config::OrderedMap;
use crate::error::{PeftError, Result};

/// An init that needs the base weight or a structured draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightInit {
    /// `pissa` (exact SVD) or `pissa_niter_N` (randomized SVD, `N` iterations).
    Pissa {
        /// Subspace iterations of the randomized SVD; `None` for the exact one.
        niter: Option<usize>,
    },
    /// `olora`.
    Olora,
    /// `orthogonal`.
    Orthogonal,
}

impl WeightInit {
    /// The init `init_lora_weights` names, if it is one of these (`None` for PEFT's plain
    /// inits); other strings are refused by name.
    pub fn parse(init: &InitLoraWeights) -> Result<Option<Self>> {
        let InitLoraWeights::Other(s) = init else {
            return Ok(None);
        };
        let lower = s.to_ascii_lowercase();
        let w = if lower == "pissa" {
            WeightInit::Pissa { niter: None }
        } else if let Some(n) = lower.strip_prefix("pissa_niter_") {
            let niter = n.parse::<usize>().map_err(|_| {
                PeftError::InvalidConfig(format!(
                    "init_lora_weights {s:?}: expected pissa_niter_<number of iterations>"
                ))
            })?;
            WeightInit::Pissa { niter: Some(niter) }
        } else if lower == "olora" {
            WeightInit::Olora
        } else if lower == "orthogonal" {
            WeightInit::Orthogonal
        } else {
            return Err(PeftError::Unsupported(format!(
                "init_lora_weights = {s:?} (implemented: true, false, gaussian, pissa, \
                 pissa_niter_N, olora, orthogonal)"
            )));
        };
        if matches!(w, WeightInit::Pissa { .. } | WeightInit::Olora) && !cfg!(feature = "svd") {
            return Err(PeftError::Unsupported(format!(
                "init_lora_weights = {s:?}: this build of peft-core has no feature `svd`"
            )));
        }
        Ok(Some(w))
    }

    /// Whether the init changes the base weight (so the adapter holds on the residual only).
    pub fn mutates_base(self) -> bool {
        !matches!(self, WeightInit::Orthogonal)
    }
}

/// Applies `init` to `adapter` about to join `layer` at `path` (its rank and scaling set):
/// fills `A` and `B`, and for PiSSA and OLoRA replaces the base weight by the residual.
pub fn apply<B: Backend>(
    init: WeightInit,
    layer: &mut AdaptedLinear<B>,
    adapter: &mut LoraAdapter<B>,
    path: &str,
) -> Result<()> {
    let (d_in, d_out, r) = (layer.d_input(), layer.d_output(), adapter.r);
    let device = layer.weight.lazy_device();
    let (a, b) = match init {
        WeightInit::Orthogonal => orthogonal::<B>(d_in, d_out, r, path, &device)?,
        _ => {
            if r > d_in.min(d_out) {
                return Err(PeftError::InvalidConfig(format!(
                    "{path}: rank {r} exceeds the layer's smaller side ({})",
                    d_in.min(d_out)
                )));
            }
            // PEFT's W is [out, in]: burn's weight transposed.
            let w = super::host_values(layer.weight.val().transpose());
            let s = adapter.scaling;
            let (a, b) = decompose::<B>(init, &w, d_out, d_in, r, s, path, &device)?;
            // W_res = W - s B A, back in burn's [in, out].
            let mut res = w.iter().map(|v| *v as f64).collect::<Vec<f64>>();
            for o in 0..d_out {
                for k in 0..r {
                    let bk = b[o * r + k] * s;
                    for i in 0..d_in {
                        res[o * d_in + i] -= bk * a[k * d_in + i];
                    }
                }
            }
            let mut res_t = vec![0.0f32; d_in * d_out];
            for o in 0..d_out {
                for i in 0..d_in {
                    res_t[i * d_out + o] = res[o * d_in + i] as f32;
                }
            }
            let t = Tensor::<B, 2>::from_data(TensorData::new(res_t, [d_in, d_out]), &device);
            layer.weight = Param::initialized(layer.weight.id, t).set_require_grad(false);
            let f = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
            (f(&a), f(&b))
        }
    };
    // PEFT's A [r, in] and B [out, r] into burn's [in, r] and [r, out].
    let a = crate::nn::transposed_from(a, [r, d_in], &device);
    let b = crate::nn::transposed_from(b, [d_out, r], &device);
    adapter.lora_a = Param::initialized(adapter.lora_a.id, a);
    adapter.lora_b = Param::initialized(adapter.lora_b.id, b);
    Ok(())
}

/// PEFT's `orthogonal_init`: `A = (G Q_odd)^T / 10`, `B = (H^T Q_even) / 10` with `Q` a random
/// orthogonal `r x r` matrix and `G`, `H` standard normal.
fn orthogonal<B: Backend>(
    d_in: usize,
    d_out: usize,
    r: usize,
    path: &str,
    device: &B::Device,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if !r.is_multiple_of(2) {
        return Err(PeftError::InvalidConfig(format!(
            "{path}: orthogonal initialization requires an even LoRA rank, found {r}"
        )));
    }
    let n = Distribution::Normal(0.0, 1.0);
    let x: Vec<f64> = super::host_values(Tensor::<B, 2>::random([r, r], n, device))
        .into_iter()
        .map(f64::from)
        .collect();
    let q = orthonormal_rows(&x, r);
    let half = r / 2;
    let g = super::host_values(Tensor::<B, 2>::random([d_in, half], n, device));
    let h = super::host_values(Tensor::<B, 2>::random([half, d_out], n, device));
    // A[k][i] = sum_j G[i][j] Q[2j][k] / 10 (rows 0, 2, 4... of Q are PEFT's q_odd).
    let mut a = vec![0.0f32; r * d_in];
    for k in 0..r {
        for i in 0..d_in {
            let mut acc = 0.0f64;
            for j in 0..half {
                acc += g[i * half + j] as f64 * q[(2 * j) * r + k];
            }
            a[k * d_in + i] = (acc / 10.0) as f32;
        }
    }
    // B[o][k] = sum_j H[j][o] Q[2j + 1][k] / 10.
    let mut b = vec![0.0f32; d_out * r];
    for o in 0..d_out {
        for k in 0..r {
            let mut acc = 0.0f64;
            for j in 0..half {
                acc += h[j * d_out + o] as f64 * q[(2 * j + 1) * r + k];
            }
            b[o * r + k] = (acc / 10.0) as f32;
        }
    }
    Ok((a, b))
}

/// An orthogonal `n x n` matrix from `x` (row-major) by Gram-Schmidt on its rows (re-done once
/// for stability).
fn orthonormal_rows(x: &[f64], n: usize) -> Vec<f64> {
    let mut q = x.to_vec();
    for i in 0..n {
        for _ in 0..2 {
            for j in 0..i {
                let dot: f64 = (0..n).map(|k| q[i * n + k] * q[j * n + k]).sum();
                for k in 0..n {
                    q[i * n + k] -= dot * q[j * n + k];
                }
            }
        }
        let norm = (0..n)
            .map(|k| q[i * n + k].powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-300);
        for k in 0..n {
            q[i * n + k] /= norm;
        }
    }
    q
}

#[cfg(feature = "svd")]
#[allow(clippy::too_many_arguments)]
fn decompose<B: Backend>(
    init: WeightInit,
    w: &[f32],
    d_out: usize,
    d_in: usize,
    r: usize,
    s: f64,
    path: &str,
    device: &B::Device,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mat = faer::Mat::<f64>::from_fn(d_out, d_in, |i, j| w[i * d_in + j] as f64);
    let fail = |what: &str, e: String| {
        PeftError::InvalidConfig(format!("{path}: the {what} of the base weight failed: {e}"))
    };
    let mut a = vec![0.0f64; r * d_in];
    let mut b = vec![0.0f64; d_out * r];
    match init {
        WeightInit::Olora => {
            let qr = mat.qr();
            let q = qr.compute_thin_Q();
            let rm = qr.thin_R();
            for k in 0..r {
                for i in 0..d_in {
                    a[k * d_in + i] = rm[(k, i)];
                }
                for o in 0..d_out {
                    b[o * r + k] = q[(o, k)];
                }
            }
        }
        WeightInit::Pissa { niter } => {
            // Top r left vectors V [out, r], values S, right vectors U [in, r].
            let (v, sv, u) = match niter {
                None => {
                    let svd = mat.thin_svd().map_err(|e| fail("SVD", format!("{e:?}")))?;
                    let (uu, ss, vv) = (svd.U(), svd.S().column_vector(), svd.V());
                    let mut order: Vec<usize> = (0..ss.nrows()).collect();
                    order.sort_by(|x, y| ss[*y].total_cmp(&ss[*x]));
                    let v = faer::Mat::<f64>::from_fn(d_out, r, |i, k| uu[(i, order[k])]);
                    let u = faer::Mat::<f64>::from_fn(d_in, r, |i, k| vv[(i, order[k])]);
                    let sv: Vec<f64> = (0..r).map(|k| ss[order[k]]).collect();
                    (v, sv, u)
                }
                Some(n) => randomized_svd::<B>(&mat, r, n, device)
                    .map_err(|e| fail("randomized SVD", e))?,
            };
            for k in 0..r {
                let root = (sv[k] / s).max(0.0).sqrt();
                for i in 0..d_in {
                    a[k * d_in + i] = root * u[(i, k)];
                }
                for o in 0..d_out {
                    b[o * r + k] = v[(o, k)] * root;
                }
            }
        }
        WeightInit::Orthogonal => unreachable!("not a decomposition"),
    }
    Ok((a, b))
}

#[cfg(not(feature = "svd"))]
#[allow(clippy::too_many_arguments)]
fn decompose<B: Backend>(
    _: WeightInit,
    _: &[f32],
    _: usize,
    _: usize,
    _: usize,
    _: f64,
    _: &str,
    _: &B::Device,
) -> Result<(Vec<f64>, Vec<f64>)> {
    unreachable!("refused by WeightInit::parse without feature `svd`")
}

/// `torch.svd_lowrank(W, q = r, niter)` (Halko et al.): an orthonormal basis of `W G` refined by
/// `niter` power iterations, then the SVD of `Q^T W`. Returns `(V [out, r], S, U [in, r])`.
#[cfg(feature = "svd")]
#[allow(clippy::type_complexity)]
fn randomized_svd<B: Backend>(
    w: &faer::Mat<f64>,
    r: usize,
    niter: usize,
    device: &B::Device,
) -> std::result::Result<(faer::Mat<f64>, Vec<f64>, faer::Mat<f64>), String> {
    let (m, n) = (w.nrows(), w.ncols());
    let g = super::host_values(Tensor::<B, 2>::random(
        [n, r],
        Distribution::Normal(0.0, 1.0),
        device,
    ));
    let g = faer::Mat::<f64>::from_fn(n, r, |i, j| g[i * r + j] as f64);
    let orth = |x: faer::Mat<f64>| x.qr().compute_thin_Q();
    let mut q = orth(w * &g);
    for _ in 0..niter {
        q = orth(w.transpose() * &q);
        q = orth(w * &q);
    }
    let small = q.transpose() * w; // [r, n]
    let svd = small.thin_svd().map_err(|e| format!("{e:?}"))?;
    let (uu, ss, vv) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut order: Vec<usize> = (0..ss.nrows()).collect();
    order.sort_by(|x, y| ss[*y].total_cmp(&ss[*x]));
    let left = &q * uu; // [m, k]
    let v = faer::Mat::<f64>::from_fn(m, r, |i, k| left[(i, order[k])]);
    let u = faer::Mat::<f64>::from_fn(n, r, |i, k| vv[(i, order[k])]);
    let sv: Vec<f64> = (0..r).map(|k| ss[order[k]]).collect();
    Ok((v, sv, u))
}

/// The config of the plain LoRA [`to_plain_lora`] makes: `r` and the patterns doubled,
/// `lora_alpha` doubled (times `sqrt 2` with rsLoRA, keeping the scaling), and
/// `init_lora_weights = true`, as PEFT's `save_pretrained(path_initial_model_for_weight_conversion)`.
pub fn plain_lora_config(config: &LoraConfig) -> Result<LoraConfig> {
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::Unsupported(
            "converting a PiSSA/OLoRA adapter with use_rslora and rank or alpha patterns (PEFT \
             refuses it too)"
                .into(),
        ));
    }
    let mut c = config.clone();
    c.init_lora_weights = InitLoraWeights::Default;
    c.r *= 2;
    c.lora_alpha *= if c.use_rslora { 2f64.sqrt() } else { 2.0 };
    c.rank_pattern = OrderedMap(
        c.rank_pattern
            .0
            .iter()
            .map(|(k, v)| (k.clone(), 2 * v))
            .collect(),
    );
    c.alpha_pattern = OrderedMap(
        c.alpha_pattern
            .0
            .iter()
            .map(|(k, v)| (k.clone(), 2.0 * v))
            .collect(),
    );
    Ok(c)
}

/// PEFT's `subtract_mutated_init` on one site: the trained `(A [r, in], B [out, r])` and the
/// initial `(A_0, B_0)` as one LoRA of rank `2r` on the original base:
/// `(A' [2r, in], B' [out, 2r]) = ([A; A_0], [B, -B_0])`, so `B' A' = B A - B_0 A_0`.
pub fn to_plain_lora(
    a: &[f32],
    b: &[f32],
    a0: &[f32],
    b0: &[f32],
    r: usize,
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut a2 = Vec::with_capacity(2 * r * d_in);
    a2.extend_from_slice(&a[..r * d_in]);
    a2.extend_from_slice(&a0[..r * d_in]);
    let mut b2 = vec![0.0f32; d_out * 2 * r];
    for o in 0..d_out {
        b2[o * 2 * r..o * 2 * r + r].copy_from_slice(&b[o * r..(o + 1) * r]);
        for k in 0..r {
            b2[o * 2 * r + r + k] = -b0[o * r + k];
        }
    }
    (a2, b2)
}
