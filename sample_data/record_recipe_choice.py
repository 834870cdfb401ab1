#!/usr/bin/env python
"""Record in a shipped demo model why its recipe was chosen (issue 26, item 5), without retraining it.

Reads a ``recipe_choice.py`` choice file (the committed rule, validation sets only) and adds
``provenance.recipe_choice`` to the model's header: the candidate chosen, the rule, each candidate's mean and
lowest validation worst-group Dice, the files, and a sentence on what the tests said beside it. Every tensor is
checked bitwise unchanged before the model is replaced (``record_trained_on.rewrite``). ``dmoe info`` prints it.

    python sample_data/record_recipe_choice.py napari_dmoe/assets/models/fundus-dmoe.safetensors \\
        sample_data/results/seeds/recipe-choice-ship/dmoe.json --tests "..."
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample_data"))


def record(choice_file: Path, tests: str) -> dict:
    choice = json.loads(choice_file.read_text())
    ranked = [{"candidate": name, "mean": round(choice["candidates"][name]["mean"], 4),
               "lowest": round(choice["candidates"][name]["min"], 4)} for name in choice["ranking"]]
    where = choice_file.relative_to(ROOT) if choice_file.is_relative_to(ROOT) else choice_file
    return {"chosen": choice["chosen"], "method": choice["method"], "on": "val-a, val-v (validation only)",
            "rule": choice["rule"], "ranking": ranked, "file": str(where), "tests": tests}


def main(argv: list[str] | None = None) -> int:
    from record_trained_on import rewrite

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("choice", type=Path, help="a recipe_choice.py choice file (<out>/<method>.json)")
    p.add_argument("--tests", default="", help="one sentence: what the tests said beside the choice")
    args = p.parse_args(argv)
    rewrite(args.model, provenance={"recipe_choice": record(args.choice.resolve(), args.tests)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
