"""Backbones (shared across tasks) and heads (specific to a task), built by name."""

from sharebone.models.backbones import (
    BACKBONES,
    MLP,
    BackboneArg,
    ConvNet,
    build_backbone,
    create_backbone,
    feature_width,
    is_module_record,
    register_backbone,
)
from sharebone.models.resnet import ResNet12, WideResNet
from sharebone.models.sharing import ParameterSharing, count_parameters
from sharebone.models.timm_backbone import TimmBackbone
from sharebone.registry import Registry

__all__ = ["BACKBONES", "BackboneArg", "ConvNet", "MLP", "ParameterSharing", "Registry",
           "ResNet12", "TimmBackbone", "WideResNet", "build_backbone", "count_parameters",
           "create_backbone", "feature_width", "is_module_record", "register_backbone"]
