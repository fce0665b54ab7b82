//! [`PromptAdapter`]: one prompt-learning adapter, its table of virtual tokens and the
//! encoder PEFT trains it through (P-tuning's MLP or LSTM, prefix tuning's projection), with
//! PEFT's parameter names (`prompt_encoder.<name>.<key>`).

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::backend::Backend;

use crate::dropout::Dropout;
use crate::params::{AdapterParams, FileLayout, NamedParam, ParamMut, ParamRef};

/// The most LSTM layers P-tuning's encoder takes here (PEFT's default is 2).
pub const MAX_LSTM_LAYERS: usize = 4;

/// Where a prompt adapter's output goes in the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    /// Virtual tokens prepended to the input embeddings (prompt tuning, P-tuning).
    Input,
    /// Keys and values prepended in every self-attention layer (prefix tuning).
    KeyValue,
}

/// The encoder between the table and the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptHead {
    /// The table is the output (prompt tuning; any adapter loaded for inference, as PEFT loads
    /// them).
    None,
    /// P-tuning's `mlp_head`: three linear layers, ReLU between.
    Mlp,
    /// P-tuning's bidirectional `lstm_head`, then a two-layer ReLU `mlp_head`.
    Lstm,
    /// Prefix tuning's `transform`: two linear layers, tanh between.
    Projection,
}

/// The shape of a prompt adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSpec {
    /// Where the output goes.
    pub kind: PromptKind,
    /// The encoder.
    pub head: PromptHead,
    /// Virtual tokens the model sees.
    pub num_virtual_tokens: usize,
    /// Rows of the table (`num_virtual_tokens x num_transformer_submodules` for input prompts).
    pub rows: usize,
    /// The model's hidden size.
    pub token_dim: usize,
    /// Layers that take a key/value prefix.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// The encoder's hidden size.
    pub hidden: usize,
    /// LSTM layers.
    pub lstm_layers: usize,
}

impl PromptSpec {
    /// The width of one output row: `token_dim`, or `num_layers x 2 x token_dim` for prefixes.
    pub fn width(&self) -> usize {
        match self.kind {
            PromptKind::Input => self.token_dim,
            PromptKind::KeyValue => self.num_layers * 2 * self.token_dim,
        }
    }

    /// The width of the table itself.
    fn table_width(&self) -> usize {
        match self.head {
            PromptHead::None if self.kind == PromptKind::KeyValue => self.width(),
            _ => self.token_dim,
        }
    }
}

/// A linear layer, `x W + b` with `W` in burn's `[in, out]` layout.
#[derive(Module, Debug)]
pub struct Dense<B: Backend> {
    /// `[in, out]` (PyTorch's `weight` transposed).
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Dense<B> {
    /// PyTorch's `nn.Linear` init: `U(-1/sqrt(in), 1/sqrt(in))` for weight and bias.
    fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        let k = 1.0 / (d_in as f64).sqrt();
        let u = Initializer::Uniform { min: -k, max: k };
        // Lazy, like every parameter here: counting allocates nothing.
        Dense {
            weight: u.init([d_in, d_out], device),
            bias: u.init([d_out], device),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.weight.val()) + self.bias.val().unsqueeze()
    }
}

/// One direction of one LSTM layer (PyTorch's gate order i, f, g, o).
#[derive(Module, Debug)]
pub struct LstmDirection<B: Backend> {
    /// `weight_ih`, `[in, 4h]`.
    pub w_ih: Param<Tensor<B, 2>>,
    /// `weight_hh`, `[h, 4h]`.
    pub w_hh: Param<Tensor<B, 2>>,
    /// `bias_ih`, `[4h]`.
    pub b_ih: Param<Tensor<B, 1>>,
    /// `bias_hh`, `[4h]`.
    pub b_hh: Param<Tensor<B, 1>>,
}

impl<B: Backend> LstmDirection<B> {
    /// PyTorch's `nn.LSTM` init: every tensor `U(-1/sqrt(h), 1/sqrt(h))`.
    fn new(d_in: usize, h: usize, device: &B::Device) -> Self {
        let k = 1.0 / (h as f64).sqrt();
        let u = Initializer::Uniform { min: -k, max: k };
        LstmDirection {
            w_ih: u.init([d_in, 4 * h], device),
            w_hh: u.init([h, 4 * h], device),
            b_ih: u.init([4 * h], device),
            b_hh: u.init([4 * h], device),
        }
    }

    /// Runs over the rows of `x` `[len, in]` (forwards or backwards): `[len, h]`.
    fn forward(&self, x: Tensor<B, 2>, reverse: bool) -> Tensor<B, 2> {
        let [len, _] = x.dims();
        let h4 = self.w_hh.val().dims()[1];
        let h = h4 / 4;
        let device = x.device();
        let xw = x.matmul(self.w_ih.val()) + (self.b_ih.val() + self.b_hh.val()).unsqueeze();
        let mut hs = Tensor::<B, 2>::zeros([1, h], &device);
        let mut cs = Tensor::<B, 2>::zeros([1, h], &device);
        let mut out = vec![None; len];
        let order: Vec<usize> = if reverse {
            (0..len).rev().collect()
        } else {
            (0..len).collect()
        };
        for t in order {
            let g = xw.clone().narrow(0, t, 1) + hs.clone().matmul(self.w_hh.val());
            let i = sigmoid(g.clone().narrow(1, 0, h));
            let f = sigmoid(g.clone().narrow(1, h, h));
            let c_new = g.clone().narrow(1, 2 * h, h).tanh();
            let o = sigmoid(g.narrow(1, 3 * h, h));
            cs = f * cs + i * c_new;
            hs = o * cs.clone().tanh();
            out[t] = Some(hs.clone());
        }
        Tensor::cat(
            out.into_iter()
                .map(|o| o.expect("every step ran"))
                .collect(),
            0,
        )
    }
}

/// One prompt-learning adapter: PEFT's `prompt_encoder.<name>`.
#[derive(Module, Debug)]
pub struct PromptAdapter<B: Backend> {
    /// The adapter's name.
    pub name: String,
    /// `embedding.weight`: the virtual tokens' table, `[rows, token_dim]` (or the saved
    /// output, `[rows, width]`, for a prefix loaded for inference).
    pub embedding: Param<Tensor<B, 2>>,
    /// `mlp_head` (P-tuning) or `transform` (prefix projection) layers, in order.
    pub mlp: Vec<Dense<B>>,
    /// `lstm_head`: per layer, the forward then the reverse direction.
    pub lstm: Vec<LstmDirection<B>>,
    /// `encoder_dropout`, between LSTM layers in training.
    pub dropout: Dropout,
    /// The shape.
    #[module(skip)]
    pub spec: PromptSpec,
}

impl<B: Backend> PromptAdapter<B> {
    /// A freshly initialised adapter (PyTorch's inits: the table standard normal).
    pub fn new(name: &str, spec: PromptSpec, dropout: f64, device: &B::Device) -> Self {
        let d = spec.token_dim;
        let h = spec.hidden;
        let (mlp, lstm) = match spec.head {
            PromptHead::None => (Vec::new(), Vec::new()),
            PromptHead::Mlp => (
                vec![
                    Dense::new(d, h, device),
                    Dense::new(h, h, device),
                    Dense::new(h, d, device),
                ],
                Vec::new(),
            ),
            PromptHead::Lstm => {
                let mut lstm = Vec::new();
                for l in 0..spec.lstm_layers {
                    let d_in = if l == 0 { d } else { 2 * h };
                    lstm.push(LstmDirection::new(d_in, h, device));
                    lstm.push(LstmDirection::new(d_in, h, device));
                }
                (
                    vec![
                        Dense::new(2 * h, 2 * h, device),
                        Dense::new(2 * h, d, device),
                    ],
                    lstm,
                )
            }
            PromptHead::Projection => (
                vec![
                    Dense::new(d, h, device),
                    Dense::new(h, spec.width(), device),
                ],
                Vec::new(),
            ),
        };
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 1.0,
        };
        PromptAdapter {
            name: name.to_string(),
            embedding: normal.init([spec.rows, spec.table_width()], device),
            mlp,
            lstm,
            dropout: Dropout::new(dropout),
            spec,
        }
    }

    /// The encoder's output for every row, `[rows, width]` (what PEFT saves as
    /// `prompt_embeddings`), with `encoder_dropout` in training.
    pub fn output(&self) -> Tensor<B, 2> {
        self.encode(true)
    }

    /// What is saved: the output without dropout.
    pub fn saved_output(&self) -> Tensor<B, 2> {
        self.encode(false)
    }

    fn encode(&self, dropout: bool) -> Tensor<B, 2> {
        let e = self.embedding.val();
        match self.spec.head {
            PromptHead::None => e,
            PromptHead::Mlp => {
                let x = relu(self.mlp[0].forward(e));
                let x = relu(self.mlp[1].forward(x));
                self.mlp[2].forward(x)
            }
            PromptHead::Lstm => {
                let mut x = e;
                for (l, pair) in self.lstm.chunks(2).enumerate() {
                    if l > 0 && dropout {
                        x = self.dropout.forward(x);
                    }
                    let fwd = pair[0].forward(x.clone(), false);
                    let bwd = pair[1].forward(x, true);
                    x = Tensor::cat(vec![fwd, bwd], 1);
                }
                let x = relu(self.mlp[0].forward(x));
                self.mlp[1].forward(x)
            }
            PromptHead::Projection => {
                let x = self.mlp[0].forward(e).tanh();
                self.mlp[1].forward(x)
            }
        }
    }
}

macro_rules! lstm_keys {
    ($($l:literal),*) => {
        [$([
            [
                concat!("lstm_head.weight_ih_l", $l),
                concat!("lstm_head.weight_hh_l", $l),
                concat!("lstm_head.bias_ih_l", $l),
                concat!("lstm_head.bias_hh_l", $l),
            ],
            [
                concat!("lstm_head.weight_ih_l", $l, "_reverse"),
                concat!("lstm_head.weight_hh_l", $l, "_reverse"),
                concat!("lstm_head.bias_ih_l", $l, "_reverse"),
                concat!("lstm_head.bias_hh_l", $l, "_reverse"),
            ],
        ]),*]
    };
}

/// PyTorch's names of the LSTM's tensors, per layer and direction.
const LSTM_KEYS: [[[&str; 4]; 2]; MAX_LSTM_LAYERS] = lstm_keys!("0", "1", "2", "3");
const MLP_KEYS: [[&str; 2]; 3] = [
    ["mlp_head.0.weight", "mlp_head.0.bias"],
    ["mlp_head.2.weight", "mlp_head.2.bias"],
    ["mlp_head.4.weight", "mlp_head.4.bias"],
];
const TRANSFORM_KEYS: [[&str; 2]; 2] = [
    ["transform.0.weight", "transform.0.bias"],
    ["transform.2.weight", "transform.2.bias"],
];

/// Writes `PromptAdapter`'s tensor list once, for the shared and the mutable walk: the names
/// are PEFT's under `prompt_encoder.<name>`, PyTorch layouts (`[out, in]`).
macro_rules! prompt_params {
    ($visit:ident, $P:ident $(, $m:tt)?) => {
        fn $visit(& $($m)? self, f: &mut dyn FnMut(NamedParam<$P<'_, B>>)) {
            f(NamedParam {
                key: "embedding.weight",
                layout: FileLayout::AsIs,
                param: $P::D2(& $($m)? self.embedding),
            });
            let keys: &[[&str; 2]] = if self.spec.head == PromptHead::Projection {
                &TRANSFORM_KEYS
            } else {
                &MLP_KEYS
            };
            let head = self.spec.head;
            if head == PromptHead::Lstm {
                for (i, dir) in (& $($m)? self.lstm).into_iter().enumerate() {
                    let k = LSTM_KEYS[i / 2][i % 2];
                    f(NamedParam { key: k[0], layout: FileLayout::Transposed, param: $P::D2(& $($m)? dir.w_ih) });
                    f(NamedParam { key: k[1], layout: FileLayout::Transposed, param: $P::D2(& $($m)? dir.w_hh) });
                    f(NamedParam { key: k[2], layout: FileLayout::AsIs, param: $P::D1(& $($m)? dir.b_ih) });
                    f(NamedParam { key: k[3], layout: FileLayout::AsIs, param: $P::D1(& $($m)? dir.b_hh) });
                }
            }
            for (i, d) in (& $($m)? self.mlp).into_iter().enumerate() {
                f(NamedParam { key: keys[i][0], layout: FileLayout::Transposed, param: $P::D2(& $($m)? d.weight) });
                f(NamedParam { key: keys[i][1], layout: FileLayout::AsIs, param: $P::D1(& $($m)? d.bias) });
            }
        }
    };
}

impl<B: Backend> AdapterParams<B> for PromptAdapter<B> {
    prompt_params!(visit_params, ParamRef);
    prompt_params!(visit_params_mut, ParamMut, mut);
}
