"""aloe demo: the whole recipe, learning, in about ten minutes on a laptop CPU.

Writes a synthetic medical imaging task (abdominal scans with a lesion: which
quadrant, is there one, where, its box), a general image task and text-only
sets, with planted wrong and empty answers and evaluation images copied into
the training data. Then runs the real commands in the work folder:
`aloe dedup | aloe perplexity | aloe score > curated.jsonl` (the judge is a
rule-based stand-in served on 127.0.0.1), `aloe mix`, `aloe train` (stage 1,
from a tiny Qwen2-VL built offline), `aloe adv-train` (stage 2), `aloe eval`
on the untrained, stage-1 and stage-2 models, perturbed too, and `aloe infer`
with the predicted box drawn. Every command is printed before it runs; the
tables at the end are the published ones in miniature, with the recipe's
claims checked. See docs/demo.md.

Examples:

    aloe demo          # in a temporary folder, removed at the end
    aloe demo --workdir demo_run --report demo.json
    aloe demo --seed 1 --check    # exit 1 unless every claim holds (CI)
    aloe demo --quick             # every step, a sliver of the data
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import command_app

app = command_app()


@app.command(help=__doc__)
def demo(
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="Work here and keep everything (data, models, results). Default: a temporary folder "
                          "removed at the end.")] = None,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Write the figures as JSON here (curation, accuracy, robustness, claims, seconds).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data, the model and training.")] = 0,
    check: Annotated[bool, typer.Option(
        "--check/--no-check", help="Exit 1 when a claim of the recipe does not hold.")] = False,
    quick: Annotated[bool, typer.Option(
        "--quick/--no-quick", help="Every step on a sliver of the data with a few training steps (about a minute): "
                                   "shows the pipeline, not the claims.")] = False,
) -> None:
    import tempfile

    from aloe_cli.commands._common import check_io
    from aloe_cli.console import log
    from aloe_cli.demo.run import DemoSettings, quick_settings, run_demo
    from aloe_cli.demo.summary import print_demo_summary
    from aloe_cli.errors import AloeError

    check_io(None, records=False, report=report)
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise AloeError(f"--workdir {workdir} is not empty (the demo writes a fresh run; pick a new folder)")
    settings = quick_settings(seed) if quick else DemoSettings(seed=seed)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="aloe-demo-") as tmp:
            result = run_demo(Path(tmp), settings, log)
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        result = run_demo(workdir, settings, log)
    print_demo_summary(result)
    if report is not None:
        import json

        from aloe_cli.data.io import write_atomic

        write_atomic(report, (json.dumps(result, indent=2) + "\n").encode())
    if check and not all(result["claims"].values()):
        raise AloeError("a claim of the recipe does not hold (see the table above)")
