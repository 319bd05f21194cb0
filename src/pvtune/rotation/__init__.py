"""Rotations for incoherence processing: Hadamard and random orthogonal matrices
(:mod:`pvtune.rotation.hadamard`) and their folding into a model's weights
(:mod:`pvtune.rotation.fold`)."""

from pvtune.rotation.fold import RotationConfig, RotationReport, rotate_model_
from pvtune.rotation.hadamard import hadamard, random_hadamard, random_orthogonal, rotation_matrix

__all__ = ["RotationConfig", "RotationReport", "hadamard", "random_hadamard",
           "random_orthogonal", "rotate_model_", "rotation_matrix"]
