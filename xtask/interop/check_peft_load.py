#!/usr/bin/env python3
"""Loads an adapter directory written by peft-rs with Python PEFT and compares outputs.

    python xtask/interop/check_peft_load.py ADAPTER_DIR OURS.safetensors TEXT [TEXT ...]

ADAPTER_DIR is what `peft train` wrote (adapter_config.json, adapter_model.safetensors,
tokenizer.json); its `base_model_name_or_path` names the base model directory. OURS.safetensors
is the output of `peft forward --model BASE --adapter ADAPTER_DIR --decoder-input-ids 0
--text ...` for the same texts. Exits non-zero when the logits differ by more than 1e-4, or when
the key set differs from what PEFT itself would save for that config.
Run by `cargo xtask interop` (needs the pinned stack of tests/fixtures/requirements.txt).
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, PreTrainedTokenizerFast
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, LoraConfig


def main():
    adapter_dir, ours_path, *texts = sys.argv[1:]
    cfg = json.load(open(f"{adapter_dir}/adapter_config.json"))
    base_dir = cfg["base_model_name_or_path"]
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{adapter_dir}/tokenizer.json", pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>")
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    # Key set: what PEFT would save for the same config on the same base.
    fresh = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(base_dir), LoraConfig(**{
        k: v for k, v in cfg.items() if k in ("r", "lora_alpha", "target_modules", "task_type", "bias",
                                             "lora_bias", "modules_to_save", "layers_to_transform")}))
    expected_keys = set(get_peft_model_state_dict(fresh).keys())
    saved_keys = set(load_file(f"{adapter_dir}/adapter_model.safetensors").keys())
    if expected_keys != saved_keys:
        print("key sets differ:", sorted(expected_keys ^ saved_keys)[:10])
        sys.exit(1)

    enc = tok(texts, return_tensors="pt", padding=True)
    dec = torch.zeros((len(texts), 1), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=dec).logits
    ours = load_file(ours_path)["logits"]
    diff = (ours - logits).abs().max().item()
    print(f"PEFT loaded {adapter_dir}: {len(saved_keys)} tensors, key set equal; max |logits diff| = {diff:.2e}")
    sys.exit(0 if diff < 1e-4 else 1)


if __name__ == "__main__":
    main()
