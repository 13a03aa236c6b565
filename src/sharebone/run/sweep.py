"""Sweeps (``sharebone-train -m ...``): one table of every job's results at the end.

:class:`SweepSummary` is a Hydra callback (registered in ``configs/hydra/default.yaml``):
when a multirun ends, whatever launcher ran it (local, submitit/SLURM, Optuna trials), it
reads each job's ``metrics.json`` and ``.hydra/overrides.yaml`` from the sweep directory and
writes ``summary.md`` and ``summary.csv`` there. A job that failed or has not finished is
listed with its status instead of numbers. The same table for any sweep directory, e.g.
while SLURM jobs are still running::

    python -m sharebone.run.sweep multirun/2026-11-25/13-00-00
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sharebone.run.run_dir import read_overrides

#: A command-line override that sweeps: ``key=a,b``, ``key=range(...)``, ``choice(...)``...
_SWEEP_VALUE = re.compile(r"^(?:[^\[\]{}()]*,|(?:range|choice|interval|tag|glob)\()")


def swept_keys(arguments: Sequence[str], sweeper_params: Any = None) -> list[str]:
    """The keys a multirun varies: ``-m regime.lr=1e-3,1e-2 seed=0`` -> ``["regime.lr"]``,
    plus the keys of ``hydra.sweeper.params`` (Optuna's search space)."""
    keys = []
    for arg in arguments:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("-", "hydra.")) and _SWEEP_VALUE.match(value):
            keys.append(key.lstrip("+~"))
    for key in dict(sweeper_params or {}):
        if key not in keys:
            keys.append(str(key))
    return keys


def job_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep: its number, overrides, status and metrics."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for overrides_file in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = read_overrides(overrides_file)  # data, never resolved as config
        row: dict[str, Any] = {"job": str(job_dir.relative_to(sweep_dir)),
                               "overrides": dict(o.partition("=")[::2] for o in overrides)}
        metrics_file = job_dir / "metrics.json"
        if metrics_file.is_file():
            row["status"] = "done"
            row["metrics"] = json.loads(metrics_file.read_text())
        else:
            row["status"] = "failed or running"
            row["metrics"] = {}
        rows.append(row)
    rows.sort(key=lambda r: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", r["job"])])
    return rows


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value is not the same in every job."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["overrides"] if k not in keys]
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["metrics"] if k not in keys]
    return keys


def write_summary(sweep_dir: str | Path) -> dict[str, Path]:
    """``summary.md`` (the swept values, test scores ± 95% CI) and ``summary.csv`` (every
    override and metric) in ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir)
    varying, metrics = _varying(rows), _metric_keys(rows)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    csv_path = sweep_dir / "summary.csv"
    all_overrides = []
    for row in rows:
        all_overrides += [k for k in row["overrides"] if k not in all_overrides]
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", *all_overrides, *metrics])
        for row in rows:
            writer.writerow([row["job"], row["status"],
                             *(row["overrides"].get(k, "") for k in all_overrides),
                             *(row["metrics"].get(k, "") for k in metrics)])

    scores = [k for k in metrics if k.startswith("test/") and not k.endswith("/ci95")]
    columns = ["job", *varying, *[k for k in metrics if k.startswith("val/")],
               *[k.removeprefix("test/") for k in scores], "train s", "status"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        m = row["metrics"]
        cells = [row["job"], *(row["overrides"].get(k, "") for k in varying)]
        cells += [_number(m.get(k)) for k in metrics if k.startswith("val/")]
        for key in scores:
            ci = m.get(key.rsplit("/", 1)[0] + "/ci95")
            value = m.get(key)
            cells.append("" if value is None else
                         f"{100 * value:.2f} ± {100 * ci:.2f}" if ci is not None and
                         key.endswith("/acc") else _number(value))
        cells += [_number(m.get("train_seconds"), 1), row["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    md_path = sweep_dir / "summary.md"
    done = sum(r["status"] == "done" for r in rows)
    md_path.write_text(f"# Sweep {sweep_dir}\n\n{done} of {len(rows)} jobs done. Test "
                       "accuracies in %, ± the 95% CI over test episodes.\n\n"
                       + "\n".join(lines) + "\n")
    return {"md": md_path, "csv": csv_path}


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class SweepSummary(Callback):
    """Hydra callback: writes the sweep's summary table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        paths = write_summary(sweep_dir)
        print(f"[sharebone] sweep summary: {paths['md']} and {paths['csv']}")
        print(paths["md"].read_text())


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: python -m sharebone.run.sweep <sweep dir "
                         "(multirun/<date>/<time>)>")
    paths = write_summary(args[0])
    print(paths["md"].read_text())


if __name__ == "__main__":
    main()
