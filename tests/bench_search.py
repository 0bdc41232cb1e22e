"""The check both benchmark evaluators of `modalmerge search` pass (--eval bench-text, bench-mllm): a
grid search over task arithmetic's λ, whose trials must score as the benchmark itself does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def check_grid_search_scores(tmp_path: Path, base: str, models: dict[str, str], spec: str,
                             expected: dict[float, dict[str, float]]) -> None:
    """Search task arithmetic of `models` (name -> path) over base at λ in `expected`, scored by
    --eval `spec`; each trial's accuracy/TASK must equal expected[λ][TASK] and `accuracy` their mean."""
    import yaml

    from modalmerge.cli import main

    recipe = {"method": "task_arithmetic", "base": base,
              "models": [{"path": path, "name": name} for name, path in models.items()],
              "params": {"lambda": {"search": list(expected)}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["search", str(tmp_path / "recipe.yaml"), "--eval", spec, "-o", str(tmp_path / "out"),
                 "--sampler", "grid", "--no-prune", "--no-progress", "--threads", "1"]) == 0
    trials = json.loads((tmp_path / "out" / "search" / "trials.json").read_text())["trials"]
    assert len(trials) == len(expected)
    for trial in trials:
        want = expected[trial["params"]["params.lambda"]]
        assert {t: trial["metrics"][f"accuracy/{t}"] for t in want} == want
        assert trial["metrics"]["accuracy"] == pytest.approx(sum(want.values()) / len(want))
