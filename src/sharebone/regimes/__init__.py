"""Training regimes: one LightningModule each, all built on a shared backbone."""

from sharebone.regimes.base import REGIMES, FewShotRegime, accuracy, register_regime
from sharebone.regimes.protonet import ProtoNet

__all__ = ["REGIMES", "FewShotRegime", "ProtoNet", "accuracy", "register_regime"]
