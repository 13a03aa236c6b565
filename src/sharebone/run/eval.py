"""``sharebone-eval``: score a checkpoint on seeded test episodes, or on a folder episode.

    sharebone-eval ckpt=outputs/2026-11-25/13-00-00             # 600 episodes per setting
    sharebone-eval ckpt=run/checkpoints/best.ckpt episodes=1000 task=omniglot_lake
    sharebone-eval ckpt=run episode_dir=my_episode               # your own support/query

Scores are also a W&B run (``logger=wandb``, the default; ``logger=none`` turns it off), in
the training run's project and grouped by its id: :mod:`sharebone.tracking.eval_run`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sharebone.adaptation import check_inner_loop
from sharebone.checkpoint_io import CheckpointError, find_checkpoint, run_dir_of
from sharebone.data.augment import EpisodeTransform
from sharebone.data.families import build_family, check_plain, family_name, registered_families
from sharebone.errors import SettingError, ShareboneError
from sharebone.evaluation.fewshot import evaluate, test_episodes
from sharebone.evaluation.folder import display_name, load_episode_folder
from sharebone.evaluation.inputs import (
    ConvertedSource,
    InputConversion,
    check_task_input,
    converted_task,
    plan_conversion,
)
from sharebone.evaluation.report import write_results
from sharebone.evaluation.stats import format_table
from sharebone.files import DiskFullError, atomic_write
from sharebone.memory import keep_freed_memory
from sharebone.models.sharing import check_test_steps
from sharebone.regimes.base import FewShotRegime
from sharebone.regimes.loading import load_regime
from sharebone.run.build import check_shared_head_ways
from sharebone.run.environment import quiet_known_noise
from sharebone.tracking import deadline as wandb_deadline
from sharebone.tracking.eval_run import log_evaluation, start, training_run, wandb_options


def task_config(cfg: DictConfig, trained: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The task to evaluate on, and whether its config is trusted: ``task=<name>`` from tasks/
    (the user's own config), else the one saved in the checkpoint (data, never code: its family
    is rebuilt only as a registered family from plain values)."""
    if cfg.get("task"):
        task, trusted = OmegaConf.to_container(cfg.task, resolve=True), True
    elif isinstance(trained.get("task"), dict):
        task, trusted = dict(trained["task"]), False
        check_plain({k: v for k, v in task.items() if k != "family"}, "task")
    else:
        raise CheckpointError(f"{cfg.ckpt} does not record its task; pass task=<name from tasks/>.")
    family = dict(task["family"])
    for key in ("data_dir", "cache_dir"):
        if cfg.get(key) and key in family:
            family[key] = cfg[key]
    task["family"] = family
    return task, trusted


def checked_input(model: FewShotRegime, cfg: DictConfig, task: dict[str, Any],
                  source: str, key: str = "task") -> InputConversion:
    """The conversion of ``task``'s images to the checkpoint's (``convert=auto``; none for
    ``convert=none``), and the converted input checked against the model, before scoring."""
    spec = model.hparams.get("backbone")
    conversion = plan_conversion(task, model.run_config, dict(spec) if isinstance(spec, Mapping)
                                 else None, source, cfg.get("convert", "none"))
    try:
        check_task_input(model, converted_task(task, conversion), source)
    except SettingError as err:
        if key == "task":
            raise
        raise type(err)(f"{key} ({task.get('name')}): {err}") from err
    if conversion:
        print(f"[sharebone] {task.get('name')}: images converted for the checkpoint: "
              f"{conversion.describe()}")
    return conversion


def converted(tests: list[Any], conversion: InputConversion) -> list[Any]:
    """``tests`` with their episodes' model input converted (the same episodes)."""
    if not conversion:
        return tests
    return [dataclasses.replace(t, source=ConvertedSource(t.source, conversion)) for t in tests]


def compose_task(name: str, key: str) -> dict[str, Any]:
    """Task config ``name`` from ``tasks/`` as ``task=<name>`` would compose it (the running
    app's config search path; sharebone's configs when called from Python)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from sharebone.config import CONFIG_DIR

    try:
        if GlobalHydra.instance().is_initialized():
            composed = compose(config_name="eval", overrides=[f"task={name}"])
        else:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                composed = compose(config_name="eval", overrides=[f"task={name}"])
    except HydraException as err:
        known = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
        raise SettingError(f"{key}: no task config {name!r} (known: {', '.join(known)}). Fix: "
                           f"name tasks from tasks/.") from err
    return OmegaConf.to_container(composed.task, resolve=True)


def score_tasks(model: FewShotRegime, cfg: DictConfig, ckpt: Path) -> dict[str, Any]:
    """``tasks=[a, b, ...]``: the checkpoint scored on every task (each through its stated
    input conversion), one table and one result file. Every task is composed and checked
    before the first episode is scored."""
    if cfg.get("task") or cfg.episode_dir:
        raise SettingError("tasks: give tasks=[...] alone, not with task= or episode_dir=. "
                           "Fix: drop task=/episode_dir=, or tasks=.")
    names = [str(n) for n in cfg.tasks]
    planned = []
    for i, name in enumerate(names):
        task = compose_task(name, f"tasks[{i}]")
        task["family"] = {**task["family"], **{k: cfg[k] for k in ("data_dir", "cache_dir")
                                               if cfg.get(k) and k in task["family"]}}
        conversion = checked_input(model, cfg, task, f"the checkpoint {ckpt}", f"tasks[{i}]")
        planned.append((name, task, conversion))
    output_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir_of(ckpt) / "eval"
    check_writable(output_dir)
    settings = OmegaConf.to_container(cfg.settings, resolve=True)
    rules = OmegaConf.to_container(cfg.meta_dataset) if cfg.get("meta_dataset") else None
    results, columns = [], []
    for name, task, conversion in planned:
        family = build_family(task["family"], trusted=True)
        tests = converted(test_episodes(family, settings, q_query=cfg.q_query, seed=cfg.seed,
                                        split=cfg.split, meta_dataset=rules), conversion)
        for result in evaluate(model, tests, episodes=cfg.episodes,
                               episodes_per_batch=cfg.batch_size):
            results.append(result)
            columns.append({"task": name, "conversion": conversion.describe()})
    print(f"\n{model.regime_name} from {ckpt} ({cfg.split} episodes, seed {cfg.seed}):\n"
          f"{tasks_table(results, columns)}\n")
    stem = unique_stem(output_dir, f"fewshot_tasks_{cfg.split}_seed{cfg.seed}_{cfg.episodes}ep_"
                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
    paths = write_results(results, output_dir, stem=stem, row_columns=columns,
                          extra={"checkpoint": str(ckpt), "regime": model.regime_name,
                                 "tasks": names, "split": cfg.split, "seed": cfg.seed})
    print(f"[sharebone] results: {paths['json']} and {paths['csv']}")
    track_tasks(cfg, model, ckpt, names, results, columns)
    return {"results": [{**c, **r.as_dict()} for c, r in zip(columns, results, strict=True)],
            "paths": {k: str(v) for k, v in paths.items()}}


def track_tasks(cfg: DictConfig, model: FewShotRegime, ckpt: Path, names: list[str],
                results: list[Any], columns: list[dict[str, Any]]) -> None:
    """``tasks=[...]`` as one W&B run (:mod:`sharebone.tracking.eval_run`): a row per task and
    setting, linked to the checkpoint's training run as a single task's evaluation is."""
    logger = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    link = training_run(ckpt, model.run_config, getattr(model, "wandb_run_id", None))
    options = wandb_options(logger, link, model.regime_name, "tasks", cfg.split)
    if options is not None:
        options["tags"] = list(dict.fromkeys([*options["tags"], *names]))
    output_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir_of(ckpt) / "eval"
    config = {**OmegaConf.to_container(cfg, resolve=True), "checkpoint": str(ckpt),
              "regime": model.regime_name, "tasks": names,
              **{k: v for k, v in link.items() if k != "train_tags"}}
    config.pop("logger", None)
    for note in log_evaluation(start(options, output_dir), config, results, tasks=columns):
        print(f"[sharebone] {note}")


def tasks_table(results: list[Any], columns: list[dict[str, Any]]) -> str:
    """One Markdown row per (task, setting), with the input conversion each task went
    through (accuracy in %)."""
    lines = ["| task | input conversion | setting | episodes | metric | score | 95% CI |",
             "|---|---|---|---|---|---|---|"]
    for c, r in zip(columns, results, strict=True):
        scale, digits = (100, 2) if r.metric == "acc" else (1, 4)
        lines.append(f"| {c['task']} | {c['conversion']} | {r.name} | {r.episodes} | "
                     f"{r.metric} | {scale * r.mean:.{digits}f} | ± {scale * r.ci95:.{digits}f} |")
    return "\n".join(lines)


def score_folder(model: FewShotRegime, cfg: DictConfig, task: dict[str, Any],
                 figure: Path | None = None) -> dict[str, Any]:
    """Predict every query image of a folder episode; print and return the predictions, and
    draw them (support images by class, queries with predicted/true class) into ``figure``."""
    summary, loaded, predicted = predict_folder(model, cfg, task)
    if figure is not None:
        draw_folder_episode(loaded, predicted, figure,
                            f"{model.regime_name} on {display_name(cfg.episode_dir)}")
    return summary


def predict_folder(model: FewShotRegime, cfg: DictConfig,
                   task: dict[str, Any]) -> tuple[dict[str, Any], Any, torch.Tensor]:
    """Predict every query image of a folder episode: the printed predictions (and accuracy
    on the labelled ones), the episode loaded and the predicted class of each query.

    The images are read as the task's own are (its family's ``preprocessing``, where it has
    one: Omniglot's drawings are inverted, an image-folder task's photos are not, nor is
    anything by default) and normalised as its test episodes are."""
    family = registered_families().get(family_name(task.get("family", {})))
    preprocessing = getattr(family, "preprocessing", None)
    settings = preprocessing(task["family"]) if preprocessing is not None else {}
    normalize = settings.pop("normalize", None)
    loaded = load_episode_folder(cfg.episode_dir, image_size=task["image_size"],
                                 channels=task.get("channels", 1), **settings)
    model.eval()
    episode = loaded.episode.to(model.device)
    episode = EpisodeTransform(0, "test", None, normalize)(episode) if normalize \
        else episode.to_float()
    with model.prediction_context():
        logits = model.predict_episode(episode)[0].detach().cpu()
    probs = logits.softmax(-1)
    rows = []
    targets = loaded.query_targets.tolist()
    for path, target, p in zip(loaded.query_names, targets, probs, strict=True):
        predicted = int(p.argmax())
        rows.append({"query": path, "predicted": loaded.class_names[predicted],
                     "confidence": round(float(p[predicted]), 4),
                     "true": loaded.class_names[target] if target >= 0 else None})
        mark = "" if target < 0 else ("  ok" if target == predicted else
                                      f"  wrong (is {loaded.class_names[target]})")
        print(f"{path}: {loaded.class_names[predicted]} ({p[predicted]:.2f}){mark}")
    labelled = loaded.query_targets >= 0
    summary = {"predictions": rows, "classes": loaded.class_names}
    if labelled.any():
        acc = (probs.argmax(-1)[labelled] == loaded.query_targets[labelled]).float().mean()
        summary["accuracy"] = float(acc)
        print(f"accuracy on {int(labelled.sum())} labelled queries: {100 * float(acc):.2f}%")
    return summary, loaded, probs.argmax(-1)


def draw_folder_episode(loaded: Any, predicted: torch.Tensor, path: Path, title: str) -> None:
    """The episode grid of a folder episode, as a PNG (a failure is a warning, not an error:
    the predictions are printed and written already)."""
    from sharebone.tracking.figures import episode_figure, save_png

    e = loaded.episode
    try:
        fig = episode_figure(e.support[0], e.support_labels[0], e.query[0], predicted,
                             loaded.query_targets, loaded.class_names, title=title,
                             max_queries=40, max_classes=FIGURE_CLASSES)
        save_png(fig, path)
    except Exception as err:  # noqa: BLE001 - a picture must never lose the results
        warnings.warn(f"Could not draw the episode into {path}: {err}", stacklevel=2)
        return
    print(f"[sharebone] episode with predictions: {path}")


#: Classes a folder episode's figure draws (its title says so when there are more): a
#: 1,000-way episode drawn whole kept matplotlib's constrained layout busy for over 5 minutes.
FIGURE_CLASSES = 20


def episode_stem(episode_dir: str | Path) -> str:
    """``episode_<folder name>_<time>``: a folder episode's outputs, named by its folder (as
    test results are by their task) so that the next episode does not overwrite them."""
    name = display_name(Path(episode_dir).expanduser().resolve().name) or "episode"
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "episode"
    return f"episode_{safe[:80]}_{time.strftime('%Y%m%d-%H%M%S')}"


def unique_stem(folder: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when results of that name are already there."""
    candidate, n = stem, 1
    while any((folder / f"{candidate}{ext}").exists() for ext in (".json", ".csv", ".png")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


class OutputDirError(ShareboneError, PermissionError):
    """The results folder cannot be written; the message says why and names output_dir."""


def check_writable(folder: Path) -> None:
    """Refuse a results folder that cannot be written (a read-only run directory, a file)."""
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"output_dir={folder} is a file, not a folder: results go into a "
                             "folder. Pass output_dir=<a folder you can write> to sharebone-eval.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputDirError(f"Cannot write results to {folder} ({err.strerror}). Pass "
                             "output_dir=<a folder you can write> to sharebone-eval.") from err


def check_request(cfg: DictConfig) -> None:
    """What can be refused before a checkpoint is read or an episode scored: a value whose
    ``${...}`` does not resolve, no settings to score, a W&B time limit that is no number."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        key = getattr(err, "full_key", None) or "a setting"
        reason = str(err).strip().splitlines()[0]
        raise SettingError(f"{key}: {reason}. '${{' in a value starts an interpolation; write a "
                           f"literal one as '\\${{' (e.g. 'output_dir=/runs/\\${{x}}').") from err
    if not cfg.episode_dir and not cfg.get("settings"):
        raise SettingError("settings is empty: nothing to score. Give at least one, e.g. "
                           "'settings=[{n_way: 5, k_shot: 1}]' (or drop the override for the "
                           "default four).")
    logger = cfg.get("logger") or {}
    if "wandb" in logger:
        wandb_deadline.call_timeout((logger.wandb or {}).get("timeout"))


def track(cfg: DictConfig, model: FewShotRegime, ckpt: Path, task: dict[str, Any],
          results: list[Any], link: dict[str, Any], written: Path) -> None:
    """The evaluation as a W&B run (:mod:`sharebone.tracking.eval_run`) and its
    score-vs-shots figure as a PNG beside the results file ``written``."""
    logger = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else None
    loggers = start(wandb_options(logger, link, model.regime_name, task["name"], cfg.split),
                    written.parent)
    config = {**OmegaConf.to_container(cfg, resolve=True), "checkpoint": str(ckpt),
              "regime": model.regime_name, "task": task, "results": str(written),
              **{k: v for k, v in link.items() if k != "train_tags"}}
    config.pop("logger", None)
    title = (f"{model.regime_name} on {task['name']} ({cfg.split}, seed {cfg.seed})\n"
             f"{Path(ckpt).name} of {link['train_run_name'] or run_dir_of(ckpt).name}")
    figure = written.with_name(f"{written.stem}_{model.metric_name}_vs_shots.png")
    for note in log_evaluation(loggers, config, results, figure=figure, title=title):
        print(f"[sharebone] {note}")


def score_episode_dir(model: FewShotRegime, cfg: DictConfig, task: dict[str, Any],
                      output_dir: Path) -> dict[str, Any]:
    """A folder episode's predictions, written (``<stem>.json``) before they are drawn
    (``<stem>.png``): a figure that fails or takes long must never cost the results."""
    summary, loaded, predicted = predict_folder(model, cfg, task)
    stem = unique_stem(output_dir, episode_stem(cfg.episode_dir))
    written = output_dir / f"{stem}.json"
    try:
        with atomic_write(written, "w") as f:
            f.write(json.dumps(summary, indent=2))
    except DiskFullError as err:
        raise DiskFullError(f"Predictions not saved: {err} They were printed above; or pass "
                            "output_dir=<a folder with free space>.") from err
    print(f"[sharebone] predictions: {written}")
    draw_folder_episode(loaded, predicted, written.with_suffix(".png"),
                        f"{model.regime_name} on {display_name(cfg.episode_dir)}")
    return {**summary, "paths": {"json": str(written), "png": str(written.with_suffix(".png"))}}


def set_inner_steps(model: Any, steps: Any) -> None:
    """``inner_steps=``: the MAML family's inner steps at test time, or the test-time
    fine-tuning steps of a checkpoint whose sharing map adapts parameters (ProtoNet,
    pretrain, multitask with ``sharing.adapt``)."""
    if "test_inner_steps" in model.hparams:
        check_inner_loop(steps, model.hparams.inner_lr, training=False)
        model.hparams.test_inner_steps = int(steps)
    elif model.test_time is not None:
        check_test_steps(steps)
        model.set_test_setting("sharing.test_steps", int(steps))
    else:
        raise SettingError(f"inner_steps={steps} applies to gradient-based regimes (maml, "
                           "fomaml, anil, metasgd) and to checkpoints whose sharing map "
                           f"fine-tunes parameters at test time (sharing.adapt); this "
                           f"{model.regime_name} checkpoint has neither. Drop the override.")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt``; returns the results (also written as JSON/CSV)."""
    quiet_known_noise()
    check_request(cfg)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    ckpt = find_checkpoint(cfg.ckpt)
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True) if cfg.backbone else None
    model = load_regime(ckpt, backbone=backbone)
    if cfg.get("inner_steps") is not None:
        set_inner_steps(model, cfg.inner_steps)
    check_shared_head_ways(model, OmegaConf.to_container(cfg.settings, resolve=True)
                           if cfg.get("settings") else [], key="settings")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    if cfg.get("tasks"):
        return score_tasks(model, cfg, ckpt)
    task, trusted = task_config(cfg, model.run_config or {})
    conversion = checked_input(model, cfg, task, f"the checkpoint {ckpt}")
    output_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir_of(ckpt) / "eval"
    check_writable(output_dir)  # now, not after scoring thousands of episodes

    if cfg.episode_dir:
        return score_episode_dir(model, cfg, task, output_dir)

    family = build_family(task["family"], trusted=trusted)
    settings = OmegaConf.to_container(cfg.settings, resolve=True)
    rules = cfg.get("meta_dataset")
    tests = converted(test_episodes(family, settings, q_query=cfg.q_query, seed=cfg.seed,
                                    split=cfg.split,
                                    meta_dataset=OmegaConf.to_container(rules) if rules else None),
                      conversion)
    results = evaluate(model, tests, episodes=cfg.episodes,
                       episodes_per_batch=cfg.batch_size)
    print(f"\n{model.regime_name} from {ckpt}\n{task['name']} ({cfg.split} episodes, "
          f"seed {cfg.seed}):\n{format_table(results)}\n")
    # One file per evaluation, never over an earlier one: task, split, seed, episodes, time.
    stem = unique_stem(output_dir, f"fewshot_{task['name']}_{cfg.split}_seed{cfg.seed}_"
                                   f"{cfg.episodes}ep_{time.strftime('%Y%m%d-%H%M%S')}")
    link = training_run(ckpt, model.run_config, getattr(model, "wandb_run_id", None))
    paths = write_results(results, output_dir, stem=stem,
                          extra={"checkpoint": str(ckpt), "regime": model.regime_name,
                                 "task": task["name"], "split": cfg.split, "seed": cfg.seed,
                                 "train_run_id": link["train_run_id"],
                                 **model.sharing_counts().as_dict()})
    print(f"[sharebone] results: {paths['json']} and {paths['csv']}")
    # Only now: an evaluation that fails leaves no half-written W&B run.
    track(cfg, model, ckpt, task, results, link, paths["json"])
    return {"results": [r.as_dict() for r in results],
            "paths": {k: str(v) for k, v in paths.items()}}
