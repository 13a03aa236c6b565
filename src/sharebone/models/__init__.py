"""Backbones (shared across tasks) and heads (specific to a task), built by name."""

from sharebone.models.backbones import BACKBONES, MLP, ConvNet, create_backbone, register_backbone
from sharebone.models.registry import Registry
from sharebone.models.resnet import ResNet12, WideResNet
from sharebone.models.sharing import ParameterSharing, count_parameters
from sharebone.models.timm_backbone import TimmBackbone

__all__ = ["BACKBONES", "ConvNet", "MLP", "ParameterSharing", "Registry", "ResNet12",
           "TimmBackbone", "WideResNet", "count_parameters", "create_backbone",
           "register_backbone"]
