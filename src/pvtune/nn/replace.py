"""Replacing one submodule of a model by name (the leaf every in-place conversion uses)."""

from __future__ import annotations

from torch import nn


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``root`` (``"model.layers.0.mlp"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
