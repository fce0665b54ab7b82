//! Shared test helpers: golden fixture loading and the toy model mirrored from
//! `tests/fixtures/lora/make_fixtures.py`.
#![allow(dead_code)]

pub mod methods;
pub mod toy;

use std::collections::HashMap;
use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The CPU backend every numeric test runs on.
pub type B = burn::backend::NdArray<f32>;
/// The same with autodiff, for training steps.
pub type AB = burn::backend::Autodiff<B>;

pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// All tensors of a safetensors fixture, as (shape, f32 values).
pub struct Fixture {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub ints: HashMap<String, (Vec<usize>, Vec<i64>)>,
}

impl Fixture {
    pub fn load(rel: &str) -> Self {
        let path = fixture_path(rel);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors fixture");
        let mut tensors = HashMap::new();
        let mut ints = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() == safetensors::Dtype::I64 {
                let values = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                ints.insert(name.to_string(), (view.shape().to_vec(), values));
                continue;
            }
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name.to_string(), (view.shape().to_vec(), values));
        }
        Fixture { tensors, ints }
    }

    pub fn get_int<BK: Backend, const D: usize>(
        &self,
        key: &str,
        device: &BK::Device,
    ) -> Tensor<BK, D, Int> {
        let (shape, values) = self
            .ints
            .get(key)
            .unwrap_or_else(|| panic!("fixture int tensor {key} missing"));
        Tensor::from_data(TensorData::new(values.clone(), shape.clone()), device)
    }

    /// An int tensor as rows of signed values.
    pub fn rows_i64(&self, key: &str) -> Vec<Vec<i64>> {
        let (shape, values) = &self.ints[key];
        values.chunks(shape[1]).map(|r| r.to_vec()).collect()
    }

    /// An int tensor as rows of ids.
    pub fn rows(&self, key: &str) -> Vec<Vec<usize>> {
        let (shape, values) = &self.ints[key];
        values
            .chunks(shape[1])
            .map(|r| r.iter().map(|v| *v as usize).collect())
            .collect()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn get<BK: Backend, const D: usize>(
        &self,
        key: &str,
        device: &BK::Device,
    ) -> Tensor<BK, D> {
        let (shape, values) = self
            .tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"));
        Tensor::from_data(TensorData::new(values.clone(), shape.clone()), device)
    }

    /// Keys starting with `prefix`, with the prefix removed.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect();
        keys.sort();
        keys
    }
}

pub fn to_vec<BK: Backend, const D: usize>(t: Tensor<BK, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Largest absolute difference (infinite when either side has NaN/Inf, see
/// `peft::core::check::max_abs_diff`); panics with `what` when above `tol` or when shapes differ.
pub fn assert_close<BK: Backend, const D: usize>(
    ours: Tensor<BK, D>,
    theirs: Tensor<BK, D>,
    tol: f32,
    what: &str,
) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shapes differ");
    let max = peft::core::check::max_abs_diff(&to_vec(ours), &to_vec(theirs));
    assert!(max <= tol, "{what}: max |ours - PEFT| = {max:e} > {tol:e}");
    max
}

/// Like [`assert_close`], but records a failure in `fails` instead of panicking, so a test
/// over many cases reports all of them.
pub fn check_close<BK: Backend, const D: usize>(
    fails: &mut peft::core::check::Failures,
    ours: Tensor<BK, D>,
    theirs: Tensor<BK, D>,
    tol: f32,
    what: &str,
) -> f32 {
    if ours.dims() != theirs.dims() {
        fails.fail(format!(
            "{what}: shape {:?} vs {:?}",
            ours.dims(),
            theirs.dims()
        ));
        return f32::INFINITY;
    }
    fails.check(what, &to_vec(ours), &to_vec(theirs), tol)
}

pub fn read_json(rel: &str) -> serde_json::Value {
    let path = fixture_path(rel);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// `Some(value)`, or `None` with the error recorded as a failure of `what`.
pub fn ok<T, E: std::fmt::Display>(
    fails: &mut peft::core::check::Failures,
    r: Result<T, E>,
    what: &str,
) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            fails.fail(format!("{what}: {e}"));
            None
        }
    }
}
