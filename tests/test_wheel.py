"""sharebone as a user installs it: a wheel built from this checkout, installed into a fresh
virtual environment, run from a folder that is not the repository (no configs/ beside it).

The fresh venv gets its dependencies (torch, Lightning, Hydra...) from this test's own
environment through a ``.pth`` line, so nothing is downloaded; sharebone itself comes only
from the wheel (checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["debug=fast", "logger=csv", "test.episodes=4", "test.settings=[{n_way: 5, k_shot: 1}]"]

#: A user's own config folder: one task, defined on top of one of sharebone's.
MY_TASK = """\
defaults:
  - synthetic_images
  - _self_
name: my_images
family:
  classes: {train: 12, val: 6, test: 6}
"""


def run(exe: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHAREBONE_", "PYTHONPATH"))}
    out = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                         env={**env, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"},
                         timeout=600)
    assert out.returncode == 0, f"{exe.name} {' '.join(args)}:\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The ``bin/`` of a fresh venv with the wheel of this checkout installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(tmp / "dist"), str(REPO_ROOT)],
                   check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("sharebone-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    bin_dir = venv / "bin"
    subprocess.run([str(bin_dir / "pip"), "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    # The dependencies, from this environment (appended: the wheel's sharebone comes first,
    # and the editable install of this checkout there is never activated by a nested .pth).
    site = Path(subprocess.run([str(bin_dir / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in sys.path if Path(p).name == "site-packages" and Path(p).is_dir()]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    return bin_dir


def test_the_wheel_ships_the_configs_and_task_families(installed, tmp_path):
    out = run(installed / "python", "-c",
              "import sharebone, sharebone.config as c, sharebone.data.image_folder.splits as f; "
              "print(sharebone.__file__); print(c.CONFIG_DIR); "
              "print((f.TASKS_DIR / 'splits/mini_imagenet/train.txt').read_text().count(chr(10)))",
              cwd=tmp_path)
    module, config_dir, train_classes = out.stdout.split()
    venv = installed.parent
    assert Path(module).is_relative_to(venv) and Path(config_dir).is_relative_to(venv)
    assert Path(config_dir).name == "conf" and (Path(config_dir) / "train.yaml").is_file()
    assert int(train_classes) == 64  # Ravi & Larochelle's split file, found in the package


def test_help_and_cfg_job_from_another_folder(installed, tmp_path):
    helped = run(installed / "sharebone-train", "--help", cwd=tmp_path).stdout
    assert helped.startswith("sharebone-train: train a shared backbone")
    assert "regime: anil, finetune, fomaml, imaml, maml, metasgd" in helped
    assert "sharebone-train debug=fast task=synthetic_images" in helped
    assert "sharebone-eval: score any checkpoint" in run(installed / "sharebone-eval", "--help",
                                                         cwd=tmp_path).stdout
    job = run(installed / "sharebone-train", "--cfg", "job", "task=mini_imagenet",
              cwd=tmp_path).stdout
    assert "name: mini_imagenet" in job and "name: protonet" in job
    assert not (tmp_path / "outputs").exists()  # printing a config starts no run


def test_a_fast_run_and_its_evaluation_with_the_users_own_task_config(installed, tmp_path):
    (tmp_path / "my_configs" / "task").mkdir(parents=True)
    (tmp_path / "my_configs" / "task" / "my_images.yaml").write_text(MY_TASK)
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]"
    trained = run(installed / "sharebone-train", searchpath, "task=my_images", *FAST,
                  "hydra.run.dir=run", cwd=tmp_path)
    assert "| 5w1s | 4 | acc |" in trained.stdout
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    assert "name: my_images" in saved and "train: 12" in saved  # the user's task, composed
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()
    scored = run(installed / "sharebone-eval", "ckpt=run", "episodes=4",
                 "settings=[{n_way: 5, k_shot: 1}]", cwd=tmp_path)
    assert "| 5w1s | 4 | acc |" in scored.stdout
    assert list((tmp_path / "run" / "eval").glob("fewshot_my_images_test_*.json"))
