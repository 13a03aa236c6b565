"""Few-shot statistics and result files."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sharebone.evaluation.report import write_results
from sharebone.evaluation.stats import format_table, summarize


def test_mean_and_ci95_as_the_field_reports_them():
    accs = torch.tensor([1.0, 0.8, 0.6, 0.6])
    r = summarize(accs, n_way=5, k_shot=1, q_query=15)
    std = math.sqrt(((1 - 0.75) ** 2 + (0.8 - 0.75) ** 2 + 2 * (0.6 - 0.75) ** 2) / 4)
    assert r.mean == pytest.approx(0.75) and r.std == pytest.approx(std)
    assert r.ci95 == pytest.approx(1.96 * std / 2)
    assert r.name == "5w1s" and str(r) == f"5w1s: 75.00 ± {100 * 1.96 * std / 2:.2f}%"


def test_no_episodes_is_an_error():
    with pytest.raises(ValueError, match="No episodes"):
        summarize(torch.tensor([]), 5, 1, 15)


def test_table_and_files(tmp_path):
    results = [summarize(torch.tensor([0.5, 1.0]), 5, 1, 15), summarize(torch.ones(3), 20, 5, 15)]
    assert "| 20w5s | 3 | acc | 100.00 | ± 0.00 |" in format_table(results)
    paths = write_results(results, tmp_path, extra={"regime": "protonet"})
    data = json.loads(paths["json"].read_text())
    assert data["regime"] == "protonet" and data["results"][0]["mean"] == 0.75
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["setting"] for r in rows] == ["5w1s", "20w5s"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewshot.csv", "fewshot.json"]


def test_result_files_are_as_readable_as_any_other_file(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        paths = write_results([summarize(torch.ones(2), 5, 1, 15)], tmp_path)
    finally:
        os.umask(umask)
    assert paths["json"].stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
