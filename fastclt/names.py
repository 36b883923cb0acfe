"""The names a configuration and the ops share, defined once (docs/DESIGN.md §2–§5).

``fastclt.config`` validates model configurations against these tuples and the ops validate their
arguments against the same ones, so a new activation or tying is added here and nowhere else.
This module imports nothing: every layer of the package may use it.
"""
from __future__ import annotations

__all__ = ["ACTIVATIONS", "SELECTIONS", "TYINGS", "NORMALIZATIONS", "SPARSITY_KINDS"]

# The activation of a dictionary (docs/DESIGN.md §3), in the order error messages list them.
ACTIVATIONS = ("jumprelu", "relu", "topk", "batchtopk")
# The activations that keep a fixed number of entries (per token, or per batch) by selection.
SELECTIONS = ("topk", "batchtopk")
# How a CLT's decoders are shared between (source, target) pairs (docs/DESIGN.md §2.1).
TYINGS = ("none", "per_source", "per_target")
# Per-layer input/output normalisation of a dictionary (docs/DESIGN.md §5).
NORMALIZATIONS = ("none", "mean_std", "sqrt_d")
# The sparsity penalty of ReLU/JumpReLU dictionaries (docs/DESIGN.md §4).
SPARSITY_KINDS = ("tanh", "l1")
