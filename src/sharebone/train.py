"""``sharebone-train``: compose a config, train a regime, score it on the test episodes.

    sharebone-train                                   # ProtoNet on omniglot_small
    sharebone-train experiment=omniglot_protonet_5w1s trainer.max_epochs=5
    sharebone-train --cfg job                         # print the composed config
    sharebone-train -m regime.lr=1e-3,3e-3            # a sweep
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sharebone import tracking
from sharebone.checkpoints import load_regime
from sharebone.config import CONFIG_DIR
from sharebone.data.datamodule import EpisodicDataModule
from sharebone.evaluation.fewshot import evaluate
from sharebone.evaluation.report import write_results
from sharebone.evaluation.stats import format_table

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, family: Any) -> pl.LightningDataModule:
    """Episodes, unless the regime's class builds its own datamodule: a regime that trains on
    plain batches (multitask, pre-training, fine-tuning) defines a classmethod
    ``build_datamodule(cfg, family)``."""
    custom = getattr(get_class(cfg.regime._target_), "build_datamodule", None)
    if custom is not None:
        return custom(cfg, family)
    s = cfg.sampler
    return EpisodicDataModule(
        family, train=dict(s.train), val=dict(s.val), meta_batch_size=s.meta_batch_size,
        batches_per_epoch=s.batches_per_epoch, val_episodes=s.val_episodes, seed=s.seed,
        eval_seed=s.eval_seed, num_workers=s.num_workers)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.regime`` on ``cfg.task`` and evaluate it; returns the final metrics.

    A plain function (the Hydra app only calls it), so tests and scripts can call it with a
    composed config.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    family = instantiate(cfg.task.family)
    datamodule = build_datamodule(cfg, family)
    # Impossible episode settings fail now, with the numbers, not after hours of training.
    datamodule.check_settings()
    for setting in cfg.test.settings:
        family.sampler("test", n_way=setting.n_way, k_shot=setting.k_shot,
                       q_query=setting.get("q_query", cfg.test.q_query), seed=cfg.test.seed)
    model = instantiate(cfg.regime, _convert_="all")
    model.run_config = OmegaConf.to_container(cfg, resolve=True)

    sharing = model.parameter_sharing()
    log.info("%s on %s: %s", model.regime_name, cfg.task.name, sharing)
    print(f"[sharebone] {model.regime_name} / {cfg.backbone.name} / {cfg.task.name}: {sharing}")

    loggers = tracking.build_loggers(cfg.get("logger"), output_dir)
    for logger in loggers:
        tracking._safely(logger.log_hyperparams, model.run_config)
    tracking.log_summary(loggers, {f"params/{k}": v for k, v in sharing.as_dict().items()
                                   if isinstance(v, int)})

    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best",
                                 monitor=f"val/{model.metric_name}", save_last=True,
                                 mode="max" if model.metric_higher_is_better else "min")
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False,
                                      callbacks=[checkpoint])
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("resume"))
    train_seconds = time.perf_counter() - started

    metrics: dict[str, float] = {"train_seconds": train_seconds}
    if trainer.global_rank != 0:
        return metrics
    best = checkpoint.best_model_path or checkpoint.last_model_path
    if best:
        # Score what was saved, through the same loader sharebone-eval uses.
        model = load_regime(best).to(trainer.strategy.root_device)
    t = cfg.test
    results = evaluate(model, family, t.settings, episodes=t.episodes, q_query=t.q_query,
                       seed=t.seed, batch_size=t.batch_size)
    table = format_table(results)
    print(f"\nTest episodes ({cfg.task.name}, seed {t.seed}):\n{table}\n")
    paths = write_results(results, output_dir, extra={"regime": model.regime_name,
                                                      "task": cfg.task.name,
                                                      "train_seconds": train_seconds,
                                                      "checkpoint": str(best),
                                                      **sharing.as_dict()})
    for r in results:
        metrics[f"test/{r.name}/{r.metric}"] = r.mean
        metrics[f"test/{r.name}/ci95"] = r.ci95
    tracking.log_summary(loggers, metrics)
    tracking.log_table(loggers, "test/results", [r.as_dict() for r in results])
    if best:
        tracking.log_checkpoint(loggers, best, name=f"{model.regime_name}-{cfg.task.name}",
                                metadata={k: v for k, v in metrics.items()})
    for note in tracking.finish(loggers):
        print(f"[sharebone] {note}")
    print(f"[sharebone] results: {paths['json']}")
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    # Returned for Hydra sweepers (e.g. Optuna): the first test setting's accuracy.
    return next((v for k, v in metrics.items()
                 if k.startswith("test/") and not k.endswith("ci95")), None)


if __name__ == "__main__":
    main()
