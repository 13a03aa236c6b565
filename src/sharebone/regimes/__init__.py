"""Training regimes: one LightningModule each, all built on a shared backbone."""

from sharebone.regimes.base import (
    REGIMES,
    FewShotRegime,
    accuracy,
    create_regime,
    register_regime,
)
from sharebone.regimes.finetune import FineTune, Pretrain
from sharebone.regimes.loading import load_regime
from sharebone.regimes.maml.imaml import IMAML
from sharebone.regimes.maml.regime import ANIL, FOMAML, MAML, MetaSGD
from sharebone.regimes.maml.reptile import Reptile
from sharebone.regimes.multitask import MultiTask
from sharebone.regimes.protonet import ProtoNet
from sharebone.regimes.r2d2 import R2D2

__all__ = ["ANIL", "FOMAML", "IMAML", "MAML", "R2D2", "REGIMES", "FewShotRegime", "FineTune",
           "MetaSGD", "MultiTask", "Pretrain", "ProtoNet", "Reptile", "accuracy", "create_regime",
           "load_regime", "register_regime"]
