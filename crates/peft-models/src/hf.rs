//! Hugging Face parameter names: how a model's parameters map onto a transformers state dict.
//!
//! Models list every parameter under its transformers name; peft-io reads files and assigns.
//! Linear weights are transposed on the way in (PyTorch `[out, in]` to burn `[in, out]`).

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// A parameter reachable by its Hugging Face name.
pub enum HfParamMut<'a, B: Backend> {
    /// A linear weight: transformers stores `[out, in]`, we store `[in, out]`.
    LinearWeight(&'a mut Param<Tensor<B, 2>>),
    /// A matrix stored as-is (embeddings `[vocab, d]`).
    Matrix(&'a mut Param<Tensor<B, 2>>),
    /// A vector (norm scales, biases).
    Vector(&'a mut Param<Tensor<B, 1>>),
}

impl<B: Backend> HfParamMut<'_, B> {
    /// The shape transformers uses for this parameter.
    pub fn hf_shape(&self) -> Vec<usize> {
        match self {
            HfParamMut::LinearWeight(p) => {
                let d = p.lazy_shape().dims::<2>();
                vec![d[1], d[0]]
            }
            HfParamMut::Matrix(p) => p.lazy_shape().dims::<2>().to_vec(),
            HfParamMut::Vector(p) => p.lazy_shape().dims::<1>().to_vec(),
        }
    }

    /// Replaces the value with `values`, laid out in transformers' shape ([`hf_shape`]).
    ///
    /// [`hf_shape`]: Self::hf_shape
    pub fn set(self, values: Vec<f32>, device: &B::Device) {
        let shape = self.hf_shape();
        match self {
            HfParamMut::LinearWeight(p) => {
                let t = peft_core::nn::transposed_from(values, [shape[0], shape[1]], device);
                *p = Param::initialized(p.id, t.require_grad());
            }
            HfParamMut::Matrix(p) => {
                let t = Tensor::<B, 2>::from_data(TensorData::new(values, shape), device);
                *p = Param::initialized(p.id, t.require_grad());
            }
            HfParamMut::Vector(p) => {
                let t = Tensor::<B, 1>::from_data(TensorData::new(values, shape), device);
                *p = Param::initialized(p.id, t.require_grad());
            }
        }
    }

    /// The current value in transformers' layout: shape and row-major values.
    pub fn values(&self) -> (Vec<usize>, Vec<f32>) {
        let shape = self.hf_shape();
        let data = match self {
            HfParamMut::LinearWeight(p) => p.val().transpose().into_data(),
            HfParamMut::Matrix(p) => p.val().into_data(),
            HfParamMut::Vector(p) => p.val().into_data(),
        };
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("float parameter");
        (shape, values)
    }

    /// The device the parameter lives on.
    pub fn device(&self) -> B::Device {
        match self {
            HfParamMut::LinearWeight(p) | HfParamMut::Matrix(p) => p.lazy_device(),
            HfParamMut::Vector(p) => p.lazy_device(),
        }
    }
}

/// A model whose parameters have transformers names.
pub trait HfParams<B: Backend> {
    /// Calls `f` with every parameter's transformers name (`encoder.block.0.layer.0.
    /// SelfAttention.q.weight`) and a handle to set it.
    fn visit_hf_params_mut(&mut self, f: &mut dyn FnMut(&str, HfParamMut<'_, B>));

    /// Names transformers may store for tied parameters, mapped to the parameter they alias
    /// (`encoder.embed_tokens.weight` is `shared.weight`).
    fn tied_aliases(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }

    /// transformers' `base_model_prefix` (`bert`): checkpoints of the bare model omit it, those
    /// of models with heads include it; loading accepts either.
    fn base_model_prefix(&self) -> Option<&'static str> {
        None
    }

    /// Parameters that may be absent from a checkpoint and keep their fresh initialisation
    /// (task heads on top of a pretrained base, as transformers does with a warning).
    fn may_be_newly_initialized(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}
