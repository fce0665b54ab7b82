//! Every adapter type lists its tensors once: the key the reference library stores it under
//! (relative to the adapter's site), how the file lays it out, and the parameter itself.
//!
//! Saving and loading (peft-io), the trainer's stable parameter ids, gradient switching and
//! parameter counts ([`crate::PeftModel`]) all derive from that one list
//! ([`AdapterParams`]), so a method's tensors are named in exactly one place.

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// How the reference library's file lays a tensor out, relative to burn's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileLayout {
    /// The same shape.
    AsIs,
    /// A matrix stored transposed (PyTorch's `[out, in]` for burn's `[in, out]`).
    Transposed,
    /// The same values under another shape (IA3's `[1, n]` or `[n, 1]` for a `[n]` vector).
    Reshaped(Vec<usize>),
}

/// One of an adapter's parameters, borrowed.
pub enum ParamRef<'a, B: Backend> {
    /// A vector.
    D1(&'a Param<Tensor<B, 1>>),
    /// A matrix.
    D2(&'a Param<Tensor<B, 2>>),
}

/// One of an adapter's parameters, borrowed mutably.
pub enum ParamMut<'a, B: Backend> {
    /// A vector.
    D1(&'a mut Param<Tensor<B, 1>>),
    /// A matrix.
    D2(&'a mut Param<Tensor<B, 2>>),
}

/// One named tensor of an adapter: its key relative to the site (`lora_A.weight`, `ia3_l`,
/// `adapter_up.weight`), the file layout and the parameter.
pub struct NamedParam<P> {
    /// The key under the site's path, as the reference library writes it.
    pub key: &'static str,
    /// How the file lays the tensor out.
    pub layout: FileLayout,
    /// The parameter.
    pub param: P,
}

impl<B: Backend> ParamRef<'_, B> {
    /// burn's shape, without materialising a lazy parameter.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            ParamRef::D1(p) => p.lazy_shape().to_vec(),
            ParamRef::D2(p) => p.lazy_shape().to_vec(),
        }
    }

    /// Number of elements, without materialising a lazy parameter.
    pub fn num_elements(&self) -> usize {
        self.shape().iter().product()
    }

    /// The parameter's id.
    pub fn id(&self) -> ParamId {
        match self {
            ParamRef::D1(p) => p.id,
            ParamRef::D2(p) => p.id,
        }
    }

    /// The values in the file's layout: `(shape, row-major f32 data)`.
    pub fn to_file(&self, layout: &FileLayout) -> (Vec<usize>, Vec<f32>) {
        let data = match (self, layout) {
            (ParamRef::D2(p), FileLayout::Transposed) => p.val().transpose().into_data(),
            (ParamRef::D2(p), _) => p.val().into_data(),
            (ParamRef::D1(p), _) => p.val().into_data(),
        };
        let shape = file_shape(&self.shape(), layout);
        let values = data
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("float parameters convert to f32");
        (shape, values)
    }
}

/// The shape a tensor has in the file, given burn's shape and the layout.
pub fn file_shape(shape: &[usize], layout: &FileLayout) -> Vec<usize> {
    match layout {
        FileLayout::AsIs => shape.to_vec(),
        FileLayout::Transposed => shape.iter().rev().copied().collect(),
        FileLayout::Reshaped(s) => s.clone(),
    }
}

impl<B: Backend> ParamMut<'_, B> {
    /// Borrows it immutably.
    pub fn as_ref(&self) -> ParamRef<'_, B> {
        match self {
            ParamMut::D1(p) => ParamRef::D1(p),
            ParamMut::D2(p) => ParamRef::D2(p),
        }
    }

    /// Turns gradients on or off.
    pub fn set_require_grad(&mut self, on: bool) {
        match self {
            ParamMut::D1(p) => **p = p.clone().set_require_grad(on),
            ParamMut::D2(p) => **p = p.clone().set_require_grad(on),
        }
    }

    /// Gives the parameter another id, keeping its value (and materialising it).
    pub fn set_id(&mut self, id: ParamId) {
        match self {
            ParamMut::D1(p) => **p = Param::initialized(id, p.val()),
            ParamMut::D2(p) => **p = Param::initialized(id, p.val()),
        }
    }

    /// Replaces the value with `values` given in the file's layout (the caller checked the
    /// shape against [`file_shape`]); the parameter keeps its id.
    pub fn assign_file(&mut self, values: Vec<f32>, layout: &FileLayout, device: &B::Device) {
        let shape = self.as_ref().shape();
        match self {
            ParamMut::D1(p) => {
                let t = Tensor::from_data(TensorData::new(values, shape), device);
                **p = Param::initialized(p.id, t);
            }
            ParamMut::D2(p) => {
                let t = if *layout == FileLayout::Transposed {
                    let fs = file_shape(&shape, layout);
                    crate::nn::transposed_from(values, [fs[0], fs[1]], device)
                } else {
                    Tensor::from_data(TensorData::new(values, shape), device)
                };
                **p = Param::initialized(p.id, t);
            }
        }
    }

    /// The device the parameter lives on (without materialising it).
    pub fn device(&self) -> B::Device {
        match self {
            ParamMut::D1(p) => p.lazy_device(),
            ParamMut::D2(p) => p.lazy_device(),
        }
    }
}

/// An adapter type's list of its tensors, written once per type.
pub trait AdapterParams<B: Backend> {
    /// Calls `f` with every tensor of the adapter, in file order.
    fn visit_params(&self, f: &mut dyn FnMut(NamedParam<ParamRef<'_, B>>));

    /// Like [`visit_params`](Self::visit_params), mutably.
    fn visit_params_mut(&mut self, f: &mut dyn FnMut(NamedParam<ParamMut<'_, B>>));

    /// Number of parameters, without materialising lazy ones.
    fn param_count(&self) -> usize {
        let mut n = 0;
        self.visit_params(&mut |p| n += p.param.num_elements());
        n
    }

    /// Turns gradients on or off for every tensor of the adapter.
    fn set_require_grad(&mut self, on: bool) {
        self.visit_params_mut(&mut |mut p| p.param.set_require_grad(on));
    }
}
