"""Checkpoints written before a change of layout load and score as they did: a saved run names
its regime, backbone and task family by registered name (or by a class path, kept as an alias),
never by where a module happens to live."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.configs import compose_train

from sharebone.run import eval as sb_eval

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_checkpoint_scores_as_it_did(tmp_path, name):
    expected = EXPECTED[name]
    shapes = [re.fullmatch(r"(\d+)w(\d+)s", s).groups() for s in expected["means"]]
    settings = ", ".join(f"{{n_way: {n}, k_shot: {k}}}" for n, k in shapes)
    cfg = compose_train(tmp_path, [f"ckpt={FIXTURES / f'{name}.ckpt'}",
                                   f"episodes={expected['episodes']}", f"settings=[{settings}]",
                                   "logger=none", f"output_dir={tmp_path}"], config_name="eval")
    results = sb_eval.run(cfg)
    means = {r["setting"]: r["mean"] for r in results["results"]}
    assert means == pytest.approx(expected["means"], abs=1e-6)
