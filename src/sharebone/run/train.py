"""``sharebone-train``: compose a config, train a regime, score it on the test episodes.

    sharebone-train                                   # ProtoNet on omniglot_small
    sharebone-train experiment=omniglot_protonet_5w1s trainer.max_epochs=5
    sharebone-train --cfg job                         # print the composed config
    sharebone-train -m regime.lr=1e-3,3e-3            # a sweep (summary.md/.csv at the end)
    sharebone-train trainer=ddp trainer.devices=4     # DDP: the meta-batch split across GPUs
    sharebone-train resume=outputs/2026-11-25/13-00-00  # continue a killed run exactly
    sharebone-train train=false ckpt_path=outputs/2026-11-25/13-00-00  # only test a checkpoint
    sharebone-train hparams_search=protonet_optuna    # Optuna search on the val episodes
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from sharebone import tracking
from sharebone.callbacks.guards import NonFiniteLoss, finite_or_none
from sharebone.callbacks.rng import RNGState
from sharebone.callbacks.steptime import StepTimes
from sharebone.checkpoint_io import (
    AtomicCheckpointIO,
    find_checkpoint,
    read_checkpoint,
    record_hparams,
    resume_checkpoint,
    run_dir_of,
)
from sharebone.config import escape_interpolations
from sharebone.errors import SettingError, UnknownNameError, check_count
from sharebone.evaluation.fewshot import evaluate
from sharebone.evaluation.inputs import check_spec
from sharebone.evaluation.report import write_results
from sharebone.evaluation.stats import format_table
from sharebone.evaluation.tuning import Choice, choose_on_validation
from sharebone.files import atomic_write
from sharebone.memory import keep_freed_memory
from sharebone.models.sharing import block_counts
from sharebone.regimes import load_regime
from sharebone.run.build import RunParts, build_run, check_world_size, resolved
from sharebone.run.distributed import RUN_CONFIG_ENV, launch_rank
from sharebone.run.environment import (
    choose_threads,
    quiet_known_noise,
    set_float32_matmul_precision,
)
from sharebone.run.run_dir import (
    RunDirError,
    RunLock,
    check_fresh,
    check_same_run,
    remove_if_empty,
    write_record,
)
from sharebone.run.sweep import swept_keys
from sharebone.tracking import dashboard

log = logging.getLogger(__name__)

def sweep_info() -> dict[str, str] | None:
    """``{"group", "name"}`` for a job of a Hydra multirun (``-m``), else None.

    The group is the sweep directory's last two parts (``multirun/2026-11-25/13-00-00`` ->
    ``2026-11-25_13-00-00``; ``sweep_name`` overrides it); the name is the job number and
    the values it sweeps (``3:regime.lr=0.001``).
    """
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    parts = Path(str(hc.sweep.dir)).parts
    group = "_".join(parts[-2:]) if parts else "sweep"
    swept = swept_keys(sys.argv[1:], hc.sweeper.get("params"))
    values = [o for o in hc.overrides.task if o.partition("=")[0].lstrip("+~") in swept]
    return {"group": group, "name": f"{hc.job.num}:{','.join(values)}".rstrip(":")}


def logger_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``logger`` group, W&B runs of one sweep grouped (group = the sweep's name)."""
    options = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    sweep = sweep_info()
    if "wandb" in options and (sweep or cfg.get("sweep_name")):
        wandb = dict(options["wandb"] or {})
        wandb["group"] = wandb.get("group") or cfg.get("sweep_name") or sweep["group"]
        if sweep and not wandb.get("name"):
            wandb["name"] = sweep["name"]
        options["wandb"] = wandb
    if "wandb" in options:  # named and tagged by what the run is (a name set above wins)
        options["wandb"] = dashboard.name_and_tags(options["wandb"], cfg)
    return options


def build_callbacks(cfg: DictConfig, model: Any, output_dir: Path,
                    loggers: list[Any] | None = None) -> list[pl.Callback]:
    """Best/last checkpoints (last also every ``checkpoint.every_n_train_steps`` steps, for
    mid-epoch resume), RNG state in checkpoints, the non-finite-loss guard, and the
    ``callbacks`` group's entries (configs/callbacks/: presets and ``+callbacks.<name>``).

    Both checkpoint callbacks write ``last.ckpt`` (the epoch-end one after validation, the
    step one in between); the newest wins, so ``resume=<run dir>`` continues from the latest.
    ``callbacks.model_checkpoint`` only tunes the best checkpoint (``monitor``, ``mode``); an
    entry's ``monitor: null`` is the regime's validation score, ``mode: null`` its direction.
    """
    entries = cfg.get("callbacks") or {}
    tuned = {k: v for k, v in OmegaConf.to_container(
        entries.get("model_checkpoint") or OmegaConf.create({}), resolve=True).items()
        if v is not None}
    if set(tuned) - {"monitor", "mode"}:
        raise SettingError(f"callbacks.model_checkpoint takes monitor and mode only, not "
                           f"{sorted(set(tuned) - {'monitor', 'mode'})}: sharebone writes "
                           "checkpoints/best.ckpt and last.ckpt itself (resume, the test and "
                           "sharebone-eval read them); checkpoint.every_n_train_steps sets how "
                           "often last.ckpt is written. Another ModelCheckpoint can be added as "
                           "+callbacks.<name>._target_=pytorch_lightning.callbacks.ModelCheckpoint.")
    score = f"val/{model.metric_name}"
    monitor = tuned.get("monitor", score)
    mode = tuned.get("mode", monitor_mode(model, monitor))
    dirpath = output_dir / "checkpoints"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=dirpath, filename="best", monitor=monitor, mode=mode,
                        save_last=True, enable_version_counter=False)]
    every = (cfg.get("checkpoint") or {}).get("every_n_train_steps") or 0
    if every > 0:
        callbacks.append(ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every,
                                         save_top_k=0, save_last=True,
                                         enable_version_counter=False))
    callbacks.append(RNGState())
    callbacks.append(tracking.WandbRunInCheckpoints())
    callbacks.append(StepTimes())
    callbacks.append(NonFiniteLoss(cfg.get("on_nonfinite_loss", "stop"),
                                   cfg.get("nonfinite_check", "auto")))
    bars = (cfg.get("trainer") or {}).get("enable_progress_bar", True)
    for name, spec in entries.items():
        if spec is None or name == "model_checkpoint":
            continue
        if "_target_" not in spec:
            raise SettingError(f"callbacks.{name} has no _target_ (the class to make). Add it: "
                               f"+callbacks.{name}._target_=<module.Class>, or drop the entry: "
                               f"~callbacks.{name}.")
        if "monitor" in spec and spec.get("monitor") is None:
            spec = OmegaConf.merge(spec, {"monitor": score, "mode": spec.get("mode")
                                          or monitor_mode(model, score)})
        callback = instantiate(spec)
        if isinstance(callback, LearningRateMonitor) and not loggers:
            log.info("callback %s left out: the run has no logger to write the rate to", name)
            continue
        if isinstance(callback, ProgressBar) and not bars:
            log.info("callback %s left out: trainer.enable_progress_bar is false", name)
            continue
        log.info("callback %s: %s", name, spec.get("_target_"))
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, loggers: list[Any], callbacks: list[pl.Callback],
                  ) -> pl.Trainer:
    """The ``trainer`` config's Lightning trainer, checkpoints written atomically (a kill never
    leaves half a file); a value Lightning refuses is a ``trainer.`` setting's error."""
    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                           plugins=[AtomicCheckpointIO()])
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, MisconfigurationException | ValueError | TypeError):
            raise SettingError(f"trainer: {cause} (a setting of configs/trainer/, passed to "
                               "pytorch_lightning.Trainer)") from err
        raise


def monitor_mode(model: Any, monitor: str) -> str:
    """``max`` or ``min`` for a monitored metric: the regime's own score goes its way
    (accuracy up, MSE down); a loss or error goes down; any other score up."""
    if monitor == f"val/{model.metric_name}":
        return "max" if model.metric_higher_is_better else "min"
    return "min" if any(w in monitor for w in ("loss", "mse", "error", "nll")) else "max"


def run(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.regime`` on ``cfg.task`` and evaluate it; returns the final metrics.

    A plain function (the Hydra app only calls it), so tests and scripts can call it with a
    composed config. One training at a time per run directory; a new run never writes over
    another's checkpoints; ``resume=`` continues a run in its own directory.
    """
    record = OmegaConf.to_yaml(cfg)  # as composed, before a resume moves its directory
    job_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() \
        else Path(cfg.paths.output_dir)
    try:
        return accepted_run(cfg, record, job_dir)
    except RunDirError:
        remove_if_empty(job_dir)  # a refused run leaves nothing behind
        raise


def accepted_run(cfg: DictConfig, record: str, job_dir: Path) -> dict[str, float]:
    """:func:`run` once its directory is checked: nothing is written before that."""
    quiet_known_noise()
    check_switches(cfg)
    dashboard.user_tags(cfg)  # bad tags are refused now, whichever loggers run
    if not cfg.get("train", True):
        return score_checkpoint(cfg, record, job_dir)
    ckpt_path = resume_checkpoint(cfg.get("resume"))
    wandb_id = continue_in_run_dir(cfg, ckpt_path) if ckpt_path else None
    output_dir = Path(cfg.paths.output_dir)
    first = launch_rank() == 0  # ranks a launcher started share rank 0's directory and lock
    if first and not ckpt_path:
        check_fresh(output_dir)  # before the lock: a refused run writes not even its lock file
    with RunLock(output_dir) if first else contextlib.nullcontext():
        if first and not ckpt_path:
            check_fresh(output_dir)  # again: a run may have finished there in between
        if first:
            write_record(job_dir, record)
        threads = torch.get_num_threads()
        try:
            return train_and_test(cfg, output_dir, ckpt_path, wandb_id)
        finally:  # a caller running several jobs in one process gets its setting back
            torch.set_num_threads(threads)


#: The largest seed numpy (and so Lightning's seed_everything) takes.
MAX_SEED = 2**32 - 1


def check_switches(cfg: DictConfig) -> None:
    """``train``/``test.enabled``/``ckpt_path``/``resume`` make sense together."""
    train, test = cfg.get("train", True), (cfg.get("test") or {}).get("enabled", True)
    if not isinstance(train, bool) or not isinstance(test, bool):
        raise SettingError(f"train and test.enabled are true or false; got train={train!r}, "
                           f"test.enabled={test!r}.")
    if train and cfg.get("ckpt_path"):
        raise SettingError("ckpt_path= names a checkpoint to test without training (train=false "
                           "ckpt_path=...); to continue training a run, use resume=<run dir>.")
    if not train and not test:
        raise SettingError("train=false test.enabled=false leaves nothing to do: drop one.")
    if not train and not cfg.get("ckpt_path"):
        raise SettingError("train=false tests a checkpoint: pass ckpt_path=<file.ckpt or run "
                           "dir>. (sharebone-eval ckpt=... scores one on its own settings.)")
    seed = check_count("seed", cfg.get("seed", 0), low=0)
    if seed > MAX_SEED:
        raise SettingError(f"seed must be an integer from 0 to {MAX_SEED} (numpy's range), got "
                           f"{seed}.")
    check_count("checkpoint.every_n_train_steps",
                (cfg.get("checkpoint") or {}).get("every_n_train_steps") or 0, low=0)
    if not train and cfg.get("resume"):
        raise SettingError("resume= continues training; with train=false name the checkpoint to "
                           "test as ckpt_path=.")


def score_checkpoint(cfg: DictConfig, record: str, job_dir: Path) -> dict[str, float]:
    """``train=false``: score ``ckpt_path`` on this config's test episodes, as a run scores its
    best checkpoint after training (same evaluator, results, loggers, figures), in a new run
    directory. The checkpoint must have this config's task, backbone and regime."""
    ckpt = find_checkpoint(cfg.ckpt_path)
    saved = read_checkpoint(ckpt)["sharebone"].get("config")
    if saved and cfg.get("task"):  # channels and image size first, by their keys
        check_spec(OmegaConf.to_container(cfg.task, resolve=True), saved, saved.get("backbone"),
                   f"ckpt_path={cfg.ckpt_path}")
    check_same_run(saved, OmegaConf.to_container(cfg, resolve=True), str(cfg.ckpt_path),
                   key="ckpt_path")
    output_dir = Path(cfg.paths.output_dir)
    check_fresh(output_dir)
    with RunLock(output_dir):
        check_fresh(output_dir)
        write_record(job_dir, record)
        pl.seed_everything(cfg.seed, workers=True)
        set_float32_matmul_precision(cfg.get("float32_matmul_precision", "auto"))
        parts = build_run(cfg)
        accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
        cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        model = load_regime(str(ckpt)).to("cuda" if cuda else "cpu")
        print(f"[sharebone] testing {ckpt} ({model.regime_name} / {cfg.task.name}), no training")
        loggers = tracking.build_loggers(logger_config(cfg), output_dir)
        for logger in loggers:
            tracking.safely(logger.log_hyperparams, resolved(cfg, parts.from_data))
        metrics: dict[str, float] = {}
        score_and_report(cfg, model, parts, output_dir, loggers, metrics, str(ckpt))
        finish_run(cfg, model, output_dir, loggers, metrics, str(ckpt), upload=False)
        return metrics


def continue_in_run_dir(cfg: DictConfig, ckpt_path: str) -> str | None:
    """A resumed run goes on in its own directory (its best checkpoint, results, W&B run and
    CSV rows are there), and only as the run it was: same task, backbone and regime. Returns
    the id of the W&B run that wrote the checkpoint (None: none recorded)."""
    meta = read_checkpoint(ckpt_path)["sharebone"]
    check_same_run(meta.get("config"), OmegaConf.to_container(cfg, resolve=True),
                   str(cfg.resume))
    run_dir = run_dir_of(ckpt_path)
    if Path(cfg.paths.output_dir).resolve() != run_dir.resolve():
        print(f"[sharebone] resuming in the run's own directory {run_dir}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return meta.get("wandb_run_id")


def train_and_test(cfg: DictConfig, output_dir: Path, ckpt_path: str | None,
                   wandb_id: str | None = None) -> dict[str, float]:
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("keep_freed_memory", True):
        keep_freed_memory()
    set_float32_matmul_precision(cfg.get("float32_matmul_precision", "auto"))

    # Every setting is checked and every sampler built now, not after hours of training.
    parts = build_run(cfg)
    model = parts.regime
    model.run_config = resolved(cfg, parts.from_data)
    threads = choose_threads(cfg.get("threads", "auto"), model)
    log.info("torch uses %d CPU thread(s)", threads)
    sharing = model.sharing_counts()  # counts per role, every regime
    log.info("%s on %s: %s", model.regime_name, cfg.task.name, sharing)
    roles = getattr(model, "sharing_roles", None)
    if roles is not None:  # a sharing map: its roles, block by block
        sizes = {n: math.prod(s) for n, s in model.mapped_shapes().items()}
        for block, counts in block_counts(roles, sizes, depth=3).items():
            log.info("sharing  %-24s %s", block, "  ".join(f"{k}={v:,}" for k, v in
                                                            counts.items()))
    print(f"[sharebone] {model.regime_name} / {cfg.backbone.name} / {cfg.task.name}: {sharing}")

    # One W&B run per job: ranks that a launcher started as processes of their own log nothing
    # (Lightning's loggers only write on rank 0 anyway; this keeps them from opening runs).
    # A resumed run is in its own directory: its W&B run and CSV rows continue.
    loggers = (tracking.build_loggers(logger_config(cfg), output_dir, resume=bool(ckpt_path),
                                      resume_id=wandb_id)
               if launch_rank() == 0 else [])
    for logger in loggers:
        tracking.safely(logger.log_hyperparams, model.run_config)
    tracking.log_summary(loggers, {f"params/{k}": v for k, v in sharing.as_dict().items()
                                   if isinstance(v, int)})

    callbacks = build_callbacks(cfg, model, output_dir, loggers)
    callbacks += dashboard.callbacks(cfg, model, output_dir, loggers)
    trainer = build_trainer(cfg, loggers, callbacks)
    check_world_size(parts.datamodule, trainer.world_size)
    if ckpt_path:
        print(f"[sharebone] resuming from {ckpt_path}")
    started = time.perf_counter()
    with ddp_job(cfg, output_dir), stopped_by_sigterm(trainer, output_dir):
        trainer.fit(model, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics: dict[str, float] = {"train_seconds": time.perf_counter() - started}
    if trainer.global_rank != 0:
        return metrics
    # The last validation (reduced across ranks); under ddp_spawn Lightning hands it back.
    value = trainer.callback_metrics.get(f"val/{model.metric_name}")
    if value is not None:
        metrics[f"val/{model.metric_name}"] = float(value)
    best = best_checkpoint(callbacks[0], output_dir)
    if best:
        # Score what was saved, through the same loader sharebone-eval uses.
        model = load_regime(best).to(trainer.strategy.root_device)
    choice = choose_auto_settings(cfg, model, parts, loggers, best)
    if cfg.test.get("enabled", True):
        score_and_report(cfg, model, parts, output_dir, loggers, metrics, best, choice)
    else:
        print("[sharebone] test.enabled=false: the test episodes were not scored")
    finish_run(cfg, model, output_dir, loggers, metrics, best)
    return metrics


#: A process ended by SIGTERM exits 128 + 15, as the shell reports a terminated process: a
#: scheduler or a sweep must not record a stopped run as a success.
SIGTERM_EXIT = 143


@contextlib.contextmanager
def stopped_by_sigterm(trainer: pl.Trainer, output_dir: Path) -> Iterator[None]:
    """Lightning ends ``fit`` on SIGTERM with a ``SystemExit`` without a code (status 0): say
    that the run was stopped and how to continue it, and exit :data:`SIGTERM_EXIT`."""
    try:
        yield
    except SIGTERMException:
        last = output_dir / "checkpoints" / "last.ckpt"
        saved = (f"its last checkpoint is {last}" if last.is_file()
                 else "it had written no checkpoint yet")
        print(f"[sharebone] the run was stopped (SIGTERM) at step {trainer.global_step}; "
              f"{saved}. Continue it with: sharebone-train resume={output_dir}",
              file=sys.stderr, flush=True)
        raise SystemExit(SIGTERM_EXIT) from None


def best_checkpoint(checkpoint: ModelCheckpoint, output_dir: Path) -> str:
    """The best checkpoint's path ('' when none was written)."""
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if not best:  # e.g. a ddp_spawn worker wrote them: the main process only knows the files
        best = next((str(p) for p in (output_dir / "checkpoints" / "best.ckpt",
                                      output_dir / "checkpoints" / "last.ckpt") if p.is_file()), "")
    return best


def choose_auto_settings(cfg: DictConfig, model: Any, parts: RunParts, loggers: list[Any],
                         best: str) -> Choice | None:
    """Settings left to ``auto`` chosen on validation episodes (never the test ones), set on
    ``model``, written into the best checkpoint (so ``sharebone-eval`` uses them), printed and
    logged; ``None`` when nothing was left to ``auto``."""
    if not parts.val_tests:
        return None
    choice = choose_on_validation(model, parts.val_tests, episodes=cfg.test.auto_episodes,
                                  episodes_per_batch=cfg.test.batch_size)
    chosen = ", ".join(f"{k}={v}" for k, v in choice.chosen.items())
    table = (f"Chosen on {choice.episodes} validation episodes per setting: {chosen}\n"
             f"{choice.table()}")
    if choice.at_edge:
        table += f"\n{choice.edge_note()}"
    print(f"\n{table}\n")
    log.info("%s", table)
    if best:
        record_hparams(best, dict(model.hparams), {"chosen_on_validation": choice.as_dict()})
    tracking.log_summary(loggers, {f"auto/{k}": v for k, v in choice.chosen.items()})
    return choice


def score_and_report(cfg: DictConfig, model: Any, parts: RunParts, output_dir: Path,
                     loggers: list[Any], metrics: dict[str, float], best: str,
                     choice: Choice | None = None) -> None:
    """Score ``model`` on the run's test episodes; results to files, loggers and ``metrics``
    (:func:`finish_run` then writes the summary and closes the loggers)."""
    t = cfg.test
    results = evaluate(model, parts.tests, episodes=t.episodes,
                       episodes_per_batch=t.batch_size)
    table = f"Test episodes ({cfg.task.name}, seed {t.seed}):\n{format_table(results)}"
    print(f"\n{table}\n")
    log.info("%s", table)  # the results in train.log too
    paths = write_results(results, output_dir, extra={
        "regime": model.regime_name, "task": cfg.task.name,
        "train_seconds": metrics.get("train_seconds"), "checkpoint": str(best),
        **({"chosen_on_validation": choice.as_dict()} if choice else {}),
        **model.sharing_counts().as_dict()})
    for r in results:
        metrics[f"test/{r.name}/{r.metric}"] = r.mean
        metrics[f"test/{r.name}/ci95"] = r.ci95
    tracking.log_table(loggers, "test/results", [r.as_dict() for r in results])
    dashboard.after_test(cfg, model, parts.tests, results, loggers, output_dir)
    print(f"[sharebone] results: {paths['json']}")


def finish_run(cfg: DictConfig, model: Any, output_dir: Path, loggers: list[Any],
               metrics: dict[str, float], best: str, upload: bool = True) -> None:
    """The run's summary to its loggers (with the checkpoint as a W&B artifact when
    ``upload``), loggers closed, ``metrics.json`` written (what a sweep reads)."""
    tracking.log_summary(loggers, metrics)
    if best and upload:
        tracking.log_checkpoint(loggers, best, name=f"{model.regime_name}-{cfg.task.name}",
                                metadata=dict(metrics))
    for note in tracking.finish(loggers):
        print(f"[sharebone] {note}")
    with atomic_write(output_dir / "metrics.json", "w") as f:  # a full disk: one clear line
        f.write(json.dumps(finite_or_none(metrics), indent=2, allow_nan=False))


#: What Lightning's DDP launcher writes into the launching process's environment and leaves
#: there: a later job of a multirun would take LOCAL_RANK for "started by a launcher" and
#: wait forever for ranks nobody starts.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class ddp_job:
    """Around ``trainer.fit``: what makes one job one DDP job, also inside a multirun.

    - ``strategy=ddp`` (Lightning's subprocess launcher) starts rank ``r > 0`` by re-running
      this command line. Composed anew, a rank could get another ``${now:}`` run directory,
      and under ``-m`` it would start the whole sweep again. Instead rank 0 writes its
      resolved config and names it in :data:`RUN_CONFIG_ENV`; :func:`main` in such a rank
      runs that very config.
    - Afterwards the environment Lightning's launcher changed is put back and the process
      group this job opened is closed, so the next job of a multirun starts clean.
    """

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.cfg, self.path = cfg, output_dir / ".rank_config.yaml"
        self.env: dict[str, str | None] = {}
        self.had_group = False

    def __enter__(self) -> ddp_job:
        import torch.distributed as dist

        self.had_group = dist.is_available() and dist.is_initialized()
        self.env = {key: os.environ.get(key) for key in (*LAUNCHER_ENV, RUN_CONFIG_ENV)}
        if launch_rank() == 0:
            # Escaped: a resolved value holding "${" (a path from the environment) must reach
            # the other ranks as the same string, not as an interpolation.
            resolved = escape_interpolations(OmegaConf.to_container(self.cfg, resolve=True))
            self.path.write_text(OmegaConf.to_yaml(resolved))
            os.environ[RUN_CONFIG_ENV] = str(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if not self.had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self.env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if launch_rank() == 0:
            self.path.unlink(missing_ok=True)


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """What a Hydra sweeper (e.g. Optuna) optimises: ``metrics[cfg.objective]`` when set,
    else the last validation score (``val/acc``; ``val/mse`` for regression), else the first
    test setting's score. Validation by default: tuning on the test episodes would leak."""
    key = cfg.get("objective")
    if key:
        if key not in metrics:
            raise UnknownNameError(f"objective={key} is not among this run's metrics "
                                   f"({', '.join(sorted(metrics))}); set objective= to one of the "
                                   "val/ ones.")
        return metrics[key]
    return next((v for k, v in metrics.items() if k.startswith("val/")),
                next((v for k, v in metrics.items()
                      if k.startswith("test/") and not k.endswith("ci95")), None))


def check_objective(cfg: DictConfig) -> None:
    """A sweeper must not tune on the test episodes: they are the final, untouched comparison."""
    key = str(cfg.get("objective") or "")
    if key.startswith("test/"):
        raise SettingError(f"objective={key} would tune on the test episodes; pick a validation "
                           "metric (objective=val/acc, or val/mse for regression).")
