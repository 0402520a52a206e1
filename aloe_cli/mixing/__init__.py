"""Token-balanced training mixtures over domain (medical/general) x modality (multimodal/text).

    recipe.py   the recipe (YAML or options) and its checks
    plan.py     how many copies of each record: shares of loss tokens per cell, weights per source
    passes.py   the two streaming passes over the inputs (count, then write shuffled)
    report.py   the summary as JSON, table rows and plots

Typical use::

    from aloe_cli.mixing import MixOptions, load_recipe, run_mix, build_report
    result = run_mix(load_recipe("recipe.yaml"), MixOptions(output="mixture.jsonl"))
    report = build_report(result)
"""

from aloe_cli.mixing.passes import MixOptions, MixResult, TargetsMissed, run_mix
from aloe_cli.mixing.plan import Group, Miss, Plan, Tally, make_plan, water_fill
from aloe_cli.mixing.recipe import (
                                    CELLS,
                                    Recipe,
                                    RecipeError,
                                    SourceSpec,
                                    inline_recipe,
                                    load_recipe,
                                    parse_share,
                                    recipe_from_dict,
)
from aloe_cli.mixing.report import build_report, plot_shares

__all__ = [
    "CELLS", "Group", "MixOptions", "MixResult", "Miss", "Plan", "Recipe", "RecipeError", "SourceSpec", "Tally",
    "TargetsMissed",
    "build_report", "inline_recipe", "load_recipe", "make_plan", "parse_share", "plot_shares", "recipe_from_dict",
    "run_mix", "water_fill",
]
