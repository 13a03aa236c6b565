"""Write few-shot results next to a run: JSON for programs, CSV for spreadsheets."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sharebone.callbacks.guards import finite_or_none
from sharebone.evaluation.stats import FewShotResult
from sharebone.files import DiskFullError, atomic_write


def _atomic_write(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_results(results: Sequence[FewShotResult], output_dir: str | Path,
                  extra: Mapping[str, Any] | None = None, stem: str = "fewshot",
                  row_columns: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Path]:
    """``<stem>.json`` (results plus run metadata) and ``<stem>.csv`` (a row per setting);
    ``row_columns``: columns put before each result's own (a task name, a conversion)."""
    output_dir = Path(output_dir)
    columns = list(row_columns) if row_columns is not None else [{}] * len(results)
    rows = [{**dict(c), **r.as_dict()} for c, r in zip(columns, results, strict=True)]
    paths = {"json": output_dir / f"{stem}.json", "csv": output_dir / f"{stem}.csv"}
    # NaN is not JSON: a score that is not a number is written as null.
    document = finite_or_none({**dict(extra or {}), "results": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["setting"])
    writer.writeheader()
    writer.writerows(rows)
    try:
        _atomic_write(paths["json"], json.dumps(document, indent=2, allow_nan=False))
        _atomic_write(paths["csv"], buf.getvalue())
    except DiskFullError as err:
        paths["json"].unlink(missing_ok=True)  # both files or neither: no half a result set
        raise DiskFullError(f"Results not saved: {err} The scores were printed above; "
                            "score again with sharebone-eval ckpt=<run dir or .ckpt> "
                            "output_dir=<a folder with free space>.") from err
    return paths
