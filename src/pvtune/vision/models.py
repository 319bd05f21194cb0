"""Small image classifiers for the estimator studies."""

from __future__ import annotations

from torch import Tensor, nn

ACTIVATIONS = ("relu", "hardtanh", "identity")


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "hardtanh":
        return nn.Hardtanh()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")


class SmallCNN(nn.Module):
    """``conv(c) - conv(c) - pool - conv(2c) - pool - fc(hidden) - fc(classes)``, batch norm
    after every hidden layer. The first conv (``stem``) and last linear (``head``) are the
    layers binary networks keep in full precision (:func:`hidden_layers_only`). With sign
    activations, the next layer's input quantizer is the nonlinearity: use ``act="identity"``
    (or ``"hardtanh"``)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 width: int = 32, hidden: int = 128, act: str = "relu") -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallCNN needs an image size divisible by 4, got {image_size}")
        c = width
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c * (image_size // 4) ** 2, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, num_classes)
        self.act = _act(act)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.bn0(self.stem(x)))
        h = self.pool(self.act(self.bn1(self.conv1(h))))
        h = self.pool(self.act(self.bn2(self.conv2(h))))
        h = self.act(self.bn3(self.fc(h.flatten(1))))
        return self.head(h)


class MLP(nn.Module):
    """Fully connected ``sizes[0] - ... - sizes[-1]`` with ReLU between layers: ``stem``,
    ``hidden`` (a list) and ``head``, so :func:`hidden_layers_only` keeps the first and last
    layers full precision here too."""

    def __init__(self, sizes: tuple[int, ...] = (784, 512, 512, 512, 10)) -> None:
        super().__init__()
        if len(sizes) < 3:
            raise ValueError(f"an MLP needs input, hidden and output sizes, got {sizes}")
        self.stem = nn.Linear(sizes[0], sizes[1])
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[1:-2], sizes[2:-1],
                                                                     strict=True))
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x.flatten(1)).relu()
        for layer in self.hidden:
            h = layer(h).relu()
        return self.head(h)


def hidden_layers_only(module: nn.Module, name: str) -> bool:
    """Filter for ``quantize_``: every layer but the ``stem`` and ``head`` of a
    :class:`SmallCNN` or :class:`MLP` (binary-network practice: the first and last layers stay
    full precision)."""
    return name not in ("stem", "head")
