"""Feature extractors for UniNet: ``create_backbone(name, weights, levels) -> Backbone``.

Every timm CNN works by name; other families plug in with ``register_backbone("prefix:", factory)``.
"""
from .base import Backbone, check_backbone
from .registry import create_backbone, list_backbones, register_backbone
from .timm_cnn import TimmCNN, create_timm_cnn, default_levels, read_state_dict

register_backbone("timm:", create_timm_cnn)
from . import clip as _clip  # noqa: E402,F401  registers "clip:" (open_clip is imported on first use)

__all__ = ["Backbone", "TimmCNN", "check_backbone", "create_backbone", "create_timm_cnn", "default_levels",
           "list_backbones", "read_state_dict", "register_backbone"]
