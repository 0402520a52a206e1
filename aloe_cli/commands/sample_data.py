"""aloe sample-data: write the bundled demo data set.

Examples:

    aloe sample-data demo_out
    aloe sample-data demo_out --force    # again, over an earlier copy
    aloe dedup -i demo_out/train.jsonl --against demo_out/eval.tsv \\
        --rejects demo_out/leaks.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import command_app

app = command_app()


@app.command(help=__doc__)
def sample_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write train.jsonl, eval.tsv and images/ into.")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed for the synthetic images and texts.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the demo files a folder already holds.")] = False,
) -> None:
    from aloe_cli import console
    from aloe_cli.data.io import print_stdout
    from aloe_cli.demo.sample_data import check_sample_folder, write_sample_data

    check_sample_folder(out_dir, force=force)
    data = write_sample_data(out_dir, seed=seed)
    console.log(f"aloe sample-data: wrote {data.train} and {data.eval_tsv} "
                f"({len(data.leaked_ids)} exact leaks, 1 re-encoded near-duplicate)")
    print_stdout(str(out_dir))
