#!/usr/bin/env python3
"""PyTorch + PEFT side of `cargo xtask bench`: times one workload, prints one JSON line.

    python xtask/bench/bench_torch.py --workload NAME [--threads N] [--warmup 2] [--steps 5]
        [--device cpu|cuda] [--dtype f32|bf16] [--seed 42] [--batch 8] [--src-len 128]
        [--tgt-len 16] [--new-tokens 10] [--model-preset small|large]

Workloads (model: randomly initialised mT5, `small` = mT5-small shape, `large` = mt0-large
shape; LoRA r=8, alpha=32, dropout 0.1 on q and v of every attention block, SEQ_2_SEQ_LM):

  lora-train      PEFT LoRA model, train mode; step = forward(labels) -> loss -> backward ->
                  AdamW(lr 1e-4, trainable params only).step() -> zero_grad(set_to_none=True)
  full-train      same step on the bare model, all parameters trained
  generate        PEFT model with a non-zero adapter (unmerged), eval, inference_mode;
                  greedy generate, KV cache, exactly --new-tokens new tokens per row
  infer-base      bare model, eval, inference_mode; one forward to logits
  infer-unmerged  same forward through the PEFT model, non-zero adapter unmerged
  infer-merged    same, after merge_and_unload()

Inputs: input_ids [batch, src_len] and labels [batch, tgt_len] uniform in [2, vocab) from a
generator seeded with --seed (attention_mask all ones); the inference forwards use
decoder_input_ids = labels shifted right behind the start token 0, i.e. what training feeds the
decoder. Model weights come from torch.manual_seed(seed) before construction.

Timing: --warmup untimed steps, then --steps timed steps (time.perf_counter, with
torch.cuda.synchronize on cuda); the reported time is the median step.

stdout carries exactly one JSON line (schema in `main`); everything else goes to stderr.
Pinned stack: xtask/bench/requirements.txt.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

WORKLOADS = ("lora-train", "full-train", "generate", "infer-base", "infer-unmerged", "infer-merged")

PRESETS = {
    # mT5-small shape (google/mt5-small, untied lm_head): ~77.3M parameters.
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, num_heads=6, d_ff=1024,
                  num_layers=8, num_decoder_layers=8),
    # mt0-large shape (bigscience/mt0-large): ~1.23B parameters; meant for the GPU/MFU run.
    "large": dict(vocab_size=250112, d_model=1024, d_kv=64, num_heads=16, d_ff=2816,
                  num_layers=24, num_decoder_layers=24),
}
COMMON_CONFIG = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q", "v"])
LR = 1e-4


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (also OMP/MKL threads, interop threads)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--model-preset", choices=tuple(PRESETS), default="small")
    a = p.parse_args()
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    return a


def matmul_flops(c, batch, src_len, tgt_len, lora_r):
    """Analytic matmul FLOPs of one forward pass, split into (linear, attn, lora).

    One multiply-add counts as 2 FLOPs; elementwise work (norms, softmax, GELU, dropout,
    residuals, relative-position bias, embedding gathers, the loss) is not counted.

    Notation: b batch, S source length, T target length, d d_model, h heads, k d_kv,
    i = h*k (attention inner width), f d_ff, V vocab, Le/Ld encoder/decoder layers, r LoRA rank;
    Ne = b*S encoder tokens, Nd = b*T decoder tokens. A Linear in->out applied to n tokens
    costs 2*n*in*out. An attention block with q_len queries and kv_len keys costs
    2*b*h*q_len*kv_len*k for the scores QK^T plus the same for the context AV.

      linear (frozen-or-trained weight x activation):
        encoder layer: 2*Ne*(4*d*i)                   q, k, v, o
                     + 2*Ne*(3*d*f)                   wi_0, wi_1, wo (gated-gelu)
        decoder layer: 2*Nd*(4*d*i)                   self q, k, v, o
                     + 2*Nd*(2*d*i) + 2*Ne*(2*d*i)    cross q, o on decoder tokens;
                                                      cross k, v on encoder tokens (every layer)
                     + 2*Nd*(3*d*f)                   FFN
        lm_head:       2*Nd*d*V
        linear = Le*encoder + Ld*decoder + lm_head
      attn (activation x activation):
        attn = Le*4*b*h*S*S*k + Ld*(4*b*h*T*T*k + 4*b*h*T*S*k)     (decoder self-attention is
                                                                     the full T x T product)
      lora (A: in->r, B: r->out on q and v; in, out are d and i), 2*n*r*(d+i) per adapted
      Linear on n tokens: encoder q, v on Ne; decoder self q, v on Nd, cross q on Nd, cross v
      on Ne:
        lora = 2*r*(d+i) * (Le*2*Ne + Ld*(3*Nd + Ne))

    Per step:
      infer-base, infer-merged:  linear + attn
      infer-unmerged:            linear + attn + lora
      full-train:                3*(linear + attn)
                                 forward + backward, backward = 2x forward (both operand grads
                                 of every matmul: input and weight grads)
      lora-train:                2*linear + 3*attn + 3*lora, i.e.
                                 forward                     linear + attn + lora
                               + input grads of the linears  linear + lora  (frozen weights:
                                                             1x forward, no weight grads)
                               + attention backward          2*attn  (both operands are
                                                             activations that need grads)
                               + LoRA A/B weight grads       lora
    This is the dense estimate. torch.utils.flop_counter matches it exactly for the inference
    workloads and full-train; for lora-train autograd does ~1.3% less at the standard shape,
    because nothing below the first adapted Linears needs a gradient (encoder and decoder
    layer 0: input grads of q, k, v and of lora_A, and dK of that self-attention are skipped).
    """
    d, h, k, f, V = c["d_model"], c["num_heads"], c["d_kv"], c["d_ff"], c["vocab_size"]
    Le, Ld = c["num_layers"], c["num_decoder_layers"]
    i = h * k
    b, S, T = batch, src_len, tgt_len
    Ne, Nd = b * S, b * T
    enc = 2 * Ne * (4 * d * i) + 2 * Ne * (3 * d * f)
    dec = 2 * Nd * (4 * d * i) + 2 * Nd * (2 * d * i) + 2 * Ne * (2 * d * i) + 2 * Nd * (3 * d * f)
    linear = Le * enc + Ld * dec + 2 * Nd * d * V
    attn = Le * 4 * b * h * S * S * k + Ld * (4 * b * h * T * T * k + 4 * b * h * T * S * k)
    lora = 2 * lora_r * (d + i) * (Le * 2 * Ne + Ld * (3 * Nd + Ne))
    return linear, attn, lora


def step_flops(workload, linear, attn, lora):
    return {
        "lora-train": 2 * linear + 3 * attn + 3 * lora,
        "full-train": 3 * (linear + attn),
        "infer-base": linear + attn,
        "infer-merged": linear + attn,
        "infer-unmerged": linear + attn + lora,
    }.get(workload)  # generate: not counted (None)


def peak_rss_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    return None


def run(a):
    import torch

    if a.threads is not None:
        torch.set_num_threads(a.threads)
        try:
            torch.set_num_interop_threads(a.threads)
        except RuntimeError as e:  # only allowed before any inter-op work
            print(f"set_num_interop_threads: {e}", file=sys.stderr)

    import transformers
    import peft
    from transformers import MT5Config, MT5ForConditionalGeneration
    from peft import LoraConfig, TaskType, get_peft_model

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    device = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if dtype == torch.bfloat16 and a.device == "cpu":
        print("note: bf16 on cpu", file=sys.stderr)

    cfg_dict = dict(PRESETS[a.model_preset], **COMMON_CONFIG)
    config = MT5Config(**cfg_dict)

    # Weights: torch.manual_seed(seed) then construction. Built directly on the target device
    # (fast init for the large preset); the random draws therefore differ between cpu and cuda.
    torch.manual_seed(a.seed)
    with device:
        model = MT5ForConditionalGeneration(config)
    model = model.to(dtype)
    n_base_params = sum(p.numel() for p in model.parameters())

    # Inputs from their own seeded generator on cpu, so they are the same on every device.
    g = torch.Generator().manual_seed(a.seed)
    V = config.vocab_size
    input_ids = torch.randint(2, V, (a.batch, a.src_len), generator=g).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(2, V, (a.batch, a.tgt_len), generator=g).to(device)
    decoder_input_ids = model._shift_right(labels)  # [start=0, labels[:, :-1]]

    def lora_model(real_adapter):
        # init_lora_weights=False: lora_B random too, so the adapter changes the output.
        # autocast_adapter_dtype=False: with bf16 the adapter stays bf16 like the base.
        lc = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **LORA,
                        init_lora_weights=(False if real_adapter else True))
        return get_peft_model(model, lc, autocast_adapter_dtype=False).to(device)

    w = a.workload
    trainable = 0
    if w in ("lora-train", "full-train"):
        if w == "lora-train":
            model = lora_model(real_adapter=False)  # standard init (B = 0) for training
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=LR)

        def step():
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        if w in ("generate", "infer-unmerged", "infer-merged"):
            model = lora_model(real_adapter=True)
            if w == "infer-merged":
                model = model.merge_and_unload()
        model.eval()

        if w == "generate":
            expect = a.new_tokens + 1  # decoder start token + new tokens

            def step():
                with torch.inference_mode():
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=a.new_tokens,
                                         min_new_tokens=a.new_tokens,
                                         do_sample=False, num_beams=1)
                assert out.shape == (a.batch, expect), out.shape
        else:
            def step():
                with torch.inference_mode():
                    out = model(input_ids=input_ids, attention_mask=attention_mask,
                                decoder_input_ids=decoder_input_ids, use_cache=False)
                assert out.logits.shape == (a.batch, a.tgt_len, V), out.logits.shape

    n_params = sum(p.numel() for p in model.parameters())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step()
    sync()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)

    if w == "generate":
        tokens = a.batch * a.new_tokens
    else:
        tokens = a.batch * (a.src_len + a.tgt_len)
    flops = step_flops(w, *matmul_flops(cfg_dict, a.batch, a.src_len, a.tgt_len, LORA["r"]))

    result = {
        "workload": w,
        "impl": "torch",
        "median_s": median,
        "tokens_per_s": tokens / median,
        "peak_rss_mib": peak_rss_mib(),
        "steps": a.steps,
        "threads": torch.get_num_threads(),
        "device": a.device,
        "dtype": a.dtype,
        "params": n_params,  # parameters of the model as run (PEFT model: base + LoRA)
        # parameters the optimizer updates (0 for the inference workloads)
        "trainable_params": trainable,
        "flops_per_step": flops,  # null for generate
        "gflop_per_s": (flops / median / 1e9) if flops is not None else None,
        "step_s": times,
        "warmup": a.warmup,
        "seed": a.seed,
        "model_preset": a.model_preset,
        "base_params": n_base_params,
        "batch": a.batch,
        "src_len": a.src_len,
        "tgt_len": a.tgt_len,
        "new_tokens": a.new_tokens if w == "generate" else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
        },
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def main():
    a = parse_args()
    if a.threads is not None:
        # Before torch is imported, so OpenMP/MKL pools start at this size too.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    real_stdout = sys.stdout
    # Anything the libraries print goes to stderr; stdout gets only the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(a)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
