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
