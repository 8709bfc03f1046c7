"""Models built through the norm registry: ``build_model(name, norm_recipe, ...)``; model code never names a norm."""

from .activations import apply_norm_activations, carries_activation
from .registry import build_model, registered_models

__all__ = ["apply_norm_activations", "build_model", "carries_activation", "registered_models"]
