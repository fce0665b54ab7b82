//! PEFT's `add_weighted_adapter`: one new LoRA adapter from several, weighted
//! (`peft/tuners/lora/model.py` and `peft/utils/merge_utils.py` of PEFT 0.21.2).
//!
//! The computation runs on host matrices in PEFT's file layout (`lora_A` `[r, in]`, `lora_B`
//! `[out, r]`), one site at a time, so it needs no model: `peft merge-adapters` merges adapter
//! files, and [`PeftModel::add_weighted_adapter`](crate::PeftModel::add_weighted_adapter) merges
//! adapters loaded on a model.
//!
//! With adapter `i`'s weight `w_i` and scaling `s_i` on a site:
//! - `cat`: `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`, `B = [B_1, B_2, ...]`: exact, rank the sum of
//!   the ranks;
//! - `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: the `A`s combined with
//!   weights `sign(w_i s_i) sqrt(|w_i s_i|)`, the `B`s with `sqrt(|w_i s_i|)`, each by its task
//!   arithmetic (a rough approximation of the weighted sum: the products of the combined
//!   factors are not the combined products);
//! - `svd` and the `*_svd` variants: the weight changes `s_i B_i A_i` combined with weights
//!   `w_i`, then truncated to rank `svd_rank` (default: the largest rank) by SVD, `B = U_r S_r`,
//!   `A = V_r^T` (optionally clamped at the `svd_clamp` quantile). Needs feature `svd`.
//!
//! The new adapter's config is the first adapter's with `r = lora_alpha =` the new rank (scaling
//! 1, unless the first adapter uses rsLoRA, which PEFT keeps), `target_modules` the union of all,
//! and no rank or alpha patterns.
//!
//! DARE's random pruning is seeded: the keep mask of adapter `i`'s tensor `part` (`lora_A`,
//! `lora_B` or `delta` for the SVD variants) on the site at module path `site` comes from
//! `SplitMix(seed ^ fnv1a64("{site}.{part}") ^ mix(i + 1))`, one draw per element in row-major
//! order, kept when `(u64 >> 11) * 2^-53 < density`. PEFT draws it from torch's global RNG, so
//! the fixtures feed PEFT these masks (`tests/fixtures/merge/make_fixtures.py`).

use std::fmt;
use std::str::FromStr;

use burn::module::Param;
use burn::tensor::backend::Backend;

use super::config::{LoraConfig, lora_scaling};
use crate::config::{OrderedMap, TargetModules};
use crate::error::{PeftError, Result};
use crate::peft_model::PeftModel;
use crate::site::AdapterHost;
use crate::train::SplitMix;

/// How adapters are combined: PEFT's `combination_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CombinationType {
    /// Weighted sum of the factors (same ranks).
    Linear,
    /// Factors stacked: the exact weighted sum, at the sum of the ranks.
    Cat,
    /// Weighted sum of the weight changes, truncated by SVD.
    Svd,
    /// TIES on the factors: magnitude pruning, majority sign, disjoint mean.
    Ties,
    /// TIES on the weight changes, then SVD.
    TiesSvd,
    /// DARE: random pruning with rescaling, then the weighted sum, on the factors.
    DareLinear,
    /// DARE pruning, then TIES' sign election and disjoint mean, on the factors.
    DareTies,
    /// `dare_linear` on the weight changes, then SVD.
    DareLinearSvd,
    /// `dare_ties` on the weight changes, then SVD.
    DareTiesSvd,
    /// Magnitude pruning, then the weighted sum, on the factors.
    MagnitudePrune,
    /// `magnitude_prune` on the weight changes, then SVD.
    MagnitudePruneSvd,
}

/// The task arithmetic behind a combination type (`merge_utils.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arithmetic {
    Sum,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

impl CombinationType {
    /// Every combination type, in PEFT's order.
    pub const ALL: [CombinationType; 11] = [
        Self::Svd,
        Self::Linear,
        Self::Cat,
        Self::Ties,
        Self::TiesSvd,
        Self::DareTies,
        Self::DareLinear,
        Self::DareTiesSvd,
        Self::DareLinearSvd,
        Self::MagnitudePrune,
        Self::MagnitudePruneSvd,
    ];

    /// PEFT's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Svd => "svd",
            Self::Ties => "ties",
            Self::TiesSvd => "ties_svd",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the result is a truncated SVD of the combined weight changes.
    pub fn is_svd(self) -> bool {
        self.as_str().ends_with("svd")
    }

    /// Whether `density` is used (every type that prunes).
    pub fn uses_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }

    fn arithmetic(self) -> Option<Arithmetic> {
        Some(match self {
            Self::Cat => return None,
            Self::Linear | Self::Svd => Arithmetic::Sum,
            Self::Ties | Self::TiesSvd => Arithmetic::Ties,
            Self::DareLinear | Self::DareLinearSvd => Arithmetic::DareLinear,
            Self::DareTies | Self::DareTiesSvd => Arithmetic::DareTies,
            Self::MagnitudePrune | Self::MagnitudePruneSvd => Arithmetic::MagnitudePrune,
        })
    }
}

impl fmt::Display for CombinationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CombinationType {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                PeftError::InvalidConfig(format!(
                    "combination_type {s:?}: expected one of {}",
                    Self::ALL.map(|c| c.as_str()).join(", ")
                ))
            })
    }
}

/// How TIES elects the sign of each element: PEFT's `majority_sign_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MajoritySignMethod {
    /// The sign of the sum of the (pruned) values.
    #[default]
    Total,
    /// The sign that most adapters have.
    Frequency,
}

impl FromStr for MajoritySignMethod {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(PeftError::InvalidConfig(format!(
                "majority_sign_method {s:?}: expected total or frequency"
            ))),
        }
    }
}

/// The options of `add_weighted_adapter`, with PEFT's defaults (`svd`, `total`) and builders.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightedMerge {
    /// How the adapters are combined.
    pub combination_type: CombinationType,
    /// The rank of the SVD types' result (default: the largest rank of the inputs).
    pub svd_rank: Option<usize>,
    /// The quantile at which the SVD types clamp their factors (none by default).
    pub svd_clamp: Option<f64>,
    /// The share of values pruning keeps, in `[0, 1]`; required by the pruning types.
    pub density: Option<f64>,
    /// TIES' sign election.
    pub majority_sign_method: MajoritySignMethod,
    /// The seed of DARE's random pruning.
    pub seed: u64,
}

impl WeightedMerge {
    /// Options for `combination_type`, everything else at PEFT's defaults (seed 42).
    pub fn new(combination_type: CombinationType) -> Self {
        Self {
            combination_type,
            svd_rank: None,
            svd_clamp: None,
            density: None,
            majority_sign_method: MajoritySignMethod::Total,
            seed: 42,
        }
    }

    /// Sets `svd_rank`.
    pub fn with_svd_rank(mut self, rank: usize) -> Self {
        self.svd_rank = Some(rank);
        self
    }

    /// Sets `svd_clamp`.
    pub fn with_svd_clamp(mut self, quantile: f64) -> Self {
        self.svd_clamp = Some(quantile);
        self
    }

    /// Sets `density`.
    pub fn with_density(mut self, density: f64) -> Self {
        self.density = Some(density);
        self
    }

    /// Sets `majority_sign_method`.
    pub fn with_majority_sign_method(mut self, method: MajoritySignMethod) -> Self {
        self.majority_sign_method = method;
        self
    }

    /// Sets the seed of DARE's random pruning.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The combination type that runs for `n` adapters (PEFT uses `linear` for one).
    pub fn effective_type(&self, n: usize) -> CombinationType {
        if n == 1 {
            CombinationType::Linear
        } else {
            self.combination_type
        }
    }

    fn check(&self, n: usize) -> Result<CombinationType> {
        let bad = |m: String| Err(PeftError::InvalidConfig(m));
        if n == 0 {
            return bad("add_weighted_adapter needs at least one adapter".into());
        }
        let ct = self.effective_type(n);
        if ct.is_svd() && !cfg!(feature = "svd") {
            return Err(PeftError::Unsupported(format!(
                "combination_type {ct}: this build of peft-core has no feature `svd`"
            )));
        }
        match (ct.uses_density(), self.density) {
            (true, None) => {
                return bad(format!("combination_type {ct} needs a density in [0, 1]"));
            }
            (true, Some(d)) if !(0.0..=1.0).contains(&d) => {
                return bad(format!("density must be in [0, 1], found {d}"));
            }
            _ => {}
        }
        if let Some(q) = self.svd_clamp
            && !(0.0..=1.0).contains(&q)
        {
            return bad(format!("svd_clamp must be a quantile in [0, 1], found {q}"));
        }
        if self.svd_rank == Some(0) {
            return bad("svd_rank must be at least 1, found 0".into());
        }
        Ok(ct)
    }

    /// PEFT's `_check_add_weighted_adapter` and the config it gives the new adapter: the first
    /// config with `r = lora_alpha =` the new rank, the union of the targets and no patterns.
    /// Returns the config and the combination type that runs (`linear` for one adapter).
    pub fn merged_config(&self, configs: &[&LoraConfig]) -> Result<(LoraConfig, CombinationType)> {
        let ct = self.check(configs.len())?;
        for (i, c) in configs.iter().enumerate() {
            let why = if c.use_dora {
                Some("use_dora = true (the magnitude vector cannot be combined)")
            } else if c.lora_bias {
                Some("lora_bias = true")
            } else if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
                Some("modules_to_save (whole-module copies cannot be combined)")
            } else if c.fan_in_fan_out {
                Some("fan_in_fan_out = true")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(PeftError::Unsupported(format!(
                    "add_weighted_adapter of adapter {} with {why}",
                    i + 1
                )));
            }
        }
        let ranks: Vec<usize> = configs
            .iter()
            .map(|c| {
                c.rank_pattern
                    .0
                    .iter()
                    .map(|(_, r)| *r)
                    .fold(c.r, usize::max)
            })
            .collect();
        let new_rank = match ct {
            CombinationType::Cat => ranks.iter().sum(),
            c if c.is_svd() => self
                .svd_rank
                .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(0)),
            _ => {
                if ranks.iter().any(|r| *r != ranks[0]) {
                    return Err(PeftError::InvalidConfig(format!(
                        "combination_type {ct} needs adapters of one rank, found ranks {ranks:?}; \
                         use cat or an svd type"
                    )));
                }
                ranks[0]
            }
        };
        let targets = configs
            .iter()
            .map(|c| {
                c.target_modules.clone().ok_or_else(|| {
                    PeftError::InvalidConfig(
                        "add_weighted_adapter needs every adapter's target_modules".into(),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let target_modules = match &targets[0] {
            TargetModules::List(_) => {
                let mut names: Vec<String> = Vec::new();
                for t in &targets {
                    let TargetModules::List(l) = t else {
                        return Err(mixed_targets());
                    };
                    for n in l {
                        if !names.contains(n) {
                            names.push(n.clone());
                        }
                    }
                }
                TargetModules::List(names)
            }
            TargetModules::Regex(_) => TargetModules::Regex(
                targets
                    .iter()
                    .map(|t| match t {
                        TargetModules::Regex(r) => Ok(format!("({r})")),
                        TargetModules::List(_) => Err(mixed_targets()),
                    })
                    .collect::<Result<Vec<_>>>()?
                    .join("|"),
            ),
        };
        let mut config = configs[0].clone();
        config.r = new_rank;
        config.lora_alpha = new_rank as f64;
        config.target_modules = Some(target_modules);
        config.rank_pattern = OrderedMap::default();
        config.alpha_pattern = OrderedMap::default();
        Ok((config, ct))
    }

    /// Combines the adapters on one site. `inputs` holds, for every adapter that has the site,
    /// its position in the adapter list, its weight and its factors; `new_rank` is the merged
    /// config's `r`. Returns `(lora_A [new_rank, in], lora_B [out, new_rank])`.
    pub fn combine_site(
        &self,
        site: &str,
        inputs: &[(usize, f64, SiteLora<'_>)],
        n_adapters: usize,
        new_rank: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let ct = self.check(n_adapters)?;
        let Some(first) = inputs.first() else {
            return Err(PeftError::InvalidConfig(format!(
                "{site}: no adapter to combine"
            )));
        };
        let (d_in, d_out) = (first.2.d_in, first.2.d_out);
        for (i, _, f) in inputs {
            f.check(site, *i)?;
            if (f.d_in, f.d_out) != (d_in, d_out) {
                return Err(PeftError::ShapeMismatch {
                    key: format!("{site} (adapter {})", i + 1),
                    expected: vec![d_out, d_in],
                    found: vec![f.d_out, f.d_in],
                });
            }
        }
        let density = self.density.unwrap_or(1.0);
        let Some(arith) = ct.arithmetic() else {
            // cat
            let mut a = vec![0.0f32; new_rank * d_in];
            let mut b = vec![0.0f32; d_out * new_rank];
            let mut row = 0;
            for (_, w, f) in inputs {
                if row + f.rank > new_rank {
                    return Err(rank_error(site, new_rank, row + f.rank));
                }
                let (w, s) = (*w as f32, f.scaling as f32);
                for (dst, src) in a[row * d_in..(row + f.rank) * d_in].iter_mut().zip(f.a) {
                    *dst = *src * w * s;
                }
                for o in 0..d_out {
                    b[o * new_rank + row..o * new_rank + row + f.rank]
                        .copy_from_slice(&f.b[o * f.rank..(o + 1) * f.rank]);
                }
                row += f.rank;
            }
            return Ok((a, b));
        };
        if !ct.is_svd() {
            for (_, _, f) in inputs {
                if f.rank != new_rank {
                    return Err(rank_error(site, new_rank, f.rank));
                }
            }
            let wa: Vec<f32> = inputs
                .iter()
                .map(|(_, w, f)| {
                    let ws = w * f.scaling;
                    (ws.abs().sqrt() * if ws >= 0.0 { 1.0 } else { -1.0 }) as f32
                })
                .collect();
            let wb: Vec<f32> = inputs
                .iter()
                .map(|(_, w, f)| (w * f.scaling).abs().sqrt() as f32)
                .collect();
            let ids: Vec<usize> = inputs.iter().map(|x| x.0).collect();
            let a = self.arithmetic(
                arith,
                inputs.iter().map(|x| x.2.a.to_vec()).collect(),
                &wa,
                &ids,
                &format!("{site}.lora_A"),
                density,
            );
            let b = self.arithmetic(
                arith,
                inputs.iter().map(|x| x.2.b.to_vec()).collect(),
                &wb,
                &ids,
                &format!("{site}.lora_B"),
                density,
            );
            return Ok((a, b));
        }
        let deltas = inputs.iter().map(|(_, _, f)| f.delta_weight()).collect();
        let w: Vec<f32> = inputs.iter().map(|x| x.1 as f32).collect();
        let ids: Vec<usize> = inputs.iter().map(|x| x.0).collect();
        let delta = self.arithmetic(arith, deltas, &w, &ids, &format!("{site}.delta"), density);
        if new_rank > d_in.min(d_out) {
            return Err(PeftError::InvalidConfig(format!(
                "{site}: svd_rank {new_rank} exceeds the layer's smaller side ({})",
                d_in.min(d_out)
            )));
        }
        self.svd(site, &delta, d_out, d_in, new_rank)
    }

    /// One task arithmetic of `merge_utils.py` over tensors of one shape.
    fn arithmetic(
        &self,
        kind: Arithmetic,
        mut tensors: Vec<Vec<f32>>,
        weights: &[f32],
        adapter_ids: &[usize],
        stream: &str,
        density: f64,
    ) -> Vec<f32> {
        match kind {
            Arithmetic::Sum => {}
            Arithmetic::Ties | Arithmetic::MagnitudePrune => {
                for t in &mut tensors {
                    magnitude_prune(t, density);
                }
            }
            Arithmetic::DareLinear | Arithmetic::DareTies => {
                for (t, i) in tensors.iter_mut().zip(adapter_ids) {
                    random_prune(t, density, dare_stream(self.seed, stream, *i));
                }
            }
        }
        let n = tensors[0].len();
        let mut out = vec![0.0f32; n];
        if matches!(kind, Arithmetic::Ties | Arithmetic::DareTies) {
            for (e, o) in out.iter_mut().enumerate() {
                let elect: f32 = match self.majority_sign_method {
                    MajoritySignMethod::Total => tensors.iter().map(|t| t[e]).sum(),
                    MajoritySignMethod::Frequency => tensors.iter().map(|t| sign(t[e])).sum(),
                };
                let majority = if elect >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut kept) = (0.0f32, 0.0f32);
                for (t, w) in tensors.iter().zip(weights) {
                    if sign(t[e]) == majority {
                        sum += t[e] * w;
                        kept += 1.0;
                    }
                }
                *o = sum / kept.max(1.0);
            }
        } else {
            for (t, w) in tensors.iter().zip(weights) {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v * w;
                }
            }
        }
        out
    }

    #[cfg(feature = "svd")]
    fn svd(
        &self,
        site: &str,
        delta: &[f32],
        d_out: usize,
        d_in: usize,
        rank: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mat = faer::Mat::<f64>::from_fn(d_out, d_in, |i, j| delta[i * d_in + j] as f64);
        let svd = mat.thin_svd().map_err(|e| {
            PeftError::InvalidConfig(format!(
                "{site}: the SVD of the combined change failed: {e:?}"
            ))
        })?;
        let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
        let mut order: Vec<usize> = (0..s.nrows()).collect();
        order.sort_by(|x, y| s[*y].total_cmp(&s[*x]));
        // B = U_r S_r [out, r]; A = V_r^T [r, in].
        let mut b = vec![0.0f32; d_out * rank];
        let mut a = vec![0.0f32; rank * d_in];
        for (c, i) in order[..rank].iter().enumerate() {
            for row in 0..d_out {
                b[row * rank + c] = (u[(row, *i)] * s[*i]) as f32;
            }
            for col in 0..d_in {
                a[c * d_in + col] = v[(col, *i)] as f32;
            }
        }
        if let Some(q) = self.svd_clamp {
            let mut dist: Vec<f32> = b.iter().chain(&a).copied().collect();
            dist.sort_by(f32::total_cmp);
            let hi = quantile_sorted(&dist, q);
            for x in b.iter_mut().chain(a.iter_mut()) {
                *x = x.max(-hi).min(hi);
            }
        }
        Ok((a, b))
    }

    #[cfg(not(feature = "svd"))]
    fn svd(
        &self,
        _: &str,
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        unreachable!("refused by check() without feature `svd`")
    }
}

impl<B: Backend, M: AdapterHost<B>> PeftModel<B, M> {
    /// PEFT's `add_weighted_adapter`: adds LoRA adapter `name`, the combination of LoRA
    /// `adapters` with `weights` (see the [module docs](self)). The new adapter is inactive
    /// until [`set_adapter`](Self::set_adapter), like any added adapter.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use burn::backend::NdArray;
    /// use peft_core::methods::lora::weighted::{CombinationType, WeightedMerge};
    /// use peft_core::{AdaptedLinear, AdapterHost, LoraConfig, PeftModel, TargetModules};
    /// # #[derive(burn::module::Module, Debug)]
    /// # struct Tiny<B: burn::tensor::backend::Backend> { proj: AdaptedLinear<B> }
    /// # impl<B: burn::tensor::backend::Backend> AdapterHost<B> for Tiny<B> {
    /// #     fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) { f("proj", &self.proj) }
    /// #     fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) { f("proj", &mut self.proj) }
    /// # }
    /// let device = Default::default();
    /// let model = Tiny::<NdArray> { proj: AdaptedLinear::new(8, 8, true, &device) };
    /// let config = LoraConfig::new(2, 4.0, TargetModules::list(["proj"]));
    /// let mut peft = PeftModel::new(model, config.clone(), "a")?;
    /// peft.add_adapter("b", config)?;
    /// let merge = WeightedMerge::new(CombinationType::Cat);
    /// peft.add_weighted_adapter(&["a", "b"], &[0.7, 0.3], "mix", &merge)?;
    /// assert_eq!(peft.lora_config("mix").map(|c| c.r), Some(4));
    /// # Ok(()) }
    /// ```
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        merge: &WeightedMerge,
    ) -> Result<()> {
        if adapters.len() != weights.len() {
            return Err(PeftError::InvalidConfig(format!(
                "{} weights for {} adapters",
                weights.len(),
                adapters.len()
            )));
        }
        let mut configs = Vec::new();
        for a in adapters {
            match self.adapter_config(a) {
                Some(crate::AdapterConfig::Lora(c)) => configs.push(c.clone()),
                Some(_) => {
                    return Err(PeftError::Unsupported(format!(
                        "add_weighted_adapter of adapter `{a}`: only LoRA adapters combine"
                    )));
                }
                None => {
                    return Err(PeftError::AdapterNotFound {
                        name: a.to_string(),
                        existing: self.adapter_names().join(", "),
                    });
                }
            }
        }
        let (config, _) = merge.merged_config(&configs.iter().collect::<Vec<_>>())?;
        let new_rank = config.r;
        // Every site's inputs, in PEFT's layout: (adapter index, weight, A, B, spec).
        type Owned = (usize, f64, Vec<f32>, Vec<f32>, [usize; 3], f64);
        let mut sites: Vec<(String, Vec<Owned>)> = Vec::new();
        self.base_model.visit_linears(&mut |path, layer| {
            let mut inputs = Vec::new();
            for (i, (a, w)) in adapters.iter().zip(weights).enumerate() {
                if let Some(ad) = layer.adapter(a) {
                    let [d_in, r] = ad.lora_a.val().dims();
                    let d_out = ad.lora_b.val().dims()[1];
                    let at = super::host_values(ad.lora_a.val().transpose());
                    let bt = super::host_values(ad.lora_b.val().transpose());
                    inputs.push((i, *w, at, bt, [r, d_in, d_out], ad.scaling));
                }
            }
            if !inputs.is_empty() {
                sites.push((path.to_string(), inputs));
            }
        });
        let mut combined = Vec::new();
        for (path, inputs) in &sites {
            let views: Vec<(usize, f64, SiteLora<'_>)> = inputs
                .iter()
                .map(|(i, w, a, b, [rank, d_in, d_out], scaling)| {
                    let f = SiteLora {
                        a,
                        b,
                        rank: *rank,
                        d_in: *d_in,
                        d_out: *d_out,
                        scaling: *scaling,
                    };
                    (*i, *w, f)
                })
                .collect();
            let (a, b) = merge.combine_site(path, &views, adapters.len(), new_rank)?;
            let [_, d_in, d_out] = inputs[0].4;
            combined.push((path.clone(), a, b, d_in, d_out));
        }
        self.add_adapter(name, config)?;
        self.base_model.visit_linears_mut(&mut |path, layer| {
            let Some(ad) = layer.adapter_mut(name) else {
                return;
            };
            let device = ad.lora_a.val().device();
            let (a, b) = match combined.iter().find(|c| c.0 == path) {
                Some((_, a, b, d_in, d_out)) => (
                    crate::nn::transposed_from(a.clone(), [new_rank, *d_in], &device),
                    crate::nn::transposed_from(b.clone(), [*d_out, new_rank], &device),
                ),
                // Targeted by the union of the targets but by none of the inputs here.
                None => (ad.lora_a.val().zeros_like(), ad.lora_b.val().zeros_like()),
            };
            ad.lora_a = Param::initialized(ad.lora_a.id, a);
            ad.lora_b = Param::initialized(ad.lora_b.id, b);
        });
        Ok(())
    }
}

fn mixed_targets() -> PeftError {
    PeftError::InvalidConfig(
        "all adapters' target_modules must be of one type (lists, or regular expressions)".into(),
    )
}

fn rank_error(site: &str, expected: usize, found: usize) -> PeftError {
    PeftError::InvalidConfig(format!(
        "{site}: the merged adapter has rank {expected} here, the inputs need {found}"
    ))
}

/// One adapter's LoRA factors on one site, in PEFT's layout.
#[derive(Clone, Copy, Debug)]
pub struct SiteLora<'a> {
    /// `lora_A`, `[rank, d_in]` row-major.
    pub a: &'a [f32],
    /// `lora_B`, `[d_out, rank]` row-major.
    pub b: &'a [f32],
    /// The adapter's rank on this site.
    pub rank: usize,
    /// The layer's input features.
    pub d_in: usize,
    /// The layer's output features.
    pub d_out: usize,
    /// `lora_alpha / r` (or `/ sqrt(r)`) on this site.
    pub scaling: f64,
}

impl SiteLora<'_> {
    fn check(&self, site: &str, i: usize) -> Result<()> {
        for (name, t, shape) in [
            ("lora_A", self.a, [self.rank, self.d_in]),
            ("lora_B", self.b, [self.d_out, self.rank]),
        ] {
            let key = format!("{site}.{name} (adapter {})", i + 1);
            if t.len() != shape[0] * shape[1] {
                return Err(PeftError::ShapeMismatch {
                    key,
                    expected: shape.to_vec(),
                    found: vec![t.len()],
                });
            }
            if let Some(p) = t.iter().position(|v| !v.is_finite()) {
                return Err(PeftError::InvalidConfig(format!(
                    "{key}: element {p} is {}; refusing to combine non-finite values",
                    t[p]
                )));
            }
        }
        Ok(())
    }

    /// `s B A`, `[d_out, d_in]` (PEFT's `get_delta_weight`).
    pub fn delta_weight(&self) -> Vec<f32> {
        let s = self.scaling as f32;
        let mut d = vec![0.0f32; self.d_out * self.d_in];
        for o in 0..self.d_out {
            let row = &mut d[o * self.d_in..(o + 1) * self.d_in];
            for k in 0..self.rank {
                let bk = self.b[o * self.rank + k];
                for (x, a) in row
                    .iter_mut()
                    .zip(&self.a[k * self.d_in..(k + 1) * self.d_in])
                {
                    *x += bk * a;
                }
            }
            for x in row {
                *x *= s;
            }
        }
        d
    }
}

/// The sign as `torch.sign` gives it (0 for 0).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Keeps the `floor(density * n)` largest magnitudes (`magnitude_based_pruning`); ties go to
/// the lower index.
fn magnitude_prune(t: &mut [f32], density: f64) {
    if density >= 1.0 {
        return;
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|x, y| t[*y].abs().total_cmp(&t[*x].abs()).then(x.cmp(y)));
    for i in &order[k..] {
        t[*i] = 0.0;
    }
}

/// DARE's random pruning with rescaling (`random_pruning(..., rescale=True)`), the mask drawn
/// from `rng`.
fn random_prune(t: &mut [f32], density: f64, mut rng: SplitMix) {
    if density >= 1.0 {
        return;
    }
    let d = density as f32;
    for x in t {
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let keep = if u < density { 1.0 } else { 0.0 };
        *x = *x * keep / d;
    }
}

/// The stream of DARE's mask for adapter `adapter` (0-based) on `stream` (`<site>.<part>`).
pub fn dare_stream(seed: u64, stream: &str, adapter: usize) -> SplitMix {
    SplitMix(seed ^ fnv1a64(stream.as_bytes()) ^ SplitMix::mix(adapter as u64 + 1))
}

/// FNV-1a, 64 bits.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `torch.quantile` with linear interpolation, on sorted values.
#[cfg(feature = "svd")]
fn quantile_sorted(v: &[f32], q: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    v[lo] + (v[hi] - v[lo]) * frac
}

/// The scaling of a LoRA config on the site at `path`.
pub fn site_scaling(config: &LoraConfig, path: &str) -> Result<(usize, f64)> {
    let r = config.rank_for(path)?;
    let alpha = config.alpha_for(path)?;
    Ok((r, lora_scaling(alpha, r, config.use_rslora)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site<'a>(
        a: &'a [f32],
        b: &'a [f32],
        rank: usize,
        d_in: usize,
        d_out: usize,
    ) -> SiteLora<'a> {
        SiteLora {
            a,
            b,
            rank,
            d_in,
            d_out,
            scaling: 2.0,
        }
    }

    #[test]
    fn cat_is_the_exact_weighted_sum() {
        let (a1, b1) = ([1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 0.5, 2.0]);
        let (a2, b2) = ([0.5, -1.0], [3.0, 1.0]);
        let m = WeightedMerge::new(CombinationType::Cat);
        let inputs = [
            (0, 0.7, site(&a1, &b1, 2, 2, 2)),
            (1, -0.3, site(&a2, &b2, 1, 2, 2)),
        ];
        let (a, b) = m.combine_site("x", &inputs, 2, 3).unwrap();
        let merged = site(&a, &b, 3, 2, 2);
        let want: Vec<f32> = inputs[0]
            .2
            .delta_weight()
            .iter()
            .zip(inputs[1].2.delta_weight())
            .map(|(x, y)| 0.7 * x - 0.3 * y)
            .collect();
        let got: Vec<f32> = merged.delta_weight().iter().map(|v| v / 2.0).collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn pruning_keeps_the_largest_and_dare_rescales() {
        let mut t = [0.1, -3.0, 2.0, 0.5];
        magnitude_prune(&mut t, 0.5);
        assert_eq!(t, [0.0, -3.0, 2.0, 0.0]);
        let mut t = vec![1.0f32; 10_000];
        random_prune(&mut t, 0.25, dare_stream(1, "s.lora_A", 0));
        let kept = t.iter().filter(|v| **v != 0.0).count();
        assert!((2300..2700).contains(&kept), "{kept}");
        assert!(t.iter().all(|v| *v == 0.0 || *v == 4.0));
    }

    #[test]
    fn ties_elects_the_sign_and_averages_the_agreeing() {
        let m = WeightedMerge::new(CombinationType::Ties).with_density(1.0);
        let out = m.arithmetic(
            Arithmetic::Ties,
            vec![vec![1.0, -1.0], vec![3.0, 0.5], vec![-0.5, -2.0]],
            &[1.0, 1.0, 1.0],
            &[0, 1, 2],
            "s",
            1.0,
        );
        // Element 0: total 3.5 > 0, the positive ones (1, 3) average to 2; element 1: total
        // -2.5, the negative ones (-1, -2) average to -1.5.
        assert_eq!(out, vec![2.0, -1.5]);
    }

    #[test]
    fn options_are_checked() {
        assert!("bogus".parse::<CombinationType>().is_err());
        for c in CombinationType::ALL {
            assert_eq!(c.as_str().parse::<CombinationType>().unwrap(), c);
        }
        let cfg = LoraConfig::new(4, 8.0, TargetModules::list(["q"]));
        let err = WeightedMerge::new(CombinationType::Ties)
            .merged_config(&[&cfg, &cfg])
            .unwrap_err();
        assert!(err.to_string().contains("needs a density"), "{err}");
        let mut other = LoraConfig::new(2, 8.0, TargetModules::list(["v"]));
        let err = WeightedMerge::new(CombinationType::Linear)
            .merged_config(&[&cfg, &other])
            .unwrap_err();
        assert!(err.to_string().contains("one rank"), "{err}");
        let (c, ct) = WeightedMerge::new(CombinationType::Cat)
            .merged_config(&[&cfg, &other])
            .unwrap();
        assert_eq!((c.r, c.lora_alpha, ct), (6, 6.0, CombinationType::Cat));
        assert_eq!(c.target_modules, Some(TargetModules::list(["q", "v"])));
        other.use_dora = true;
        assert!(
            WeightedMerge::new(CombinationType::Cat)
                .merged_config(&[&cfg, &other])
                .is_err()
        );
    }
}
