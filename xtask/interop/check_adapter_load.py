#!/usr/bin/env python3
"""Loads an adapter directory written by peft in Python and compares outputs.

    python xtask/interop/check_adapter_load.py BASE_DIR ADAPTER_DIR OURS.safetensors TEXT [TEXT ...]

ADAPTER_DIR is what `peft train` wrote (with its tokenizer.json), in whichever format its method
uses: a PEFT adapter (LoRA, DoRA, IA3, LoHa, LoKr, prompt tuning, P-tuning) (`adapter_config.json` + `adapter_model.safetensors`, loaded
with `PeftModel.from_pretrained`), or an AdapterHub bottleneck adapter (`adapter_config.json` +
`adapter.safetensors`, loaded with the `adapters` library's `load_adapter`). BASE_DIR is the base
model directory. OURS.safetensors is the output of `peft forward --model BASE_DIR --adapter
ADAPTER_DIR --decoder-input-ids 0 --text ...` for the same texts.

Exits non-zero when the logits differ by more than 1e-4, or when the saved key set differs from
what the Python library itself saves for the same config on the same base.
Run by `cargo xtask interop` (needs the pinned stack of tests/fixtures/requirements.txt).
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          PreTrainedTokenizerFast)


def base_model(base_dir, adapter_dir):
    """The base as transformers loads it: seq2seq, or BERT for classification with as many labels
    as the adapter's classifier copy has rows."""
    if AutoConfig.from_pretrained(base_dir).model_type == "bert":
        st = load_file(f"{adapter_dir}/adapter_model.safetensors")
        head = next(v for k, v in st.items() if k.endswith("classifier.weight"))
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=head.shape[0])
    return AutoModelForSeq2SeqLM.from_pretrained(base_dir)


def load_peft(base_dir, adapter_dir, cfg):
    from peft import (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                      PromptEncoderConfig, PromptTuningConfig, get_peft_model,
                      get_peft_model_state_dict)

    model = PeftModel.from_pretrained(base_model(base_dir, adapter_dir), adapter_dir).eval()
    if cfg["peft_type"] == "IA3":
        fields = ("target_modules", "feedforward_modules", "task_type", "modules_to_save")
        fresh_cfg = IA3Config(**{k: v for k, v in cfg.items() if k in fields})
    elif cfg["peft_type"] == "PROMPT_TUNING":
        fields = ("num_virtual_tokens", "task_type")
        fresh_cfg = PromptTuningConfig(**{k: v for k, v in cfg.items() if k in fields})
    elif cfg["peft_type"] == "P_TUNING":
        fields = ("num_virtual_tokens", "task_type", "encoder_hidden_size",
                  "encoder_reparameterization_type", "encoder_num_layers")
        fresh_cfg = PromptEncoderConfig(**{k: v for k, v in cfg.items() if k in fields})
    elif cfg["peft_type"] == "PREFIX_TUNING":
        fields = ("num_virtual_tokens", "task_type", "encoder_hidden_size", "prefix_projection")
        fresh_cfg = PrefixTuningConfig(**{k: v for k, v in cfg.items() if k in fields})
    elif cfg["peft_type"] == "LOHA":
        fields = ("r", "alpha", "target_modules", "task_type", "modules_to_save", "rank_dropout",
                  "module_dropout", "layers_to_transform")
        fresh_cfg = LoHaConfig(**{k: v for k, v in cfg.items() if k in fields})
    elif cfg["peft_type"] == "LOKR":
        fields = ("r", "alpha", "target_modules", "task_type", "modules_to_save", "rank_dropout",
                  "module_dropout", "layers_to_transform", "decompose_both", "decompose_factor",
                  "rank_dropout_scale")
        fresh_cfg = LoKrConfig(**{k: v for k, v in cfg.items() if k in fields})
    else:
        fields = ("r", "lora_alpha", "target_modules", "task_type", "bias", "lora_bias", "modules_to_save",
                  "layers_to_transform", "use_dora", "use_rslora")
        fresh_cfg = LoraConfig(**{k: v for k, v in cfg.items() if k in fields})
    fresh = get_peft_model(base_model(base_dir, adapter_dir), fresh_cfg)
    expected = set(get_peft_model_state_dict(fresh).keys())
    saved = set(load_file(f"{adapter_dir}/adapter_model.safetensors").keys())
    return model, expected, saved, f"PEFT {cfg['peft_type']}"


def load_adapterhub(base_dir, adapter_dir, cfg):
    import adapters

    model = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    adapters.init(model)
    # peft writes safetensors (never pickles); AdapterHub reads them with use_safetensors=True.
    name = model.load_adapter(adapter_dir, set_active=True, use_safetensors=True)
    model.eval()
    fresh = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    adapters.init(fresh)
    fresh.add_adapter(cfg["name"], config=adapters.BnConfig(**{
        k: v for k, v in cfg["config"].items() if k != "architecture"}))
    expected = {k for k in fresh.state_dict() if f".adapters.{cfg['name']}." in k}
    saved = set(load_file(f"{adapter_dir}/adapter.safetensors").keys())
    return model, expected, saved, f"AdapterHub adapters {adapters.__version__} (adapter {name!r})"


def main():
    base_dir, adapter_dir, ours_path, *texts = sys.argv[1:]
    cfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
    bert = AutoConfig.from_pretrained(base_dir).model_type == "bert"
    specials = (dict(pad_token="[PAD]", unk_token="[UNK]") if bert else
                dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{adapter_dir}/tokenizer.json", **specials)
    if "peft_type" in cfg:
        model, expected, saved, who = load_peft(base_dir, adapter_dir, cfg)
    else:
        model, expected, saved, who = load_adapterhub(base_dir, adapter_dir, cfg)
    if expected != saved:
        print("key sets differ:", sorted(expected ^ saved)[:10])
        sys.exit(1)

    enc = tok(texts, return_tensors="pt", padding=True)
    kw = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if not bert:
        kw["decoder_input_ids"] = torch.zeros((len(texts), 1), dtype=torch.long)
    with torch.no_grad():
        logits = model(**kw).logits
    ours = load_file(ours_path)["logits"]
    diff = (ours - logits).abs().max().item()
    print(f"{who} loaded {adapter_dir}: {len(saved)} tensors, key set equal; "
          f"max |logits diff| = {diff:.2e}")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
