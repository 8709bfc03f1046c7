"""Models built through the norm registry: ``build_model(name, norm_recipe, ...)``; model code never names a norm."""

from .registry import build_model, registered_models

__all__ = ["build_model", "registered_models"]
