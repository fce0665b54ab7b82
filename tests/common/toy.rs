//! The toy model of `tests/fixtures/lora/make_fixtures.py`:
//! `embed_proj -> 3 x (q, v, ff, out) -> head`, with PEFT-compatible module paths.

use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::activation::tanh;
use burn::tensor::backend::Backend;
use peft::core::{AdaptedLinear, AdapterHost, PeftModel};

use super::Fixture;

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub q: AdaptedLinear<B>,
    pub v: AdaptedLinear<B>,
    pub ff: AdaptedLinear<B>,
    pub out: AdaptedLinear<B>,
}

#[derive(Module, Debug)]
pub struct Toy<B: Backend> {
    pub embed_proj: AdaptedLinear<B>,
    pub layer: Vec<Block<B>>,
    pub head: AdaptedLinear<B>,
}

impl<B: Backend> Toy<B> {
    pub fn new(device: &B::Device) -> Self {
        let block = || Block {
            q: AdaptedLinear::new(8, 8, true, device),
            v: AdaptedLinear::new(8, 8, false, device),
            ff: AdaptedLinear::new(8, 16, true, device),
            out: AdaptedLinear::new(16, 8, true, device),
        };
        Toy {
            embed_proj: AdaptedLinear::new(6, 8, true, device),
            layer: (0..3).map(|_| block()).collect(),
            head: AdaptedLinear::new(8, 4, true, device),
        }
    }

    /// The toy with PEFT's base weights (`base.<torch name>`, [out, in]).
    pub fn from_fixture(fx: &Fixture, device: &B::Device) -> Self {
        let lin = |name: &str, bias: bool| {
            let w: Tensor<B, 2> = fx.get(&format!("base.{name}.weight"), device);
            let b = bias.then(|| fx.get::<B, 1>(&format!("base.{name}.bias"), device));
            AdaptedLinear::from_tensors(w.transpose(), b)
        };
        Toy {
            embed_proj: lin("embed_proj", true),
            layer: (0..3)
                .map(|i| Block {
                    q: lin(&format!("encoder.layer.{i}.q"), true),
                    v: lin(&format!("encoder.layer.{i}.v"), false),
                    ff: lin(&format!("encoder.layer.{i}.ff"), true),
                    out: lin(&format!("encoder.layer.{i}.out"), true),
                })
                .collect(),
            head: lin("head", true),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let mut h = self.embed_proj.forward(x);
        for b in &self.layer {
            let a = b.q.forward(h.clone()) + b.v.forward(h.clone());
            h = h.clone() + b.out.forward(tanh(b.ff.forward(tanh(a))));
        }
        self.head.forward(h)
    }
}

impl<B: Backend> AdapterHost<B> for Toy<B> {
    fn visit_linears(&self, f: &mut dyn FnMut(&str, &AdaptedLinear<B>)) {
        f("embed_proj", &self.embed_proj);
        for (i, b) in self.layer.iter().enumerate() {
            f(&format!("encoder.layer.{i}.q"), &b.q);
            f(&format!("encoder.layer.{i}.v"), &b.v);
            f(&format!("encoder.layer.{i}.ff"), &b.ff);
            f(&format!("encoder.layer.{i}.out"), &b.out);
        }
        f("head", &self.head);
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &mut AdaptedLinear<B>)) {
        f("embed_proj", &mut self.embed_proj);
        for (i, b) in self.layer.iter_mut().enumerate() {
            f(&format!("encoder.layer.{i}.q"), &mut b.q);
            f(&format!("encoder.layer.{i}.v"), &mut b.v);
            f(&format!("encoder.layer.{i}.ff"), &mut b.ff);
            f(&format!("encoder.layer.{i}.out"), &mut b.out);
        }
        f("head", &mut self.head);
    }
}

/// Copies adapter `name`'s tensors from a PEFT state dict (`<prefix>base_model.model.<path>.
/// lora_A.weight` ...) into the model. Returns how many tensors were set.
pub fn load_peft_tensors<B: Backend, M: AdapterHost<B>>(
    peft: &mut PeftModel<B, M>,
    fx: &Fixture,
    prefix: &str,
    name: &str,
    device: &B::Device,
) -> usize {
    let mut set = 0;
    let param2 = |t: Tensor<B, 2>| Param::from_tensor(t.transpose());
    peft.base_model.visit_linears_mut(&mut |path, layer| {
        let key = |s: &str| format!("{prefix}base_model.model.{path}.{s}");
        if let Some(a) = layer.adapter_mut(name) {
            a.lora_a = param2(fx.get(&key("lora_A.weight"), device));
            a.lora_b = param2(fx.get(&key("lora_B.weight"), device));
            set += 2;
            if fx.has(&key("lora_B.bias")) {
                a.lora_bias = Some(Param::from_tensor(fx.get(&key("lora_B.bias"), device)));
                set += 1;
            }
        }
        if let Some(s) = layer.modules_to_save.iter_mut().find(|s| s.name == name) {
            s.weight = param2(fx.get(&key("weight"), device));
            set += 1;
            if fx.has(&key("bias")) {
                s.bias = Some(Param::from_tensor(fx.get(&key("bias"), device)));
                set += 1;
            }
        } else {
            // bias = "all" / "lora_only": the trained base bias is part of the adapter, under
            // `<path>.base_layer.bias` on LoRA layers and `<path>.bias` elsewhere.
            for k in [key("base_layer.bias"), key("bias")] {
                if fx.has(&k) {
                    layer.bias = Some(Param::from_tensor(fx.get(&k, device)));
                    set += 1;
                }
            }
        }
    });
    set
}
