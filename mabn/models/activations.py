"""Norms that carry their activation in ResNets: the rewrite lives with the norms (``mabn.norms.activations``);
re-exported here for model code."""

from mabn.norms.activations import apply_norm_activations, carries_activation

__all__ = ["apply_norm_activations", "carries_activation"]
