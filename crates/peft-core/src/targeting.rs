//! Which modules an adapter attaches to, decided exactly as PEFT's `check_target_module_exists`.
//!
//! Everything works on Hugging Face module paths (`encoder.block.0.layer.0.SelfAttention.q`):
//! - a list target matches a path equal to an entry or ending in `.entry`;
//! - a string target is a regular expression that must match the whole path;
//! - `all-linear` is every linear layer except the model's output head(s);
//! - `exclude_modules` (list or regex, same rules) and `modules_to_save` win over targets;
//! - `layers_to_transform` keeps only paths whose first numbered segment (after
//!   `layers_pattern`, when given) is one of the listed indices.
//!
//! Python's `re` and Rust's `regex` share the syntax PEFT configs use in practice; patterns
//! using look-around or back-references are refused with a clear error.

use regex::Regex;

use crate::config::{LayersToTransform, StringOrList, TargetModules, TaskType};
use crate::error::{PeftError, Result};

/// Where a method attaches: the targeting fields every PEFT method's config shares, resolved
/// against a model by [`resolve_targets`]. Each method's config hands one out
/// (`LoraConfig::targeting`, `Ia3Config::targeting`); the rules are PEFT's for all of them.
#[derive(Clone, Debug)]
pub struct Targeting {
    /// Modules to adapt; `None` takes the method's default for the model type.
    pub target_modules: Option<TargetModules>,
    /// Modules never adapted.
    pub exclude_modules: Option<TargetModules>,
    /// Modules that get a trainable, saved copy instead of an adapter.
    pub modules_to_save: Option<Vec<String>>,
    /// Only these layer indices are adapted (with a list `target_modules`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// The name of the layer list (`layer`, `block`, ...) for `layers_to_transform`.
    pub layers_pattern: Option<StringOrList>,
    /// The task: `all-linear` leaves out its output head, and classification tasks save their
    /// head ([`with_task_heads`](Self::with_task_heads)).
    pub task_type: Option<TaskType>,
    /// The method's default targets per `model_type`, used when `target_modules` is `None`.
    pub default_targets: fn(&str) -> Option<&'static [&'static str]>,
    /// The method's name, for error messages (`LoRA`, `IA3`).
    pub method: &'static str,
}

impl Targeting {
    /// Targeting for `target_modules` with PEFT's defaults elsewhere (`method` names the
    /// method in errors, `default_targets` fills `None` targets).
    pub fn new(
        method: &'static str,
        target_modules: Option<TargetModules>,
        default_targets: fn(&str) -> Option<&'static [&'static str]>,
    ) -> Self {
        Targeting {
            target_modules,
            exclude_modules: None,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            task_type: None,
            default_targets,
            method,
        }
    }

    /// PEFT's checks on the targeting fields (`__post_init__`).
    pub fn validate(&self) -> Result<()> {
        if self.layers_pattern.is_some()
            && !self
                .layers_to_transform
                .as_ref()
                .is_some_and(|l| l.is_active())
        {
            return Err(PeftError::InvalidConfig(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified."
                    .into(),
            ));
        }
        if matches!(self.target_modules, Some(TargetModules::Regex(_)))
            && self.layers_to_transform.is_some()
        {
            return Err(PeftError::InvalidConfig(
                "`layers_to_transform` cannot be used when `target_modules` is a str.".into(),
            ));
        }
        if matches!(self.target_modules, Some(TargetModules::Regex(_)))
            && self.layers_pattern.is_some()
        {
            return Err(PeftError::InvalidConfig(
                "`layers_pattern` cannot be used when `target_modules` is a str.".into(),
            ));
        }
        Ok(())
    }

    /// PEFT's config preparation for classification tasks: the heads (`classifier`, `score`)
    /// become `modules_to_save`, so they are trained and saved with the adapter.
    pub fn with_task_heads(mut self) -> Self {
        if matches!(self.task_type, Some(TaskType::SeqCls | TaskType::TokenCls)) {
            let heads = ["classifier", "score"].map(String::from);
            self.modules_to_save
                .get_or_insert_with(Vec::new)
                .extend(heads);
        }
        self
    }
}

/// PEFT's default LoRA targets per `model_type`
/// (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`), for the model types this project has.
pub fn default_lora_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "t5" | "mt5" => &["q", "v"],
        "bart" => &["q_proj", "v_proj"],
        "bert" | "roberta" | "xlm-roberta" => &["query", "value"],
        "llama" | "mistral" | "qwen2" | "gemma" => &["q_proj", "v_proj"],
        _ => return None,
    })
}

fn compile(field: &'static str, pattern: &str, anchored: String) -> Result<Regex> {
    Regex::new(&anchored).map_err(|e| PeftError::InvalidPattern {
        field,
        pattern: pattern.to_string(),
        reason: e.to_string(),
    })
}

/// Python's `re.fullmatch(pattern, key)`; a pattern that does not compile is an error naming
/// `field`.
pub(crate) fn fullmatch(field: &'static str, pattern: &str, key: &str) -> Result<bool> {
    Ok(compile(field, pattern, format!(r"\A(?:{pattern})\z"))?.is_match(key))
}

/// PEFT's `get_pattern_key`: the first key `k` (in order) with `re.match(rf"(.*\.)?({k})$", path)`.
pub fn pattern_key<'a>(
    keys: impl Iterator<Item = &'a str>,
    path: &str,
    field: &'static str,
) -> Result<Option<&'a str>> {
    for key in keys {
        let re = compile(field, key, format!(r"\A(?:.*\.)?(?:{key})\n?\z"))?;
        if re.is_match(path) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// The value `map` (`rank_pattern`, `alpha_pattern`, named `field` in errors) gives the module at
/// `path` by PEFT's `get_pattern_key`, else `default`.
pub fn pattern_value<V: Copy>(
    map: &crate::config::OrderedMap<V>,
    path: &str,
    field: &'static str,
    default: V,
) -> Result<V> {
    Ok(match pattern_key(map.keys(), path, field)? {
        Some(k) => *map.get(k).expect("key from the map"),
        None => default,
    })
}

fn list_match(names: &[String], key: &str) -> bool {
    names.iter().any(|n| {
        key == n
            || (key.len() > n.len()
                && key.ends_with(n.as_str())
                && key.as_bytes()[key.len() - n.len() - 1] == b'.')
    })
}

/// Whether `key` is one of the `modules_to_save` (PEFT: `(^|.*\.){m}($|\..*)`).
pub fn is_module_to_save(modules_to_save: &[String], key: &str) -> Result<bool> {
    for m in modules_to_save {
        let re = compile("modules_to_save", m, format!(r"\A(?:^|.*\.){m}(?:$|\..*)"))?;
        if re.is_match(key) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The outcome of matching one module path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetMatch {
    /// The module gets the adapter.
    Target,
    /// Excluded by `exclude_modules` or `modules_to_save`.
    Excluded,
    /// Not targeted.
    No,
}

/// PEFT's `check_target_module_exists` for one resolved target list.
pub fn check_target(config: &Targeting, targets: &TargetModules, key: &str) -> Result<TargetMatch> {
    if let Some(ex) = &config.exclude_modules {
        let excluded = match ex {
            TargetModules::Regex(p) => fullmatch("exclude_modules", p, key)?,
            TargetModules::List(l) => list_match(l, key),
        };
        if excluded {
            return Ok(TargetMatch::Excluded);
        }
    }
    if let Some(mts) = &config.modules_to_save
        && !mts.is_empty()
        && is_module_to_save(mts, key)?
    {
        return Ok(TargetMatch::Excluded);
    }
    let found = match targets {
        TargetModules::Regex(p) => fullmatch("target_modules", p, key)?,
        TargetModules::List(l) if l.iter().any(|n| n == key) => true,
        TargetModules::List(l) => {
            let mut found = list_match(l, key);
            if found
                && let Some(layers) = config
                    .layers_to_transform
                    .as_ref()
                    .filter(|l| l.is_active())
            {
                found = match layer_index(config, key)? {
                    Some(idx) => layers.contains(idx),
                    None => false,
                };
            }
            found
        }
    };
    Ok(if found {
        TargetMatch::Target
    } else {
        TargetMatch::No
    })
}

/// The layer index PEFT reads from a module path for `layers_to_transform`: the first numbered
/// segment, after a `layers_pattern` entry when one is given.
pub fn layer_index(config: &Targeting, key: &str) -> Result<Option<usize>> {
    let patterns = config
        .layers_pattern
        .as_ref()
        .map(|p| p.as_slice())
        .unwrap_or_default();
    let captures = |re: Regex| {
        re.captures(key)
            .and_then(|c| c.get(1))
            .and_then(|m| m.as_str().parse::<usize>().ok())
    };
    if patterns.is_empty() || patterns.iter().all(|p| p.is_empty()) {
        let re = compile("layers_pattern", "", r"\A.*?\.[^.]*\.(\d+)\.".to_string())?;
        return Ok(captures(re));
    }
    for p in patterns {
        let re = compile("layers_pattern", p, format!(r"\A(?:^|.*?\.){p}\.(\d+)\."))?;
        if let Some(idx) = captures(re) {
            return Ok(Some(idx));
        }
    }
    Ok(None)
}

/// Describes the model to [`resolve_targets`]: its adaptable linear layers and output heads.
pub struct ModelLinears<'a> {
    /// Every adaptable linear layer's path, in model order.
    pub linears: &'a [String],
    /// The model's `model_type` (`t5`, `mt5`, `bert`, ...), for default targets.
    pub model_type: Option<&'a str>,
    /// Paths excluded by `all-linear` (the LM head, or the classifier for `SEQ_CLS`).
    pub output_heads: &'a [String],
}

/// The resolved `target_modules` of `config` for this model (default targets filled in from the
/// model type, `all-linear` expanded).
pub fn effective_targets(config: &Targeting, model: &ModelLinears<'_>) -> Result<TargetModules> {
    match &config.target_modules {
        Some(t) if t.is_all_linear() => Ok(TargetModules::List(
            model
                .linears
                .iter()
                .filter(|p| !model.output_heads.contains(p))
                .cloned()
                .collect(),
        )),
        Some(t) => Ok(t.clone()),
        None => {
            let mt = model.model_type.unwrap_or("<unknown>");
            match (config.default_targets)(mt) {
                Some(d) => Ok(TargetModules::list(d.iter().copied())),
                None => Err(PeftError::InvalidConfig(format!(
                    "target_modules is not set and model type {mt:?} has no default {} \
                     targets; please specify target_modules",
                    config.method
                ))),
            }
        }
    }
}

/// The paths `config` attaches LoRA to, in model order. No match is an error naming the config's
/// targets and the model's linear layers, as PEFT raises.
pub fn resolve_targets(config: &Targeting, model: &ModelLinears<'_>) -> Result<Vec<String>> {
    config.validate()?;
    let targets = effective_targets(config, model)?;
    let mut out = Vec::new();
    for path in model.linears {
        if check_target(config, &targets, path)? == TargetMatch::Target {
            out.push(path.clone());
        }
    }
    if out.is_empty() {
        const SHOWN: usize = 24;
        let mut available: Vec<String> = model.linears.iter().take(SHOWN).cloned().collect();
        if model.linears.len() > SHOWN {
            available.push(format!("... ({} in all)", model.linears.len()));
        }
        let mut targets = match &config.target_modules {
            Some(t) => t.to_string(),
            None => targets.to_string(),
        };
        if let Some(l) = &config.layers_to_transform {
            targets.push_str(&format!(" with layers_to_transform {l:?}"));
        }
        return Err(PeftError::NoTargetMatched {
            targets,
            available: format!("[{}]", available.join(", ")),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A T5-like model: two encoder blocks, three decoder blocks, names as Hugging Face's, plus
    /// a few names built to trip bare-suffix matching.
    fn t5_linears() -> Vec<String> {
        let mut v = Vec::new();
        for b in 0..2 {
            for m in ["q", "k", "v", "o"] {
                v.push(format!("encoder.block.{b}.layer.0.SelfAttention.{m}"));
            }
            v.push(format!("encoder.block.{b}.layer.1.DenseReluDense.wi"));
            v.push(format!("encoder.block.{b}.layer.1.DenseReluDense.wo"));
        }
        for b in 0..3 {
            for m in ["q", "v"] {
                v.push(format!("decoder.block.{b}.layer.0.SelfAttention.{m}"));
                v.push(format!("decoder.block.{b}.layer.1.EncDecAttention.{m}"));
            }
            v.push(format!("decoder.block.{b}.layer.2.DenseReluDense.wi"));
        }
        v.push("encoder.extra.xq".into());
        v.push("encoder.extra.XSelfAttention.q".into());
        v.push("lm_head".into());
        v
    }

    fn lora(targets: TargetModules) -> Targeting {
        Targeting::new("LoRA", Some(targets), default_lora_targets)
    }

    fn resolve(t: &Targeting, linears: &[String], model_type: Option<&str>) -> Result<Vec<String>> {
        let heads = ["lm_head".to_string()];
        resolve_targets(
            t,
            &ModelLinears {
                linears,
                model_type,
                output_heads: &heads,
            },
        )
    }

    fn hits(t: &Targeting, linears: &[String]) -> Vec<String> {
        resolve(t, linears, Some("t5")).unwrap()
    }

    fn check(t: &Targeting, key: &str) -> TargetMatch {
        let targets = t.target_modules.clone().expect("a test target");
        check_target(t, &targets, key).unwrap()
    }

    #[test]
    fn list_targets_match_exactly_or_as_a_dotted_suffix() {
        let t = lora(TargetModules::list(["q"]));
        assert_eq!(check(&t, "q"), TargetMatch::Target, "an exact name");
        assert_eq!(check(&t, "a.b.q"), TargetMatch::Target, "a dotted suffix");
        // A bare string suffix is not a module name: `xq` is not `q`.
        assert_eq!(check(&t, "encoder.extra.xq"), TargetMatch::No);
        assert_eq!(check(&t, "xq"), TargetMatch::No);
        assert_eq!(check(&t, "a.q.b"), TargetMatch::No, "a prefix is no match");
        assert_eq!(check(&t, ""), TargetMatch::No);

        // A dotted entry is matched the same way, on a segment boundary.
        let t = lora(TargetModules::list(["SelfAttention.q"]));
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::Target
        );
        assert_eq!(check(&t, "encoder.extra.XSelfAttention.q"), TargetMatch::No);

        let all = t5_linears();
        let got = hits(&lora(TargetModules::list(["q"])), &all);
        // Every `.q`, `XSelfAttention.q` included (its last segment is `q`), `xq` not.
        assert_eq!(got.len(), 2 + 3 * 2 + 1, "{got:?}");
        assert!(got.iter().all(|p| p.ends_with(".q")), "{got:?}");
        assert!(got.contains(&"encoder.extra.XSelfAttention.q".to_string()));
        assert!(!got.iter().any(|p| p.ends_with("xq")), "{got:?}");
        // Model order is kept.
        let mut sorted_by_model = got.clone();
        sorted_by_model.sort_by_key(|p| all.iter().position(|a| a == p));
        assert_eq!(got, sorted_by_model);
    }

    #[test]
    fn regex_targets_must_match_the_whole_path() {
        // Python's re.fullmatch: `q` alone matches only the path `q`.
        let t = lora(TargetModules::Regex("q".into()));
        assert_eq!(check(&t, "q"), TargetMatch::Target);
        assert_eq!(check(&t, "a.q"), TargetMatch::No);
        assert_eq!(check(&t, "qq"), TargetMatch::No);

        let t = lora(TargetModules::Regex(r".*\.SelfAttention\.(q|v)".into()));
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.v"),
            TargetMatch::Target
        );
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.vv"),
            TargetMatch::No,
            "the match runs to the end"
        );
        assert_eq!(
            check(&t, "decoder.block.0.layer.1.EncDecAttention.q"),
            TargetMatch::No
        );

        // An alternation is anchored as a whole, not only its first branch.
        let t = lora(TargetModules::Regex("a\\.q|b\\.v".into()));
        assert_eq!(check(&t, "b.v"), TargetMatch::Target);
        assert_eq!(check(&t, "a.q"), TargetMatch::Target);
        assert_eq!(check(&t, "xa.q"), TargetMatch::No);
        assert_eq!(check(&t, "b.vx"), TargetMatch::No);

        let got = hits(
            &lora(TargetModules::Regex(r"encoder\..*\.(q|v)".into())),
            &t5_linears(),
        );
        assert_eq!(
            got,
            [
                "encoder.block.0.layer.0.SelfAttention.q",
                "encoder.block.0.layer.0.SelfAttention.v",
                "encoder.block.1.layer.0.SelfAttention.q",
                "encoder.block.1.layer.0.SelfAttention.v",
                "encoder.extra.XSelfAttention.q",
            ]
        );

        // A pattern the regex crate cannot compile is refused naming the field.
        let t = lora(TargetModules::Regex("(q".into()));
        let targets = t.target_modules.clone().unwrap();
        match check_target(&t, &targets, "q") {
            Err(PeftError::InvalidPattern { field, pattern, .. }) => {
                assert_eq!((field, pattern.as_str()), ("target_modules", "(q"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exclude_modules_and_modules_to_save_win_over_targets() {
        let all = t5_linears();
        // List exclusion: exact or dotted suffix, like targets.
        let t = Targeting {
            exclude_modules: Some(TargetModules::list([
                "encoder.block.0.layer.0.SelfAttention.q",
                "EncDecAttention.q",
            ])),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::Excluded
        );
        assert_eq!(
            check(&t, "decoder.block.2.layer.1.EncDecAttention.q"),
            TargetMatch::Excluded
        );
        assert_eq!(
            check(&t, "encoder.block.1.layer.0.SelfAttention.q"),
            TargetMatch::Target
        );
        let got = hits(&t, &all);
        assert_eq!(
            got,
            [
                "encoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.0.layer.0.SelfAttention.q",
                "decoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.2.layer.0.SelfAttention.q",
                "encoder.extra.XSelfAttention.q",
            ]
        );

        // Regex exclusion: a full match.
        let t = Targeting {
            exclude_modules: Some(TargetModules::Regex(r"decoder\..*".into())),
            ..lora(TargetModules::list(["q", "v"]))
        };
        let got = hits(&t, &all);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got.iter().all(|p| p.starts_with("encoder.")), "{got:?}");
        let t = Targeting {
            exclude_modules: Some(TargetModules::Regex("decoder".into())),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(
            check(&t, "decoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::Target,
            "an exclusion regex must match the whole path"
        );

        // modules_to_save: the module itself or anything under it is excluded from LoRA.
        let t = Targeting {
            modules_to_save: Some(vec!["v".into(), "EncDecAttention".into()]),
            ..lora(TargetModules::list(["q", "v"]))
        };
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.v"),
            TargetMatch::Excluded
        );
        assert_eq!(
            check(&t, "decoder.block.0.layer.1.EncDecAttention.q"),
            TargetMatch::Excluded
        );
        assert_eq!(check(&t, "v"), TargetMatch::Excluded);
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::Target
        );
        let got = hits(&t, &all);
        assert_eq!(got.len(), 2 + 3 + 1, "{got:?}");
        assert!(
            got.iter().all(|p| p.ends_with("SelfAttention.q")),
            "{got:?}"
        );
        assert!(is_module_to_save(&["v".into()], "a.v.b").unwrap());
        assert!(!is_module_to_save(&["v".into()], "a.xv").unwrap());
        assert!(!is_module_to_save(&["v".into()], "a.vx").unwrap());
        // An empty list saves nothing.
        let t = Targeting {
            modules_to_save: Some(vec![]),
            ..lora(TargetModules::list(["v"]))
        };
        assert_eq!(check(&t, "a.v"), TargetMatch::Target);
    }

    #[test]
    fn layers_to_transform_without_layers_pattern_reads_the_first_numbered_segment() {
        let all = t5_linears();
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::Many(vec![0, 2])),
            ..lora(TargetModules::list(["wi"]))
        };
        // The block index, not the `layer.N` inside the block (PEFT's decisions in
        // tests/fixtures/lora/targeting.json).
        assert_eq!(
            hits(&t, &all),
            [
                "encoder.block.0.layer.1.DenseReluDense.wi",
                "decoder.block.0.layer.2.DenseReluDense.wi",
                "decoder.block.2.layer.2.DenseReluDense.wi",
            ]
        );
        assert_eq!(
            layer_index(&t, "decoder.block.1.layer.2.DenseReluDense.wi").unwrap(),
            Some(1)
        );
        // A path without a numbered segment has no index: never targeted.
        assert_eq!(layer_index(&t, "lm_head").unwrap(), None);
        assert_eq!(layer_index(&t, "a.b.q").unwrap(), None);
        // One index.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(1)),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(
            hits(&t, &all),
            [
                "encoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.1.layer.0.SelfAttention.q",
                "decoder.block.1.layer.1.EncDecAttention.q",
            ]
        );
        // An empty list transforms every layer.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::Many(vec![])),
            ..lora(TargetModules::list(["wi"]))
        };
        assert_eq!(hits(&t, &all).len(), 5);
        // A target equal to the whole path is taken as is (PEFT checks exact names first).
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(1)),
            ..lora(TargetModules::list([
                "encoder.block.0.layer.0.SelfAttention.q",
            ]))
        };
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::Target
        );
    }

    #[test]
    fn layers_to_transform_with_layers_pattern_reads_the_index_after_the_pattern() {
        let all = t5_linears();
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::Many(vec![2])),
            layers_pattern: Some(StringOrList::One("layer".into())),
            ..lora(TargetModules::list(["q", "v", "wi"]))
        };
        // `layer.2` is the feed-forward sublayer of every decoder block.
        assert_eq!(
            hits(&t, &all),
            [
                "decoder.block.0.layer.2.DenseReluDense.wi",
                "decoder.block.1.layer.2.DenseReluDense.wi",
                "decoder.block.2.layer.2.DenseReluDense.wi",
            ]
        );
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::Many(vec![2])),
            layers_pattern: Some(StringOrList::One("block".into())),
            ..lora(TargetModules::list(["wi"]))
        };
        assert_eq!(
            hits(&t, &all),
            ["decoder.block.2.layer.2.DenseReluDense.wi"]
        );
        // Several patterns: the first that occurs in the path gives the index.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(0)),
            layers_pattern: Some(StringOrList::Many(vec!["h".into(), "block".into()])),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(
            layer_index(&t, "decoder.block.0.layer.1.EncDecAttention.q").unwrap(),
            Some(0)
        );
        assert_eq!(layer_index(&t, "transformer.h.3.attn.q").unwrap(), Some(3));
        // A pattern that is not in the path: no index, so not targeted.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(0)),
            layers_pattern: Some(StringOrList::One("layers".into())),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(
            check(&t, "encoder.block.0.layer.0.SelfAttention.q"),
            TargetMatch::No
        );
        // The pattern is a whole segment: `layer` does not match inside `xlayer`.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(5)),
            layers_pattern: Some(StringOrList::One("layer".into())),
            ..lora(TargetModules::list(["q"]))
        };
        assert_eq!(layer_index(&t, "m.xlayer.5.q").unwrap(), None);
        assert_eq!(layer_index(&t, "layer.5.q").unwrap(), Some(5));

        // The fields are checked as PEFT's __post_init__ does.
        let t = Targeting {
            layers_pattern: Some(StringOrList::One("block".into())),
            ..lora(TargetModules::list(["q"]))
        };
        let err = resolve(&t, &all, Some("t5")).unwrap_err();
        assert!(
            matches!(&err, PeftError::InvalidConfig(m) if m.contains("layers_to_transform")),
            "{err}"
        );
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::One(0)),
            ..lora(TargetModules::Regex(".*q".into()))
        };
        assert!(matches!(
            resolve(&t, &all, Some("t5")),
            Err(PeftError::InvalidConfig(_))
        ));
        // An index no layer has matches nothing; the error names the request and the model.
        let t = Targeting {
            layers_to_transform: Some(LayersToTransform::Many(vec![7])),
            layers_pattern: Some(StringOrList::One("block".into())),
            ..lora(TargetModules::list(["q"]))
        };
        match resolve(&t, &all, Some("t5")) {
            Err(e @ PeftError::NoTargetMatched { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("layers_to_transform"), "{msg}");
                assert!(msg.contains(&all[0]), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn all_linear_leaves_out_the_output_heads() {
        let all = t5_linears();
        for spelling in ["all-linear", "ALL-LINEAR", "All-Linear"] {
            let got = hits(&lora(TargetModules::Regex(spelling.into())), &all);
            assert_eq!(got.len(), all.len() - 1, "{spelling}");
            assert!(!got.iter().any(|p| p == "lm_head"), "{spelling}: {got:?}");
        }
        // No heads: every linear layer. Heads given by the model, e.g. a classifier.
        let heads = ["encoder.extra.xq".to_string(), "lm_head".to_string()];
        let got = resolve_targets(
            &lora(TargetModules::Regex("all-linear".into())),
            &ModelLinears {
                linears: &all,
                model_type: Some("t5"),
                output_heads: &heads,
            },
        )
        .unwrap();
        assert_eq!(got.len(), all.len() - 2);
        let got = resolve_targets(
            &lora(TargetModules::Regex("all-linear".into())),
            &ModelLinears {
                linears: &all,
                model_type: Some("t5"),
                output_heads: &[],
            },
        )
        .unwrap();
        assert_eq!(got, all);
        // exclude_modules still applies.
        let t = Targeting {
            exclude_modules: Some(TargetModules::list(["wi", "wo"])),
            ..lora(TargetModules::Regex("all-linear".into()))
        };
        let got = hits(&t, &all);
        assert_eq!(got.len(), all.len() - 1 - 7, "{got:?}");
    }

    #[test]
    fn default_targets_come_from_the_model_type_and_a_missing_one_is_an_error() {
        let all = t5_linears();
        let t = Targeting::new("LoRA", None, default_lora_targets);
        let got = resolve(&t, &all, Some("t5")).unwrap();
        assert_eq!(
            got.len(),
            2 * 2 + 3 * 4 + 1,
            "t5 defaults to q and v: {got:?}"
        );
        assert!(got.iter().all(|p| p.ends_with(".q") || p.ends_with(".v")));

        for (mt, shown) in [(Some("gpt2"), "\"gpt2\""), (None, "\"<unknown>\"")] {
            match resolve(&t, &all, mt) {
                Err(PeftError::InvalidConfig(m)) => {
                    assert!(m.contains(shown), "{m} names the model type");
                    assert!(m.contains("LoRA"), "{m} names the method");
                    assert!(m.contains("target_modules"), "{m}");
                }
                other => panic!("{mt:?}: {other:?}"),
            }
        }
        let ia3 = Targeting::new("IA3", None, |_| None);
        match resolve(&ia3, &all, Some("bert")) {
            Err(PeftError::InvalidConfig(m)) => {
                assert!(m.contains("\"bert\"") && m.contains("IA3"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(default_lora_targets("bert"), Some(&["query", "value"][..]));
        assert_eq!(default_lora_targets("nope"), None);
    }

    #[test]
    fn pattern_key_takes_the_first_matching_key_in_order() {
        let path = "encoder.block.0.layer.0.SelfAttention.q";
        let keys = ["SelfAttention.q", "q", r".*\.q"];
        assert_eq!(
            pattern_key(keys.iter().copied(), path, "rank_pattern").unwrap(),
            Some("SelfAttention.q")
        );
        let keys = ["q", "SelfAttention.q"];
        assert_eq!(
            pattern_key(keys.iter().copied(), path, "rank_pattern").unwrap(),
            Some("q")
        );
        // A key matches a whole trailing segment run, not a bare suffix.
        let keys = ["q"];
        assert_eq!(
            pattern_key(keys.iter().copied(), "encoder.extra.xq", "rank_pattern").unwrap(),
            None
        );
        assert_eq!(
            pattern_key(keys.iter().copied(), "q", "rank_pattern").unwrap(),
            Some("q")
        );
        // Keys are regular expressions over the end of the path.
        let keys = ["nothing", r"block\.1\..*\.q", "q"];
        assert_eq!(
            pattern_key(
                keys.iter().copied(),
                "encoder.block.1.layer.0.SelfAttention.q",
                "alpha_pattern"
            )
            .unwrap(),
            Some(r"block\.1\..*\.q")
        );
        assert_eq!(
            pattern_key(keys.iter().copied(), path, "alpha_pattern").unwrap(),
            Some("q")
        );
        assert_eq!(
            pattern_key(keys.iter().copied(), "lm_head", "alpha_pattern").unwrap(),
            None
        );
        // A key that does not compile names its field.
        match pattern_key(["(q"].into_iter(), path, "alpha_pattern") {
            Err(PeftError::InvalidPattern { field, .. }) => assert_eq!(field, "alpha_pattern"),
            other => panic!("{other:?}"),
        }
    }
}
