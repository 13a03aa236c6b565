"""scripts/bench_test_batch.py: a fresh process per batch size, its peak memory and time."""

from __future__ import annotations

import importlib.util

from helpers.configs import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_test_batch", REPO_ROOT / "scripts" / "bench_test_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_batch_size_is_measured_in_its_own_process_with_the_same_scores(tmp_path, capsys):
    bench = load_bench()
    rows = bench.main(["--regimes", "protonet", "--sizes", "1,3", "--episodes", "3",
                       "--n-way", "5", "--k-shot", "1", "--q-query", "2",
                       "--out", str(tmp_path / "rows.json")])
    assert [(r["regime"], r["batch_size"], r["episodes"]) for r in rows] == \
        [("protonet", 1, 3), ("protonet", 3, 3)]
    for r in rows:
        assert r["threads"] == 1 and r["seconds"] > 0 and r["cpu_seconds"] > 0
        assert r["peak_rss_mb"] >= r["setup_rss_mb"] > 100, "the kernel's peak RSS mark"
    # Batch size is memory, not results: the same episodes, the same untrained weights.
    assert rows[0]["acc"] == rows[1]["acc"]
    assert "| protonet | 3 | 3 |" in capsys.readouterr().out
    assert (tmp_path / "rows.json").is_file()


def test_auto_is_one_episode_per_pass_on_a_cpu_and_a_bad_size_is_refused(tmp_path):
    import pytest
    import torch
    from helpers.configs import FAST, compose_train

    from sharebone.evaluation.fewshot import batch_size_for, evaluate
    from sharebone.run.build import build_run

    cfg = compose_train(tmp_path, FAST + ["test.settings=[{n_way: 5, k_shot: 1}]"])
    assert cfg.test.batch_size == "auto"
    torch.manual_seed(0)
    parts = build_run(cfg)
    auto = evaluate(parts.regime, parts.tests, episodes=9)
    assert batch_size_for(cfg.test.batch_size, parts.regime.device) == 1
    assert [r.mean for r in auto] == pytest.approx(
        [r.mean for r in evaluate(parts.regime, parts.tests, episodes=9, episodes_per_batch=9)])
    for bad in ("all", "0"):
        with pytest.raises(ValueError, match=f"test: batch_size must be auto or an integer "
                                             f">= 1, got '?{bad}'?"):
            build_run(compose_train(tmp_path, FAST + [f"test.batch_size={bad}"]))
