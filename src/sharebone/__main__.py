"""``python -m sharebone train|eval [overrides]``: the console scripts without their wrappers
(``sharebone-train``, ``sharebone-eval``), e.g. from a job script that names a Python."""

from __future__ import annotations

import sys

USAGE = "usage: python -m sharebone train|eval [overrides ...]   (--help for either)"


def main() -> None:
    from sharebone.run.distributed import handed_config

    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if handed_config():  # a DDP rank Lightning started by re-running the command line
        command, sys.argv = "train", [sys.argv[0], "train", *sys.argv[1:]]
    if command not in ("train", "eval"):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    from sharebone.run import cli

    sys.argv = [f"sharebone-{command}", *sys.argv[2:]]
    cli.train() if command == "train" else cli.evaluate()


if __name__ == "__main__":
    main()
