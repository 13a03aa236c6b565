"""What a run shows: its W&B name and tags, summary metrics, learning rate and figures.

``sharebone-train`` calls three things from here:

- :func:`name_and_tags` on the W&B options: a run is named after what it is
  (``protonet-omniglot_small-conv4-5w1s-2026-11-25_13-00-00``: regime, task, backbone, training
  setting, the run directory's time) unless the user named it, and tagged with the same parts;
- :func:`callbacks`: :class:`Dashboard` (the validation metric's W&B summary is its best value,
  ``max`` for accuracy, ``min`` for MSE; a sample validation episode with its predictions after
  every validation); the learning rate is the ``lr_monitor`` callback (configs/callbacks/);
- :func:`after_test`: learning curves from ``csv/metrics.csv``, test accuracy vs shots and, for
  the MAML family, accuracy vs inner steps at test.

Every figure is written as a PNG in ``<run dir>/figures/`` (no W&B needed to look at a run) and
logged to W&B where a W&B logger runs. Pictures never stop a run: a figure that fails is a
warning. ``figures.enabled=false`` turns them off.
"""

from __future__ import annotations

import io
import logging
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from sharebone import tracking
from sharebone.data.episodes import Episode, RaggedEpisodes
from sharebone.errors import SettingError

log = logging.getLogger(__name__)

FIGURES = "figures"
#: Hydra's run directories end in ``<date>/<time>``; that pair is the run's time in its name.
_DATE, _TIME = re.compile(r"^\d{4}-\d{2}-\d{2}$"), re.compile(r"^\d{2}-\d{2}-\d{2}")


# --------------------------------------------------------------------------------------------
# Names and tags


def training_setting(cfg: Mapping[str, Any]) -> str | None:
    """``<n>w<k>s`` of the training episodes (``sampler.train``), None where there are none."""
    train = ((cfg.get("sampler") or {}).get("train")) or {}
    if train.get("shape", "fixed") != "fixed":
        return str(train["shape"])
    n_way, k_shot = train.get("n_way"), train.get("k_shot")
    return f"{n_way}w{k_shot}s" if n_way is not None and k_shot is not None else None


def hydra_run_time(output_dir: str | Path) -> str | None:
    """``<date>_<time>`` of a Hydra run directory ``.../<date>/<time>``; None for another."""
    parts = Path(output_dir).parts
    if len(parts) >= 2 and _DATE.match(parts[-2]) and _TIME.match(parts[-1]):
        return f"{parts[-2]}_{parts[-1]}"
    return None


def run_time(output_dir: str | Path) -> str:
    """When the run started: the ``<date>/<time>`` of a Hydra run directory, else now."""
    return hydra_run_time(output_dir) or time.strftime("%Y-%m-%d_%H-%M-%S")


def run_tags(cfg: Mapping[str, Any]) -> list[str]:
    """Regime, task, backbone and training setting (``5w1s``)."""
    tags = [(cfg.get("regime") or {}).get("name"), (cfg.get("task") or {}).get("name"),
            (cfg.get("backbone") or {}).get("name"), training_setting(cfg)]
    return [str(t) for t in tags if t]


def run_name(cfg: Mapping[str, Any], output_dir: str | Path) -> str:
    """``<regime>-<task>-<backbone>-<n>w<k>s-<run time>``."""
    return "-".join([*run_tags(cfg), run_time(output_dir)])


def name_and_tags(wandb: Mapping[str, Any] | None, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The W&B options with a name (unless one is set: the user's, a sweep job's; a resumed
    run keeps the name its W&B run has) and tags: ``logger.wandb.tags``, the config's own
    ``tags``, then what the run is (regime, task, backbone, setting)."""
    options = dict(wandb or {})
    if not options.get("name") and not cfg.get("resume"):
        options["name"] = run_name(cfg, cfg["paths"]["output_dir"])
    tags: list[str] = []
    for tag in [*(options.get("tags") or []), *user_tags(cfg), *run_tags(cfg)]:
        if str(tag) not in tags:
            tags.append(str(tag))
    options["tags"] = tags
    return options


def user_tags(cfg: Mapping[str, Any]) -> list[str]:
    """The config's top-level ``tags`` (``tags=[baseline,lr_sweep]``), checked: W&B takes
    non-empty strings of at most 64 characters."""
    tags = cfg.get("tags") or []
    if isinstance(tags, str):  # tags=baseline: one tag
        tags = [tags]
    if not isinstance(tags, Sequence):
        raise SettingError(f"tags must be a list of words, e.g. tags=[baseline,lr_sweep]; "
                           f"got {tags!r}.")
    for tag in tags:
        if not isinstance(tag, str | int | float) or not str(tag).strip() or len(str(tag)) > 64:
            raise SettingError(f"tags: {tag!r} is not a tag (a non-empty word of at most 64 "
                               "characters), e.g. tags=[baseline,lr_sweep].")
    return [str(t) for t in tags]


# --------------------------------------------------------------------------------------------
# Figures to PNG files and to W&B


def log_figure(loggers: Sequence[Any], key: str, fig: Any, png: Path | None,
               step: int | None = None, caption: str | None = None) -> None:
    """``fig`` written to ``png`` (when given) and logged as an image under ``key`` by each
    W&B logger that still runs."""
    from sharebone.tracking.figures import png_bytes, save_png

    if png is not None:
        save_png(fig, png)
    live = [lg for lg in tracking.wandb_loggers(loggers) if not lg.failed]
    if not live:
        return
    from PIL import Image

    image = Image.open(io.BytesIO(png_bytes(fig)))
    image.load()
    for logger in live:
        logger.log_image(key=key, images=[image], step=step,
                         **({"caption": [caption]} if caption else {}))


def _warn(what: str, err: Exception) -> None:
    warnings.warn(f"Figure {what} failed ({type(err).__name__}: {err}); the run goes on "
                  "without it.", tracking.TrackingWarning, stacklevel=3)


def figure_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    options = {"enabled": True, "val_episode": True, "inner_steps_episodes": 20,
               "inner_steps_extra": 2}
    options.update(dict(cfg.get("figures") or {}))
    return options


def describe(cfg: Mapping[str, Any], regime: str) -> str:
    """``protonet / conv4 on synthetic_images, trained 5w1s`` for figure titles."""
    setting = training_setting(cfg)
    backbone = (cfg.get("backbone") or {}).get("name", "?")
    return (f"{regime} / {backbone} on {(cfg.get('task') or {}).get('name', '?')}"
            + (f", trained {setting}" if setting else ""))


def budget(cfg: Mapping[str, Any], steps: int | None = None, episodic: bool = True) -> str:
    """The training budget: optimizer steps (and episodes per step, for episodic training);
    ``steps`` as trained, else as configured."""
    if steps is None:
        trainer = cfg.get("trainer") or {}
        sampler = cfg.get("sampler") or {}
        steps = int(trainer.get("max_epochs") or 1) * int(sampler.get("batches_per_epoch") or 1)
        if (trainer.get("max_steps") or -1) > 0:
            steps = min(steps, int(trainer["max_steps"]))
    size = (cfg.get("sampler") or {}).get("meta_batch_size") if episodic else None
    return f"{steps} optimizer steps" + (f" x {size} episode(s)" if size else "")


# --------------------------------------------------------------------------------------------
# During training


class Dashboard(pl.Callback):
    """The validation metric's W&B summary as its best value; a validation episode's figure.

    After each validation (not the sanity check) the first task of the first validation
    meta-batch is predicted once more and drawn (support images by class, query images with
    predicted/true classes) into ``figures/val_episode.png`` and, on W&B, ``val/episode``.
    Image classification only; one episode, on rank 0.
    """

    def __init__(self, output_dir: str | Path | None, loggers: Sequence[Any],
                 title: str = "", val_episode: bool = True, source: str | None = None) -> None:
        self.figures = None if output_dir is None else Path(output_dir) / FIGURES
        self.loggers = list(loggers)
        self.title = title
        self.val_episode = val_episode
        #: The task the validation episodes come from (an episode's own source wins).
        self.source = source
        self._episode: Episode | None = None
        self._episode_source: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        metric = getattr(pl_module, "metric_name", None)
        if metric is None:
            return
        summary = "max" if pl_module.metric_higher_is_better else "min"
        for logger in tracking.wandb_loggers(trainer.loggers):
            logger.define_summary(f"val/{metric}", summary)
            logger.define_summary("val/loss", "min")

    def _wanted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        return (self.val_episode and trainer.is_global_zero and not trainer.sanity_checking
                and getattr(pl_module, "metric_name", None) == "acc"
                and (self.figures is not None or bool(tracking.wandb_loggers(self.loggers))))

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                  batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._episode_source = self.source
        if getattr(batch, "sources", None):
            self._episode_source = batch.sources[0]  # many sources: the episode's own
        if isinstance(batch, RaggedEpisodes) and batch.num_tasks:
            batch = batch.tasks()[0]  # variable-shape episodes: the first, as a meta-batch
        if (batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, Episode)
                and batch.support.dim() == 5 and self._wanted(trainer, pl_module)):
            b = batch
            # A copy of one task (not a view that keeps the whole meta-batch alive).
            self._episode = Episode(b.support[:1].clone(), b.support_labels[:1].clone(),
                                    b.query[:1].clone(), b.query_labels[:1].clone(),
                                    b.classes[:1].clone())

    def on_validation_epoch_end(self, trainer: pl.Trainer,
                                pl_module: pl.LightningModule) -> None:
        episode, self._episode = self._episode, None
        if episode is None or not self._wanted(trainer, pl_module):
            return
        try:
            self._draw(trainer, pl_module, episode)
        except Exception as err:  # noqa: BLE001 - a picture must never stop training
            _warn("val/episode", err)

    def _draw(self, trainer: pl.Trainer, model: Any, episode: Episode) -> None:
        from sharebone.tracking.figures import episode_figure

        with model.prediction_context():
            predicted = model.predict_episode(episode).detach().argmax(-1)[0]
        names = class_names(trainer, episode.classes[0].tolist(), self._episode_source)
        true = episode.query_labels[0]
        right, total = int((predicted == true).sum()), true.numel()
        # The step Lightning logs this validation's metrics at.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        source = f" from {self._episode_source}" if self._episode_source else ""
        title = (f"{self.title}\nvalidation episode 0{source} after epoch "
                 f"{trainer.current_epoch} ({trainer.global_step} optimizer steps): "
                 f"{right}/{total} queries right")
        fig = episode_figure(episode.support[0], episode.support_labels[0], episode.query[0],
                             predicted, true, names, title=title)
        #: What the last figure showed (its classes' names and its title), for a reader.
        self.last_drawn = {"classes": names, "title": title}
        png = None if self.figures is None else self.figures / "val_episode.png"
        log_figure(self.loggers, "val/episode", fig, png, step=step,
                   caption=f"epoch {trainer.current_epoch}: {right}/{total} right")


def class_names(trainer: pl.Trainer, classes: Sequence[int],
                episode_source: str | None = None) -> list[str]:
    """The names of validation ``classes`` (dataset labels) as the split's source knows them
    (a folder's name, an Omniglot character), else ``class <label>``; with many sources,
    as the episode's own source knows them."""
    datamodule = getattr(trainer, "datamodule", None)
    source = None
    if datamodule is not None and hasattr(datamodule, "source"):
        try:
            source = datamodule.source("val")
        except Exception:  # noqa: BLE001 - a name is not worth failing a figure for
            source = None
    if episode_source is not None and hasattr(source, "named"):
        try:
            source = source.named(episode_source)
        except ValueError:
            pass
    name = getattr(source, "class_name", None)
    return [name(c) if name is not None else f"class {c}" for c in classes]


def callbacks(cfg: Mapping[str, Any], model: Any, output_dir: str | Path,
              loggers: Sequence[Any]) -> list[pl.Callback]:
    """:class:`Dashboard` (the learning rate is the ``callbacks/lr_monitor`` preset's)."""
    options = figure_options(cfg)
    found: list[pl.Callback] = [Dashboard(
        output_dir, loggers, title=describe(cfg, model.regime_name),
        val_episode=bool(options["enabled"] and options["val_episode"]),
        source=(cfg.get("task") or {}).get("name"))]
    return found


# --------------------------------------------------------------------------------------------
# After the test


def after_test(cfg: Mapping[str, Any], model: Any, tests: Sequence[Any], results: Sequence[Any],
               loggers: Sequence[Any], output_dir: str | Path) -> list[Path]:
    """Learning curves, test score vs shots and (MAML family) vs inner steps: PNGs in
    ``<output_dir>/figures/`` and images on W&B. Returns the PNGs written."""
    options = figure_options(cfg)
    if not options["enabled"]:
        return []
    folder = Path(output_dir) / FIGURES
    title = describe(cfg, model.regime_name)
    written = []
    for name, draw in (("learning_curves", _learning_curves), ("acc_vs_shots", _vs_shots),
                       ("acc_vs_inner_steps", _vs_inner_steps)):
        try:
            path = draw(cfg, model, tests, results, loggers, folder, title, options)
        except Exception as err:  # noqa: BLE001 - a picture must never lose the results
            _warn(name, err)
            continue
        if path is not None:
            written.append(path)
            log.info("figure: %s", path)
    return written


def _episodic(model: Any) -> bool:
    return getattr(model, "trains_on", "episodes") == "episodes"


def _heading(cfg: Mapping[str, Any], model: Any, title: str) -> str:
    return f"{title}\n{budget(cfg, episodic=_episodic(model))}"


def _learning_curves(cfg, model, tests, results, loggers, folder, title, options):
    from sharebone.tracking.figures import learning_curves, read_csv_log, save_png

    path = folder.parent / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    rows = read_csv_log(path)
    steps = max((int(r["step"]) + 1 for r in rows if "train/loss" in r), default=None)
    n_way = ((cfg.get("sampler") or {}).get("train") or {}).get("n_way")
    fig = learning_curves(rows, model.metric_name, model.metric_higher_is_better,
                          n_way=n_way if model.metric_name == "acc" else None,
                          title=f"{title}\n{budget(cfg, steps, _episodic(model))}")
    if fig is None:
        return None
    return save_png(fig, folder / "learning_curves.png")  # W&B draws its own curves


def _vs_shots(cfg, model, tests, results, loggers, folder, title, options):
    from sharebone.tracking.figures import accuracy_vs_shots

    fig = accuracy_vs_shots(results, title=_heading(cfg, model, title))
    if fig is None:
        return None
    png = folder / f"{model.metric_name}_vs_shots.png"
    log_figure(loggers, f"test/{model.metric_name}_vs_shots", fig, png)
    return png


def _vs_inner_steps(cfg, model, tests, results, loggers, folder, title, options):
    """The first test setting scored with 0..test_inner_steps+extra inner steps, on its first
    ``inner_steps_episodes`` episodes (the same episodes for every step count)."""
    from sharebone.evaluation.fewshot import batch_size_for, scores_by_inner_steps
    from sharebone.tracking.figures import score_vs_inner_steps

    episodes = int(options["inner_steps_episodes"] or 0)
    hparams = getattr(model, "hparams", {})
    if episodes <= 0 or not tests or not hasattr(model, "scoring_with"):
        return None
    test = tests[0]
    configured = int(model.test_inner_steps)
    steps = list(range(configured + int(options["inner_steps_extra"]) + 1))
    per_batch = batch_size_for(cfg["test"]["batch_size"], model.device)
    scores = scores_by_inner_steps(model, test, steps, episodes, min(episodes, per_batch))
    tracking.log_table(loggers, "test/inner_steps",
                       [{"inner_steps": s, **r.as_dict()} for s, r in zip(steps, scores,
                                                                          strict=True)])
    fig = score_vs_inner_steps(steps, scores, trained_steps=int(hparams["inner_steps"]),
                               test_steps=configured, title=_heading(cfg, model, title))
    png = folder / f"{model.metric_name}_vs_inner_steps.png"
    log_figure(loggers, f"test/{model.metric_name}_vs_inner_steps", fig, png)
    return png
