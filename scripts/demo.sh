#!/usr/bin/env bash
# The demo pipeline on bundled sample data. Every stage reads and writes records through real pipes.
set -euo pipefail
out=${1:-demo_out}
rm -rf "$out"

aloe sample-data "$out" >/dev/null

# Hash the benchmark once; shards (or later runs) load the index instead of re-hashing.
aloe dedup --against "$out/eval.tsv" --save-index "$out/eval.idx"

# Leakage control: exact and near-duplicate (Hamming <= 4) benchmark images, and repeats inside train.
cat "$out/train.jsonl" \
  | aloe dedup --against "$out/eval.idx" --image-root "$out" --max-distance 4 --within \
      --rejects "$out/dedup.rejects.jsonl" --report "$out/dedup.report.json" \
  > "$out/train.dedup.jsonl"

echo "demo: kept $(wc -l < "$out/train.dedup.jsonl") of $(wc -l < "$out/train.jsonl") training records;" \
     "$(wc -l < "$out/dedup.rejects.jsonl") rejected (see $out/dedup.rejects.jsonl)" >&2
