//! `LoraConfig`: every field Hugging Face PEFT writes to `adapter_config.json`, with PEFT's defaults.
//!
//! Fields this crate interprets are typed; every other field PEFT (any version) writes is kept
//! verbatim in [`LoraConfig::extra`] and written back, so a config survives a round trip.

use serde::de;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::config::{
    LayersToTransform, OrderedMap, PeftConfigHeader, PeftType, StringOrList, TargetModules,
    de_null_false, ser_num, ser_num_map,
};
use crate::error::{PeftError, Result};
use crate::targeting::{Targeting, pattern_value};

/// `init_lora_weights`: `true` (kaiming-uniform A, zero B), `"gaussian"` (A ~ N(0, 1/r), zero B),
/// or `false` (A and B both initialised like a fresh `nn.Linear`, so the adapter is not a no-op).
#[derive(Clone, Debug, PartialEq)]
pub enum InitLoraWeights {
    /// `true`: PEFT's default.
    Default,
    /// `"gaussian"`.
    Gaussian,
    /// `false`: random A and B (useful for tests).
    Random,
    /// Any other string PEFT knows (pissa, olora, loftq, eva, ...); refused when attaching.
    Other(String),
}

impl Serialize for InitLoraWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            InitLoraWeights::Default => s.serialize_bool(true),
            InitLoraWeights::Random => s.serialize_bool(false),
            InitLoraWeights::Gaussian => s.serialize_str("gaussian"),
            InitLoraWeights::Other(o) => s.serialize_str(o),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) if s.eq_ignore_ascii_case("gaussian") => Ok(InitLoraWeights::Gaussian),
            Value::String(s) => Ok(InitLoraWeights::Other(s)),
            other => Err(de::Error::custom(format!(
                "init_lora_weights must be a bool or a string, found {other}"
            ))),
        }
    }
}

/// PEFT's `bias`: which base biases become trainable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias is trained (default).
    None,
    /// Every bias of the model is trained.
    All,
    /// Only the biases of LoRA-targeted layers are trained.
    LoraOnly,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Default
}
fn default_bias() -> Bias {
    Bias::None
}
/// LoRA's `peft_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lora;

impl PeftType for Lora {
    const NAME: &'static str = "LORA";
}

/// Hugging Face PEFT's `LoraConfig`, field for field.
///
/// Defaults equal PEFT's (`r = 8`, `lora_alpha = 8`, `lora_dropout = 0.0`, `bias = "none"`,
/// `init_lora_weights = true`, ...). Unknown fields are kept in [`extra`](Self::extra).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// PEFT's shared header (`peft_type = "LORA"`, `task_type`, `inference_mode`, ...).
    #[serde(flatten)]
    pub header: PeftConfigHeader<Lora>,
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Modules to adapt; `None` takes PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<TargetModules>,
    /// LoRA alpha (scaling = alpha / r).
    #[serde(default = "default_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch's input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    /// For GPT-2 style `Conv1D` weights; no model here has them, so it only round-trips.
    #[serde(default, deserialize_with = "de_null_false")]
    pub fan_in_fan_out: bool,
    /// Which base biases are trained.
    #[serde(default = "default_bias")]
    pub bias: Bias,
    /// Rank-stabilised scaling alpha / sqrt(r).
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_rslora: bool,
    /// Modules (besides LoRA) that get a trainable, saved copy (e.g. a classifier head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// How A and B are initialised.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Only these layer indices are adapted (with a list `target_modules`).
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list (`layer`, `block`, ...) for `layers_to_transform`.
    #[serde(default)]
    pub layers_pattern: Option<StringOrList>,
    /// Per-module ranks: key regex matched against the module path's end.
    #[serde(default)]
    pub rank_pattern: OrderedMap<usize>,
    /// Per-module alphas, matched like `rank_pattern`.
    #[serde(default, serialize_with = "ser_num_map")]
    pub alpha_pattern: OrderedMap<f64>,
    /// Weight-decomposed LoRA (not implemented yet: refused when attaching).
    #[serde(default, deserialize_with = "de_null_false")]
    pub use_dora: bool,
    /// A trainable bias on `lora_B`.
    #[serde(default, deserialize_with = "de_null_false")]
    pub lora_bias: bool,
    /// Every other field, kept verbatim (`peft_version`, `revision`, `megatron_config`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            header: PeftConfigHeader::default(),
            r: default_r(),
            target_modules: None,
            exclude_modules: None,
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: Bias::None,
            use_rslora: false,
            modules_to_save: None,
            init_lora_weights: InitLoraWeights::Default,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: OrderedMap::default(),
            alpha_pattern: OrderedMap::default(),
            use_dora: false,
            lora_bias: false,
            extra: Map::new(),
        }
    }
}

/// Extra fields that, when set to anything but their PEFT default, change the computation in
/// ways this crate does not implement yet.
const UNSUPPORTED_EXTRA: &[&str] = &[
    "use_qalora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "modules_to_tie",
];

impl LoraConfig {
    /// A config with PEFT's defaults and the given rank, alpha and targets.
    pub fn new(r: usize, lora_alpha: f64, target_modules: TargetModules) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: Some(target_modules),
            ..Default::default()
        }
    }

    /// Parses an `adapter_config.json` body.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Serialises as PEFT writes it (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("LoraConfig always serialises")
    }

    /// Checks ranges and refuses options this crate does not implement, the way PEFT's
    /// `__post_init__` and `update_layer` do.
    pub fn validate(&self) -> Result<()> {
        self.header.check()?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if let Some((k, _)) = self.rank_pattern.0.iter().find(|(_, r)| *r == 0) {
            return Err(PeftError::InvalidConfig(format!(
                "rank_pattern[{k:?}] is 0; ranks must be positive"
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "lora_dropout must be in [0, 1), found {}",
                self.lora_dropout
            )));
        }
        if super::init::WeightInit::parse(&self.init_lora_weights)?.is_some() && self.lora_bias {
            return Err(PeftError::Unsupported(format!(
                "init_lora_weights = {:?} with lora_bias",
                self.init_lora_weights
            )));
        }
        self.targeting().validate()?;
        if self.lora_bias && self.init_lora_weights == InitLoraWeights::Gaussian {
            return Err(PeftError::InvalidConfig(
                "lora_bias=True is only supported with init_lora_weights=True or False".into(),
            ));
        }
        for key in UNSUPPORTED_EXTRA {
            match self.extra.get(*key) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(Value::Object(o)) if o.is_empty() => {}
                Some(v) => {
                    return Err(PeftError::Unsupported(format!("{key} = {v}")));
                }
            }
        }
        Ok(())
    }

    /// Where this adapter attaches (PEFT's default LoRA targets when `target_modules` is unset).
    pub fn targeting(&self) -> Targeting {
        Targeting {
            exclude_modules: self.exclude_modules.clone(),
            modules_to_save: self.modules_to_save.clone(),
            layers_to_transform: self.layers_to_transform.clone(),
            layers_pattern: self.layers_pattern.clone(),
            task_type: self.header.task_type,
            ..Targeting::new(
                "LoRA",
                self.target_modules.clone(),
                crate::targeting::default_lora_targets,
            )
        }
    }

    /// The rank for the module at `path` (`rank_pattern` first, then `r`).
    pub fn rank_for(&self, path: &str) -> Result<usize> {
        pattern_value(&self.rank_pattern, path, "rank_pattern", self.r)
    }

    /// The alpha for the module at `path` (`alpha_pattern` first, then `lora_alpha`).
    pub fn alpha_for(&self, path: &str) -> Result<f64> {
        pattern_value(&self.alpha_pattern, path, "alpha_pattern", self.lora_alpha)
    }
}

/// LoRA's scaling factor: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scaling(alpha: f64, r: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> LoraConfig {
        LoraConfig::new(8, 16.0, TargetModules::list(["q", "v"]))
    }

    fn invalid(c: &LoraConfig, needle: &str) {
        match c.validate() {
            Err(PeftError::InvalidConfig(m)) => {
                assert!(m.contains(needle), "{m:?} lacks {needle:?}")
            }
            other => panic!("expected InvalidConfig mentioning {needle:?}, got {other:?}"),
        }
    }

    fn unsupported(c: &LoraConfig, needle: &str) {
        match c.validate() {
            Err(PeftError::Unsupported(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("expected Unsupported mentioning {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn validate_accepts_peft_defaults_and_supported_options() {
        LoraConfig::default().validate().unwrap();
        base().validate().unwrap();
        for init in [
            InitLoraWeights::Default,
            InitLoraWeights::Gaussian,
            InitLoraWeights::Random,
        ] {
            LoraConfig {
                init_lora_weights: init,
                ..base()
            }
            .validate()
            .unwrap();
        }
        for p in [0.0, 0.1, 0.999] {
            LoraConfig {
                lora_dropout: p,
                ..base()
            }
            .validate()
            .unwrap();
        }
        LoraConfig {
            layers_to_transform: Some(LayersToTransform::Many(vec![0, 1])),
            layers_pattern: Some(StringOrList::One("block".into())),
            rank_pattern: OrderedMap(vec![("q".into(), 4)]),
            use_rslora: true,
            lora_bias: true,
            ..base()
        }
        .validate()
        .unwrap();
        // A missing peft_type is this method's.
        let mut c = base();
        c.header.peft_type = None;
        c.validate().unwrap();
    }

    #[test]
    fn validate_refuses_bad_ranges_and_unimplemented_options() {
        invalid(&LoraConfig { r: 0, ..base() }, "`r`");
        invalid(
            &LoraConfig {
                rank_pattern: OrderedMap(vec![("q".into(), 4), ("v".into(), 0)]),
                ..base()
            },
            "rank_pattern[\"v\"]",
        );
        for p in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            invalid(
                &LoraConfig {
                    lora_dropout: p,
                    ..base()
                },
                "lora_dropout",
            );
        }
        for init in ["loftq", "eva", "corda"] {
            unsupported(
                &LoraConfig {
                    init_lora_weights: InitLoraWeights::Other(init.into()),
                    ..base()
                },
                init,
            );
        }
        invalid(
            &LoraConfig {
                layers_pattern: Some(StringOrList::One("block".into())),
                ..base()
            },
            "layers_to_transform",
        );
        // An empty layers_to_transform list does not count as given.
        invalid(
            &LoraConfig {
                layers_pattern: Some(StringOrList::One("block".into())),
                layers_to_transform: Some(LayersToTransform::Many(vec![])),
                ..base()
            },
            "layers_to_transform",
        );
        invalid(
            &LoraConfig {
                target_modules: Some(TargetModules::Regex(r".*\.q".into())),
                layers_to_transform: Some(LayersToTransform::One(0)),
                ..base()
            },
            "`target_modules` is a str",
        );
        let mut c = base();
        c.header.peft_type = Some("IA3".into());
        invalid(&c, "IA3");
        invalid(
            &LoraConfig {
                lora_bias: true,
                init_lora_weights: InitLoraWeights::Gaussian,
                ..base()
            },
            "lora_bias",
        );
        // Extra fields that change the computation are refused unless at their default.
        let mut c = base();
        c.extra.insert("use_qalora".into(), Value::Bool(true));
        unsupported(&c, "use_qalora");
        c.extra.insert("use_qalora".into(), Value::Bool(false));
        c.extra
            .insert("layer_replication".into(), serde_json::json!([]));
        c.validate().unwrap();
        c.extra
            .insert("layer_replication".into(), serde_json::json!([[0, 2]]));
        unsupported(&c, "layer_replication");
    }

    #[test]
    fn json_keeps_unknown_fields_and_reads_a_missing_peft_type_as_lora() {
        let text = r#"{
            "r": 4,
            "lora_alpha": 32,
            "target_modules": ["q", "v"],
            "task_type": "SEQ_2_SEQ_LM",
            "peft_version": "0.21.2",
            "megatron_config": null,
            "some_future_option": {"nested": [1, 2.5, "x"], "flag": true},
            "rank_pattern": {"v": 2, "q": 6},
            "alpha_pattern": {"q": 12.5}
        }"#;
        let c = LoraConfig::from_json(text).unwrap();
        assert_eq!(c.header.peft_type.as_deref(), Some("LORA"));
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 32.0);
        assert_eq!(c.lora_dropout, 0.0, "PEFT's default");
        let keys: Vec<&str> = c.rank_pattern.keys().collect();
        assert_eq!(keys, ["v", "q"], "pattern order is kept");
        let mut extra: Vec<&str> = c.extra.keys().map(String::as_str).collect();
        extra.sort();
        assert_eq!(
            extra,
            ["megatron_config", "peft_version", "some_future_option"]
        );
        c.validate().unwrap();

        let theirs: Value = serde_json::from_str(text).unwrap();
        let ours: Value = serde_json::from_str(&c.to_json()).unwrap();
        for (k, v) in theirs.as_object().unwrap() {
            assert_eq!(&ours[k], v, "{k} round-trips");
        }
        assert_eq!(ours["peft_type"], "LORA", "written out explicitly");
        assert!(
            ours["lora_alpha"].is_u64(),
            "an integral alpha stays an integer"
        );
        let again = LoraConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(again, c);

        // null for a bool PEFT may leave unset reads as false.
        let c = LoraConfig::from_json(r#"{"use_dora": null, "use_rslora": null}"#).unwrap();
        assert!(!c.use_dora && !c.use_rslora);
        assert!(LoraConfig::from_json(r#"{"init_lora_weights": 3}"#).is_err());
    }

    #[test]
    fn rank_and_alpha_follow_the_patterns_first_match_first() {
        let c = LoraConfig {
            rank_pattern: OrderedMap(vec![
                (r"block\.1\..*\.v".into(), 2),
                ("SelfAttention.q".into(), 16),
                ("q".into(), 4),
            ]),
            alpha_pattern: OrderedMap(vec![("v".into(), 64.0)]),
            ..base()
        };
        let q0 = "encoder.block.0.layer.0.SelfAttention.q";
        let eq = "decoder.block.0.layer.1.EncDecAttention.q";
        let v0 = "encoder.block.0.layer.0.SelfAttention.v";
        let v1 = "encoder.block.1.layer.0.SelfAttention.v";
        assert_eq!(c.rank_for(q0).unwrap(), 16, "the first matching key wins");
        assert_eq!(c.rank_for(eq).unwrap(), 4);
        assert_eq!(c.rank_for(v1).unwrap(), 2);
        assert_eq!(c.rank_for(v0).unwrap(), 8, "no key matches: r");
        assert_eq!(c.rank_for("encoder.extra.xq").unwrap(), 8, "xq is not q");
        assert_eq!(c.alpha_for(v0).unwrap(), 64.0);
        assert_eq!(c.alpha_for(q0).unwrap(), 16.0, "no key matches: lora_alpha");
        // Scaling from the resolved values.
        assert_eq!(
            lora_scaling(c.alpha_for(v1).unwrap(), c.rank_for(v1).unwrap(), false),
            32.0
        );
        assert_eq!(lora_scaling(16.0, 4, true), 8.0);
        // A key that is not a valid pattern is an error naming its field.
        let bad = LoraConfig {
            alpha_pattern: OrderedMap(vec![("(".into(), 1.0)]),
            ..base()
        };
        assert!(matches!(
            bad.alpha_for(q0),
            Err(PeftError::InvalidPattern {
                field: "alpha_pattern",
                ..
            })
        ));
    }
}
