"""Ships the repository's ``configs/`` (with ``tasks/``, linked in as its ``task`` group) inside
the wheel as ``sharebone/conf``, so an installed sharebone composes the same configs as a
checkout. Everything else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_configs(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's configs/ itself
            return
        target = Path(self.build_lib) / "sharebone" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        # symlinks=False copies what configs/task links to (tasks/), not the link; a user's
        # own configs/local/ overrides are theirs, not part of a release.
        shutil.copytree(ROOT / "configs", target, symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "local", "*.pyc"))


setup(cmdclass={"build_py": build_py_with_configs})
