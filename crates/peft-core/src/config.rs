//! What every method's `adapter_config.json` shares: PEFT's config header
//! ([`PeftConfigHeader`]: `peft_type`, `task_type`, `base_model_name_or_path`, `revision`,
//! `inference_mode`), [`TaskType`], the target-list types, and the serde helpers that keep a
//! config's fields as PEFT writes them.

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;

use crate::error::{PeftError, Result};

/// PEFT's `TaskType`: which head the base model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskType {
    /// Sequence classification (`BertForSequenceClassification`).
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// Sequence-to-sequence language modelling (T5, mT5, mt0).
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// Causal language modelling.
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// Token classification.
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    /// Extractive question answering.
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    /// Bare encoder producing hidden states.
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

/// `target_modules` / `exclude_modules`: a list of names (exact or `.suffix` match) or one regex
/// (full match). The string `all-linear` in `target_modules` means every linear layer but the
/// output head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched exactly or as a dotted suffix.
    List(Vec<String>),
    /// A regular expression that must match the whole module path.
    Regex(String),
}

impl TargetModules {
    /// Builds a list target from names.
    pub fn list<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }

    /// `all-linear`, matched case-insensitively as PEFT does.
    pub fn is_all_linear(&self) -> bool {
        matches!(self, TargetModules::Regex(s) if s.eq_ignore_ascii_case("all-linear"))
    }
}

impl fmt::Display for TargetModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetModules::List(v) => write!(f, "{v:?}"),
            TargetModules::Regex(s) => write!(f, "{s:?}"),
        }
    }
}

/// `layers_to_transform`: one layer index or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// A single layer index.
    One(usize),
    /// Several layer indices.
    Many(Vec<usize>),
}

impl LayersToTransform {
    /// Whether any layer is listed.
    pub fn is_active(&self) -> bool {
        match self {
            LayersToTransform::One(_) => true,
            LayersToTransform::Many(v) => !v.is_empty(),
        }
    }

    /// Whether layer `idx` is listed.
    pub fn contains(&self, idx: usize) -> bool {
        match self {
            LayersToTransform::One(i) => *i == idx,
            LayersToTransform::Many(v) => v.contains(&idx),
        }
    }
}

/// A string or a list of strings (`layers_pattern`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl StringOrList {
    /// The strings.
    pub fn as_slice(&self) -> &[String] {
        match self {
            StringOrList::One(s) => std::slice::from_ref(s),
            StringOrList::Many(v) => v,
        }
    }
}

/// A JSON object whose key order is kept: PEFT's `rank_pattern` and `alpha_pattern` are looked up
/// in insertion order, first match wins.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> OrderedMap<V> {
    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object or null")
            }
            fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(OrderedMap(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_any(V2(std::marker::PhantomData))
    }
}

/// A number written as an integer when it is integral (PEFT writes `lora_alpha: 32`, not `32.0`).
pub(crate) fn ser_num<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

pub(crate) fn ser_num_map<S: Serializer>(
    m: &OrderedMap<f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(m.0.len()))?;
    for (k, v) in &m.0 {
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

/// A bool that PEFT may write as `null` (meaning false).
pub(crate) fn de_null_false<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// Serde default `true`.
pub(crate) fn default_true() -> bool {
    true
}

/// The `peft_type` a method's config carries (`"LORA"`, `"IA3"`).
pub trait PeftType: 'static {
    /// The value PEFT writes.
    const NAME: &'static str;
}

fn default_peft_type<T: PeftType>() -> Option<String> {
    Some(T::NAME.to_string())
}

/// PEFT's `PeftConfig` header, the fields every method's `adapter_config.json` starts with.
/// Each method's config flattens it (`#[serde(flatten)]`), so it is written once for all.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct PeftConfigHeader<T: PeftType> {
    /// The method (`"LORA"`, `"IA3"`); a missing field reads as the config's own method.
    #[serde(default = "default_peft_type::<T>")]
    pub peft_type: Option<String>,
    /// The task (decides the default head handling).
    #[serde(default)]
    pub task_type: Option<TaskType>,
    /// The base model this adapter was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The base model's revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// `true` in saved configs: adapters load frozen.
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(skip)]
    method: PhantomData<T>,
}

impl<T: PeftType> PeftConfigHeader<T> {
    /// Sets `task_type`.
    pub fn with_task_type(mut self, task_type: Option<TaskType>) -> Self {
        self.task_type = task_type;
        self
    }

    /// Sets `base_model_name_or_path`.
    pub fn with_base_model(mut self, name_or_path: Option<String>) -> Self {
        self.base_model_name_or_path = name_or_path;
        self
    }

    /// Sets `inference_mode`.
    pub fn with_inference_mode(mut self, on: bool) -> Self {
        self.inference_mode = on;
        self
    }

    /// Refuses a `peft_type` other than the config's own method.
    pub fn check(&self) -> Result<()> {
        match &self.peft_type {
            Some(t) if t != T::NAME => Err(PeftError::InvalidConfig(format!(
                "peft_type is {t:?}, expected {:?}",
                T::NAME
            ))),
            _ => Ok(()),
        }
    }
}

impl<T: PeftType> Default for PeftConfigHeader<T> {
    fn default() -> Self {
        PeftConfigHeader {
            peft_type: default_peft_type::<T>(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            method: PhantomData,
        }
    }
}

impl<T: PeftType> Clone for PeftConfigHeader<T> {
    fn clone(&self) -> Self {
        PeftConfigHeader {
            peft_type: self.peft_type.clone(),
            task_type: self.task_type,
            base_model_name_or_path: self.base_model_name_or_path.clone(),
            revision: self.revision.clone(),
            inference_mode: self.inference_mode,
            method: PhantomData,
        }
    }
}

impl<T: PeftType> PartialEq for PeftConfigHeader<T> {
    fn eq(&self, o: &Self) -> bool {
        self.peft_type == o.peft_type
            && self.task_type == o.task_type
            && self.base_model_name_or_path == o.base_model_name_or_path
            && self.revision == o.revision
            && self.inference_mode == o.inference_mode
    }
}

impl<T: PeftType> fmt::Debug for PeftConfigHeader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeftConfigHeader")
            .field("peft_type", &self.peft_type)
            .field("task_type", &self.task_type)
            .field("base_model_name_or_path", &self.base_model_name_or_path)
            .field("revision", &self.revision)
            .field("inference_mode", &self.inference_mode)
            .finish()
    }
}
