"""Benchmark: `aloe perplexity` batched scoring vs a naive one-record-at-a-time loop.

Both run the same model on the same records, end to end from the record
(images decoded, chat template, processor, forward pass, answer-token NLL);
model loading is not timed. The naive loop is the straightforward
transformers code: one record, `model(**inputs).logits` over the whole
sequence, masked mean of the assistant-token NLL. It is written
independently of aloe's scorer, so the comparison also checks the values.

    python benchmarks/perplexity.py                     # tiny offline model, 192 records, batch 16
    python benchmarks/perplexity.py --records 320 --batch-size 32
    python benchmarks/perplexity.py --model /path/to/Qwen2-VL-2B-Instruct --device cuda

Prints records/s for both, the ratio (target: >= 3x on CPU with the tiny
model) and the largest relative difference between the two sets of values.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import random
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the chest film shows a small nodule in the right upper lobe with mild pleural thickening and no "
         "effusion while the heart size is normal and the bones are intact").split()


def synthetic_records(count: int, seed: int = 0) -> list[dict]:
    """Half with one image of varying size, question and answer lengths from a few to ~120 words."""
    from PIL import Image

    rng = random.Random(seed)
    records = []
    for index in range(count):
        images = []
        if index % 2 == 0:
            size = (rng.randint(40, 160), rng.randint(40, 160))
            image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40))) + "?"
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 8, 30, 120))))
        user = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        records.append({"id": str(index), "source": "bench", "images": images,
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    return records


def naive_perplexities(loaded, records: list[dict]) -> list[float]:
    """One record at a time, full logits, the model's own position handling."""
    import torch

    from aloe_cli.data.images import load_image
    from aloe_cli.modeling.chat_template import template_of, training_chat_template
    from aloe_cli.modeling.encoding import chat_messages

    template = training_chat_template(template_of(loaded.processor))
    values = []
    for record in records:
        images = [load_image(entry).convert("RGB") for entry in record["images"]]
        inputs = loaded.processor.apply_chat_template(
            chat_messages(record["messages"], images), chat_template=template, tokenize=True, return_dict=True,
            return_tensors="pt", return_assistant_tokens_mask=True)
        mask = inputs.pop("assistant_masks")[0, 1:].bool()
        inputs = {key: value.to(loaded.device) for key, value in inputs.items()}
        with torch.inference_mode():
            logits = loaded.model(**inputs).logits[0, :-1].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = inputs["input_ids"][0, 1:]
        nll = -log_probs.gather(1, targets[:, None])[:, 0][mask.to(loaded.device)]
        values.append(math.exp(float(nll.double().mean())))
    return values


def batched_perplexities(loaded, records: list[dict], batch_size: int) -> list[float]:
    """Through the real stage, in runner-sized windows, as `aloe perplexity` does."""
    from aloe_cli.data.io import Item
    from aloe_cli.filters.perplexity import PerplexityConfig, PerplexityStage

    stage = PerplexityStage(lambda: loaded, PerplexityConfig(batch_size=batch_size), model_name="bench")
    items = [Item(record, record["id"], "bench") for record in records]
    window = stage.runner_batch_size()
    for start in range(0, len(items), window):
        stage.annotate(items[start:start + window])
    for item in items:
        if item.error is not None:
            raise SystemExit(f"record {item.where} failed: {item.error}")
    return [item.record["aloe"]["perplexity"]["value"] for item in items]


def best_of(repeat: int, function, *args) -> tuple[float, object]:
    """The fastest of `repeat` runs (other processes on the machine only ever add time)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: a freshly built tiny offline model)")
    parser.add_argument("--records", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=3, help="time each path this many times, keep the best")
    args = parser.parse_args(argv)

    import copy

    import torch

    from aloe_cli.modeling.loading import ModelSpec, load_model

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from aloe_cli.modeling.tiny import build_tiny_qwen2vl

            model = str(build_tiny_qwen2vl(Path(scratch) / "tiny"))
        loaded = load_model(ModelSpec(model, device=args.device, dtype=args.dtype))
        records = synthetic_records(args.records)
        # Warm up both paths (first calls allocate and compile kernels).
        naive_perplexities(loaded, records[:4])
        batched_perplexities(loaded, copy.deepcopy(records[:4]), args.batch_size)

        naive_s, naive = best_of(args.repeat, naive_perplexities, loaded, records)
        batched_s, batched = best_of(args.repeat, lambda: batched_perplexities(loaded, copy.deepcopy(records),
                                                                                args.batch_size))

    worst = max(abs(a - b) / abs(a) for a, b in zip(naive, batched))
    naive_rate, batched_rate = len(records) / naive_s, len(records) / batched_s
    print(f"model: {loaded.describe()}; torch threads: {torch.get_num_threads()}; records: {len(records)}; "
          f"best of {args.repeat}")
    print(f"naive loop (1 record at a time):  {naive_rate:8.1f} records/s  ({naive_s:.2f} s)")
    print(f"aloe perplexity (batch {args.batch_size:>3}):      {batched_rate:8.1f} records/s  ({batched_s:.2f} s)")
    print(f"speed-up: {batched_rate / naive_rate:.2f}x (target >= 3x); "
          f"max relative difference of values: {worst:.2e} (must be < 1e-4)")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
