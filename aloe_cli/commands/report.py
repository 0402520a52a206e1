"""aloe report: work with the JSON summaries (--report) that data stages write.

`aloe report merge` adds the reports of every shard of a job array into one
summary: records read, kept and rejected per input and per reason, and the
stage's own counters that add up (hashes, judge requests, scored tokens...).
It refuses reports of different stages, a shard given twice, a missing shard
(it says which), and counts that do not satisfy read = kept + rejected.

Examples:

    #SBATCH --array=0-255
    aloe dedup -i 'raw/*.jsonl.gz' --against eval.idx \\
        -o "clean/${SLURM_ARRAY_TASK_ID}.jsonl.gz" \\
        --report "reports/${SLURM_ARRAY_TASK_ID}.json" --resume

    # once the array is done: one summary on stderr, the merged JSON to a
    # file (or stdout)
    aloe report merge reports/*.json -o dedup.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import command_app

app = command_app()


@app.callback(help=__doc__)
def report() -> None:
    """Work with the JSON summaries that data stages write with --report."""


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
