"""Backbones (shared across tasks) and heads (specific to a task), built by name."""

from sharebone.models.backbones import BACKBONES, MLP, ConvNet, create_backbone, register_backbone
from sharebone.models.registry import Registry
from sharebone.models.sharing import ParameterSharing, count_parameters

__all__ = ["BACKBONES", "ConvNet", "MLP", "ParameterSharing", "Registry", "count_parameters",
           "create_backbone", "register_backbone"]
