"""aloe report: work with the JSON summaries (--report) that data stages write, and training runs' logs.

`aloe report merge` adds the reports of every shard of a job array into one
summary: records read, kept and rejected per input and per reason, and the
stage's own counters that add up (hashes, judge requests, scored tokens...).
It refuses reports of different stages, a shard given twice, a missing shard
(it says which), and counts that do not satisfy read = kept + rejected.
`aloe report plot` draws the loss and learning rate of training runs.

Examples:

    #SBATCH --array=0-255
    aloe dedup -i 'raw/*.jsonl.gz' --against eval.idx \\
        -o "clean/${SLURM_ARRAY_TASK_ID}.jsonl.gz" \\
        --report "reports/${SLURM_ARRAY_TASK_ID}.json" --resume

    # once the array is done: one summary on stderr, the merged JSON to a
    # file (or stdout)
    aloe report merge reports/*.json -o dedup.json

    # the loss and learning rate of two training runs in one picture
    aloe report plot runs/stage1 runs/stage2 -o loss.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import command_app

app = command_app()


@app.callback(help=__doc__)
def report() -> None:
    """Work with the JSON summaries that data stages write with --report, and training runs' logs."""


@app.command(help="Add the --report files of all shards of one run into one summary (read = kept + rejected "
                  "checked; different stages, duplicate or missing shards refused).")
def merge(
    reports: Annotated[list[Path], typer.Argument(help="Shard reports (JSON), e.g. reports/*.json.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Write the merged report here (JSON). "
                                                               "Default: stdout.")] = "-",
) -> None:
    import json

    from aloe_cli.commands._common import check_io, print_summary
    from aloe_cli.data.io import print_stdout
    from aloe_cli.data.reports import merge_reports, write_report
    from aloe_cli.errors import AloeError

    check_io(None, records=False, read=[("report", path) for path in reports], written=[("-o", output)])
    loaded = []
    for path in reports:
        try:
            loaded.append((str(path), json.loads(path.read_text())))
        except FileNotFoundError:
            raise AloeError(f"report not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AloeError(f"cannot read report {path}: {exc}") from None
        except ValueError as exc:
            raise AloeError(f"{path}: not valid JSON ({exc})") from None
    merged = merge_reports(loaded)
    count = merged["shard"].split("/")[1]
    print_summary(merged, title=f"aloe {merged['stage']}: {count} shard report(s) merged")
    if merged.get("not_merged"):
        from aloe_cli import console

        console.log(f"  differs between shards, left out: {', '.join(merged['not_merged'])}")
    if output == "-":
        print_stdout(json.dumps(merged, indent=2))
    else:
        write_report(output, merged)


@app.command(help="Draw the training loss (raw and smoothed), the eval loss and the learning rate of one or more "
                  "training runs (each run's log.jsonl) over the step, in one picture.")
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders of aloe train or adv-train, or their log.jsonl.",
                                               metavar="RUN")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The picture to write (.png, .svg or .pdf).")
                      ] = Path("loss.png"),
) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import check_io
    from aloe_cli.plotting import require_matplotlib
    from aloe_cli.training.curves import draw_curves, log_path, read_runs

    require_matplotlib()
    check_io(None, records=False, read=[("run", log_path(run)) for run in runs], written=[("-o", str(output))])
    curves = read_runs(runs)
    draw_curves(curves, output)
    console.log(f"aloe report plot: {len(curves)} run(s) ({', '.join(c.label for c in curves)}), "
                f"{sum(len(c.steps) for c in curves)} logged step(s): wrote {output}")
