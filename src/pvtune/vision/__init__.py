"""Image classifiers trained through discrete weights: datasets, models, the training loop
and the estimator studies."""

from pvtune.vision.data import DATASETS, ImageData, load_images
from pvtune.vision.models import MLP, SmallCNN, hidden_layers_only
from pvtune.vision.train import (
    PVMethod,
    TorchPruningPeer,
    TrainConfig,
    TrainResult,
    accuracy,
    train_classifier,
)

__all__ = [
    "DATASETS",
    "MLP",
    "ImageData",
    "PVMethod",
    "SmallCNN",
    "TorchPruningPeer",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "hidden_layers_only",
    "load_images",
    "train_classifier",
]
