#!/usr/bin/env bash
# The demo pipeline on bundled sample data: leakage control -> judge -> perplexity -> token-balanced mix,
# every stage reading and writing records through real pipes.
#
# The model is the tiny random-weight Qwen2-VL test fixture (built offline in seconds), so the judge's
# verdicts and the perplexities are meaningless numbers: the demo shows the plumbing, not the quality.
set -euo pipefail
out=${1:-demo_out}
rm -rf "$out"

aloe sample-data "$out" >/dev/null
python -m aloe_cli.testing.tiny "$out/tiny-qwen2vl" >/dev/null

# Hash the benchmark once; shards (or later runs) load the index instead of re-hashing.
aloe dedup --against "$out/eval.tsv" --save-index "$out/eval.idx"

# --keep-all on the model stages: a random judge cannot give parseable scores, so nothing is dropped
# there; real runs pass --thresholds instead (see docs/score.md and docs/perplexity.md).
cat "$out/train.jsonl" \
  | aloe dedup --against "$out/eval.idx" --image-root "$out" --max-distance 4 --within \
      --rejects "$out/dedup.rejects.jsonl" --report "$out/dedup.report.json" \
  | aloe score --backend hf --judge "$out/tiny-qwen2vl" --image-root "$out" --keep-all \
      --report "$out/score.report.json" \
  | aloe perplexity --model "$out/tiny-qwen2vl" --image-root "$out" --keep-all --plot "$out/perplexity-plots" \
      --report "$out/perplexity.report.json" \
  | aloe mix --tokenizer "$out/tiny-qwen2vl" --image-root "$out" \
      --share medical/multimodal=0.4 --share medical/text=0.2 \
      --share general/multimodal=0.25 --share general/text=0.15 \
      --report "$out/mix.report.json" -o "$out/mixture.jsonl"

echo "demo: $(wc -l < "$out/train.jsonl") training records -> $(wc -l < "$out/dedup.rejects.jsonl") leaked or" \
     "repeated -> $(wc -l < "$out/mixture.jsonl") in the mixture ($out/mixture.jsonl); reports in $out/*.report.json" >&2
