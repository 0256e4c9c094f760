#!/usr/bin/env bash
# The float32 model of the int4 study (docs/benchmarks.md, "int4 on a model trained in float"),
# trained on 2 CPU cores with a step budget (reproducible on any machine), then the study.
#
#   bash benchmarks/int4_study/train.sh [WORK_DIR] [CORPORA_DIR]     (about 35 minutes on 2 cores)
#
# WORK_DIR defaults to /tmp/int4-study, CORPORA_DIR to ../shared/corpora beside the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/int4-study}
corpora=${2:-$here/../../../shared/corpora}
mkdir -p "$work" && cd "$work"
# 1. Clean UTF-8 books: the Gutenberg files are cp1252 with CRLF and a licence header/footer.
python "$here/prep_data.py" "$corpora" data
# 2. Training books: Pride and Prejudice + Moby Dick. Frankenstein (pg84) is held out entirely.
rm -rf train_books && mkdir -p train_books && cp data/pg1342.txt data/pg2701.txt train_books/
# GPTQ calibration text: 60,000 characters from the middle of each training book.
python - <<'P'
a = open("train_books/pg1342.txt", encoding="utf-8").read()
b = open("train_books/pg2701.txt", encoding="utf-8").read()
open("calib.txt", "w", encoding="utf-8").write(a[300_000:360_000] + "\n\n" + b[500_000:560_000])
P
# 3. A 4096-token byte-level BPE tokenizer on the training books only, and token shards.
scratchlm tokenizer train --input train_books --vocab-size 4096 --out tok.json --quiet
rm -rf shards && scratchlm data tokenize --input train_books --tokenizer tok.json --out shards
# 4. Pretrain in float32: the default CPU recipe's optimizer (Muon + AdamW), a Llama-style model of
#    6 layers, width 256, SwiGLU hidden 768 (every linear input width a multiple of 128, so int4
#    groups of 128 fit), vocabulary 4096, context 256; 240 steps x 16 x 256 = 983,040 tokens.
rm -rf run_steps && scratchlm pretrain --data shards --out run_steps --max-steps 240 --quiet \
  --set max_time=none --set model=cpu-large \
  --set model_config.n_layer=6 --set model_config.n_head=4 --set model_config.n_embd=256 \
  --set model_config.mlp_hidden=768 --set seq_len=256 \
  --set dtype=float32 --set eval_every=80 --set checkpoint_every=80 --set samples=2 --set sample_prompt="It was "
# 5. float32, bfloat16, int8, int4 round-to-nearest and GPTQ in groups of 32, 64, 128, on Frankenstein.
python "$here/study.py" run_steps data/pg84.txt calib.txt --json run_steps/study.json
