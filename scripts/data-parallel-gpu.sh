#!/usr/bin/env bash
# Data-parallel LoRA training on a CUDA machine: one GPU against N GPUs with the same global
# batch, then the two adapters compared. Run from the repository root:
#
#   scripts/data-parallel-gpu.sh [N_GPUS] [PRESET]      (defaults: all visible GPUs, mt0-small)
#
# It builds `peft` with the `cuda` feature, trains 20 steps with dropout off on the complaints
# data (one process with --batch-size 8*N, then --nproc N with --batch-size 8, one GPU per worker
# through --local-rank), prints both runs' tokens/s and median all-reduce time from
# metrics.jsonl, and the largest difference between the adapters (expected: about 1e-6 in f32;
# GPU kernels sum in other orders than the CPU's). For several nodes, run `peft train` on each
# with --world-size, --rank and --coordinator instead of --nproc (see the README).
set -euo pipefail
N=${1:-$(nvidia-smi -L | wc -l)}
PRESET=${2:-mt0-small}
OUT=${OUT:-target/dp-gpu}
cargo build --release -p peft-cli --features cuda
PEFT=target/release/peft
DATA=examples/data/complaints
rm -rf "$OUT" && mkdir -p "$OUT"

# A base with dropout off: the preset's random weights, saved once.
$PEFT --device cuda train --model "$PRESET" --tokenizer $DATA/tokenizer.json \
  --data $DATA/train.jsonl --output-dir "$OUT/seed" --max-steps 1 --quiet --show-examples 0
mkdir -p "$OUT/base"
cp "$OUT/seed/base_model/model.safetensors" "$OUT/seed/base_model/tokenizer.json" "$OUT/base/"
sed 's/"dropout_rate": *[0-9.e-]*/"dropout_rate": 0.0/' "$OUT/seed/base_model/config.json" \
  > "$OUT/base/config.json"

run() { # name extra-flags...
  local name=$1; shift
  /usr/bin/time -f "$name: %e s wall" $PEFT --device cuda train --model "$OUT/base" \
    --data $DATA/train.jsonl --output-dir "$OUT/$name" --max-steps 20 --lora-dropout 0 \
    --seed 7 --quiet --show-examples 0 "$@"
}
run one --batch-size $((8 * N)) --local-rank 0
run many --batch-size 8 --nproc "$N"

python3 - "$OUT" <<'PY'
import json, statistics, struct, sys
out = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl") if '"loss"' in l][2:]
for name in ["one", "many"]:
    r = rows(name)
    tok = statistics.median(x["tokens_per_s"] for x in r)
    red = [x["reduce_s"] for x in r if "reduce_s" in x]
    print(f"{name}: {tok:.0f} tokens/s" + (f", all-reduce {statistics.median(red)*1e3:.2f} ms/step" if red else ""))
def tensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    data = b[8 + n:]
    return {k: struct.unpack(f"<{(v['data_offsets'][1]-v['data_offsets'][0])//4}f",
                             data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in head.items() if k != "__metadata__"}
a = tensors(f"{out}/one/adapter_model.safetensors")
b = tensors(f"{out}/many/adapter_model.safetensors")
assert a.keys() == b.keys()
print("largest adapter difference:", max(abs(x - y) for k in a for x, y in zip(a[k], b[k])))
PY
