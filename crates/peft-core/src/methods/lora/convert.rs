//! DoRA to plain LoRA (feature `svd`), so a DoRA adapter can be served where only LoRA is
//! accepted.
//!
//! On every site, the change DoRA makes to the weight is `D = m / |W + dW| * (W + dW) - W` (what
//! merging adds; `dW = s B A`). Its truncated SVD at rank `r`, `D ~ U_r S_r V_r^T`, becomes a
//! LoRA adapter with `A = U_r sqrt(S_r)`, `B = sqrt(S_r) V_r^T` and `lora_alpha = r` (scaling 1):
//! the best rank-`r` approximation in the Frobenius norm. DoRA's rescaling of `W` itself is
//! generally of full rank, so the error is not zero; it is reported per site, from the
//! singular values left out: `|D - D_r| / |D| = sqrt(sum_{i >= r} S_i^2 / sum_i S_i^2)`.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::config::{InitLoraWeights, LoraConfig};
use crate::adapted_linear::dora_weight_norm;
use crate::error::{PeftError, Result};
use crate::methods::AdapterConfig;
use crate::peft_model::PeftModel;
use crate::site::AdapterHost;

/// How well one site's rank-`r` LoRA reproduces its DoRA change.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteApproximation {
    /// The site (HF module path).
    pub path: String,
    /// Rank kept.
    pub rank: usize,
    /// `|D|_F`, the size of DoRA's change to the weight.
    pub norm: f64,
    /// `|D - D_r|_F / |D|_F`.
    pub relative_error: f64,
}

/// What [`dora_to_lora`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    /// The new adapter's config (plain LoRA).
    pub config: LoraConfig,
    /// One entry per site, in model order.
    pub sites: Vec<SiteApproximation>,
    /// `sqrt(sum |D - D_r|^2 / sum |D|^2)` over all sites.
    pub relative_error: f64,
}

/// Adds adapter `lora`, a plain LoRA of rank `rank` approximating DoRA adapter `dora` of `peft`
/// (its `modules_to_save` copies are carried over as they are). `dora` is left in place.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use burn::backend::NdArray;
/// use peft_core::methods::lora::convert::dora_to_lora;
/// use peft_core::{AdaptedLinear, AdapterHost, LoraConfig, PeftModel, TargetModules};
/// # #[derive(burn::module::Module, Debug)]
/// # struct Tiny<B: burn::tensor::backend::Backend> { proj: AdaptedLinear<B> }
/// # impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
/// #     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) { f("proj", &self.proj) }
/// #     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) { f("proj", &mut self.proj) }
/// # }
/// let device = Default::default();
/// let model = Tiny::<NdArray> { proj: AdaptedLinear::new(8, 8, true, &device) };
/// let mut dora = LoraConfig::new(2, 4.0, TargetModules::list(["proj"]));
/// dora.use_dora = true;
/// let mut peft = PeftModel::new(model, dora, "dora")?;
/// // At full rank (8) the LoRA reproduces DoRA's change exactly, up to rounding.
/// let report = dora_to_lora(&mut peft, "dora", "lora", 8)?;
/// assert!(report.relative_error < 1e-5);
/// assert!(!report.config.use_dora && report.config.r == 8);
/// # Ok(()) }
/// ```
pub fn dora_to_lora<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    dora: &str,
    lora: &str,
    rank: usize,
) -> Result<Conversion> {
    let source = match peft.adapter_config(dora) {
        Some(AdapterConfig::Lora(c)) if c.use_dora => c.clone(),
        Some(_) => {
            return Err(PeftError::InvalidConfig(format!(
                "adapter `{dora}` is not a DoRA adapter (use_dora = false): nothing to convert"
            )));
        }
        None => {
            return Err(PeftError::AdapterNotFound {
                name: dora.to_string(),
                existing: peft.adapter_names().join(", "),
            });
        }
    };
    if rank == 0 {
        return Err(PeftError::InvalidConfig(
            "the LoRA rank must be at least 1, found 0".into(),
        ));
    }
    if source.lora_bias {
        return Err(PeftError::Unsupported(
            "converting a DoRA adapter with lora_bias = true".into(),
        ));
    }
    if peft.is_merged() {
        return Err(PeftError::Merged("convert an adapter"));
    }

    // The change DoRA makes to every site's weight, and its truncated SVD.
    let mut factors: Vec<(String, Vec<f32>, Vec<f32>, usize)> = Vec::new();
    let mut sites = Vec::new();
    let (mut err2, mut norm2) = (0.0f64, 0.0f64);
    let mut failure = None;
    peft.base_model.visit_linears(&mut |path, layer| {
        if failure.is_some() {
            return;
        }
        let Some(a) = layer.adapter(dora) else {
            return;
        };
        let Some(m) = &a.magnitude else {
            return;
        };
        let w = layer.weight.val();
        let [d_in, d_out] = w.dims();
        let delta = a.delta_weight();
        let factor = m.val() / dora_weight_norm(w.clone(), delta.clone());
        let d = super::host_values((w.clone() + delta) * factor.unsqueeze_dim::<2>(0) - w);
        let mat = faer::Mat::<f64>::from_fn(d_in, d_out, |i, j| d[i * d_out + j] as f64);
        let svd = match mat.thin_svd() {
            Ok(s) => s,
            Err(e) => {
                failure = Some(format!("the SVD of {path}'s DoRA change failed: {e:?}"));
                return;
            }
        };
        let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let k = s.nrows();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|x, y| s[*y].total_cmp(&s[*x]));
        let r = rank.min(k);
        let total: f64 = (0..k).map(|i| s[i] * s[i]).sum();
        let kept: f64 = order[..r].iter().map(|i| s[*i] * s[*i]).sum();
        let left = (total - kept).max(0.0);
        // A = U_r sqrt(S_r) ([in, r]); B = sqrt(S_r) V_r^T ([r, out]); padded with zeros to
        // `rank` where the site has fewer singular values.
        let mut av = vec![0.0f32; d_in * rank];
        let mut bv = vec![0.0f32; rank * d_out];
        for (c, i) in order[..r].iter().enumerate() {
            let root = s[*i].max(0.0).sqrt();
            for row in 0..d_in {
                av[row * rank + c] = (u[(row, *i)] * root) as f32;
            }
            for col in 0..d_out {
                bv[c * d_out + col] = (v[(col, *i)] * root) as f32;
            }
        }
        err2 += left;
        norm2 += total;
        sites.push(SiteApproximation {
            path: path.to_string(),
            rank: r,
            norm: total.sqrt(),
            relative_error: if total > 0.0 {
                (left / total).sqrt()
            } else {
                0.0
            },
        });
        factors.push((path.to_string(), av, bv, d_in));
    });
    if let Some(f) = failure {
        return Err(PeftError::InvalidConfig(f));
    }

    let mut config = source;
    config.use_dora = false;
    config.r = rank;
    config.lora_alpha = rank as f64;
    config.use_rslora = false;
    config.rank_pattern = Default::default();
    config.alpha_pattern = Default::default();
    config.init_lora_weights = InitLoraWeights::Default;
    peft.add_adapter(lora, config.clone())?;
    let mut missing = None;
    peft.base_model.visit_linears_mut(&mut |path, layer| {
        if let Some((_, av, bv, d_in)) = factors.iter().find(|f| f.0 == path) {
            let d_out = layer.d_output();
            let device = layer.weight.val().device();
            let Some(ad) = layer.adapter_mut(lora) else {
                missing = Some(path.to_string());
                return;
            };
            let a = Tensor::<B, 2>::from_data(TensorData::new(av.clone(), [*d_in, rank]), &device);
            let b = Tensor::<B, 2>::from_data(TensorData::new(bv.clone(), [rank, d_out]), &device);
            ad.lora_a = Param::initialized(ad.lora_a.id, a);
            ad.lora_b = Param::initialized(ad.lora_b.id, b);
        }
        // `modules_to_save`: the DoRA adapter's trained copies, as they are.
        let copy = layer
            .saved_copy(dora)
            .map(|s| (s.weight.val(), s.bias.as_ref().map(|b| b.val())));
        if let (Some((w, b)), Some(target)) = (
            copy,
            layer.modules_to_save.iter_mut().find(|s| s.name == lora),
        ) {
            target.weight = Param::initialized(target.weight.id, w);
            if let (Some(old), Some(new)) = (&target.bias, b) {
                target.bias = Some(Param::initialized(old.id, new));
            }
        }
    });
    if let Some(path) = missing {
        return Err(PeftError::InvalidConfig(format!(
            "{path}: the LoRA adapter did not land where the DoRA adapter is"
        )));
    }
    Ok(Conversion {
        config,
        sites,
        relative_error: if norm2 > 0.0 {
            (err2 / norm2).sqrt()
        } else {
            0.0
        },
    })
}
