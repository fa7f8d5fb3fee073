"""The paper's model zoo (28x28 grey images, 10 classes) behind a small name registry:
``create_model("kanc_mlp_medium", grid_size=20)``, ``list_models("kkan*")``, ``paper_name(...)``."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import KANConv2d, KANLinear

__all__ = [
    "ZooModel",
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "paper_name",
    "MATCHED_BASES",
    "kanc_mlp_small",
    "kanc_mlp_medium",
    "kanc_mlp_big",
    "kkan_small",
    "kkan_medium",
    "conv_kan_small",
    "conv_kan_medium",
    "cnn_small",
    "cnn_medium",
    "cnn_big",
    "cnn_more_convs",
    "ckan_bn",
    "kan_small_net",
    "cnn_small_net_matched",
    "kan_bottleneck_net",
    "cnn_bottleneck_net_matched",
    "kan_stem_bottleneck_net",
    "kan_early_bottleneck_net",
]

DEFAULT_GRID_SIZE = 10
_FLAT = 5 * 5  # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5, per channel


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its registry name, its name in the paper's tables, its builder."""

    name: str
    table_name: str  # without the "(gs = N)" suffix, e.g. "KANC MLP (Medium)"
    builder: Callable[..., nn.Module]

    @property
    def has_kan(self) -> bool:
        """Whether the model has KAN layers (and so takes ``grid_size``)."""
        return "grid_size" in inspect.signature(self.builder).parameters

    @property
    def default_grid_size(self) -> int | None:
        """The grid size the model is built with when none is given (``None`` without KAN layers)."""
        if not self.has_kan:
            return None
        return int(inspect.signature(self.builder).parameters["grid_size"].default)

    @property
    def description(self) -> str:
        """The layer list, from the first line of the builder's docstring."""
        return (self.builder.__doc__ or "").strip().splitlines()[0]

    def paper_name(self, grid_size: int = DEFAULT_GRID_SIZE) -> str:
        """The row name in the paper's results table, e.g. ``"KKAN (Small) (gs = 20)"``."""
        return f"{self.table_name} (gs = {grid_size})" if self.has_kan else self.table_name


_REGISTRY: dict[str, ModelInfo] = {}  # in the order of the paper's table


def register_model(table_name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under its function name, with the name the paper's tables use.

    Examples:
        >>> @register_model("Tiny")
        ... def tiny_example():
        ...     return ZooModel([("fc", nn.Linear(784, 10))], paper_name="Tiny")
        >>> model_info("tiny_example").table_name
        'Tiny'
        >>> _ = _REGISTRY.pop("tiny_example")
    """

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, table_name, builder)
        return builder

    return decorator


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; a ``ValueError`` listing the valid names if unknown."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(_REGISTRY)}") from None


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names in the order of the paper's table, filtered by an fnmatch pattern.

    Examples:
        >>> list_models("kkan*")
        ['kkan_small', 'kkan_medium']
    """
    return [name for name in _REGISTRY if pattern is None or fnmatch.fnmatchcase(name, pattern)]


def create_model(name: str, *, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``kwargs`` go to its builder (e.g. ``grid_size`` for KAN models).

    Args:
        name: a name from :func:`list_models`.
        pretrained: load the weights shipped with the package for this model and grid size
            (``kanvolution.experiments.weights.list_pretrained()`` lists them); the model then
            carries ``model.pretrained_cfg`` (recipe, epochs, ``test_accuracy`` as a fraction,
            SHA-256, ...).
        checkpoint_path: load the weights of a run folder, a ``checkpoint.pt`` or a
            ``.safetensors`` file instead (``model.pretrained_cfg["source"]`` names it).

    Examples:
        >>> import torch
        >>> model = create_model("cnn_medium")
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> create_model("kkan_small", grid_size=20).paper_name
        'KKAN (Small) (gs = 20)'
    """
    info = model_info(name)
    kan_only = [k for k in ("grid_size", "basis", "degree", "basis_options") if k in kwargs]
    if kan_only and not info.has_kan:
        raise ValueError(f"{name!r} has no KAN layers, so it takes no {', '.join(kan_only)}")
    model = info.builder(**kwargs)
    if pretrained and checkpoint_path is not None:
        raise ValueError("pass pretrained=True or checkpoint_path=..., not both")
    if pretrained or checkpoint_path is not None:
        from . import weights  # the loader reads checkpoints; the registry itself needs none of it

        if checkpoint_path is not None:
            weights.load_weights(model, checkpoint_path)
            model.pretrained_cfg = {"source": str(checkpoint_path)}
        else:
            grid_size = kwargs.get("grid_size", info.default_grid_size) if info.has_kan else None
            model.pretrained_cfg = weights.load_pretrained(model, name, grid_size)
        model.eval()
    return model


def paper_name(name: str, grid_size: int = DEFAULT_GRID_SIZE) -> str:
    """The paper's table name of a registered model at a grid size (ignored for plain CNNs).

    Examples:
        >>> paper_name("kanc_mlp_medium", 20)
        'KANC MLP (Medium) (gs = 20)'
        >>> paper_name("cnn_more_convs")
        'CNN (Medium, but with more convs)'
    """
    return model_info(name).paper_name(grid_size)


# ---------------------------------------------------------------------------------------------
# Models


class ZooModel(nn.Module):
    """A stack of named layers followed by ``log_softmax``: every model of the zoo.

    ``model.layers`` is the ``nn.Sequential`` without the ``log_softmax``, so
    ``model.layers[:3](x)`` gives intermediate feature maps.

    Args:
        layers: ``(name, module)`` pairs, applied in order.
        paper_name: the row name in the paper's results table.

    Shape:
        - Input: ``(N, 1, 28, 28)``. Output: ``(N, 10)`` log-probabilities.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], *, paper_name: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict(layers))
        self.paper_name = paper_name

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.layers(x), dim=1)

    def extra_repr(self) -> str:
        return f"paper_name={self.paper_name!r}"


def _kan_conv(in_channels: int, out_channels: int, grid_size: int, kan_options: dict[str, Any]) -> KANConv2d:
    """The paper's "KAN conv": 3x3, no padding, grid_range (-1, 1) (the layer's defaults)."""
    return KANConv2d(in_channels, out_channels, 3, grid_size=grid_size, **kan_options)


def _kan_linear(in_features: int, out_features: int, grid_size: int, kan_options: dict[str, Any]) -> KANLinear:
    """The paper's "KANLinear": grid_range (0, 1), scale_noise 0.01, cubic splines."""
    options = {"grid_range": (0.0, 1.0), "scale_noise": 0.01, "spline_order": 3, **kan_options}
    return KANLinear(in_features, out_features, grid_size=grid_size, **options)


def _kan_trunk(
    channels: int, grid_size: int, kan_options: dict[str, Any], batch_norm: bool = False
) -> list[tuple[str, nn.Module]]:
    """KAN conv 1->5, [BatchNorm], pool, KAN conv 5->channels, [BatchNorm], pool, flatten."""
    return [
        ("conv1", _kan_conv(1, 5, grid_size, kan_options)),
        *([("bn1", nn.BatchNorm2d(5))] if batch_norm else []),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", _kan_conv(5, channels, grid_size, kan_options)),
        *([("bn2", nn.BatchNorm2d(channels))] if batch_norm else []),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]


def _cnn_trunk(channels1: int, channels2: int) -> list[tuple[str, nn.Module]]:
    """Conv 1->channels1, ReLU, pool, conv channels1->channels2, ReLU, pool, flatten."""
    return [
        ("conv1", nn.Conv2d(1, channels1, 3)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(channels1, channels2, 3)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
    ]


@register_model("KANC MLP (Small)")
def kanc_mlp_small(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, pool, KAN conv 5->5, pool, Linear 125->10.

    ``kan_options`` (e.g. ``spline_order``, ``base_activation``) go to every KAN layer.
    """
    layers = _kan_trunk(5, grid_size, kan_options) + [("fc1", nn.Linear(5 * _FLAT, 10))]
    return ZooModel(layers, paper_name=paper_name("kanc_mlp_small", grid_size))


@register_model("KANC MLP (Medium)")
def kanc_mlp_medium(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, pool, KAN conv 5->10, pool, Linear 250->10."""
    layers = _kan_trunk(10, grid_size, kan_options) + [("fc1", nn.Linear(10 * _FLAT, 10))]
    return ZooModel(layers, paper_name=paper_name("kanc_mlp_medium", grid_size))


@register_model("KANC MLP (Big)")
def kanc_mlp_big(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, pool, KAN conv 5->10, pool, Linear 250->100, Linear 100->10."""
    # No activation between the two Linear layers: the paper's model has none.
    layers = _kan_trunk(10, grid_size, kan_options) + [
        ("fc1", nn.Linear(10 * _FLAT, 100)),
        ("fc2", nn.Linear(100, 10)),
    ]
    return ZooModel(layers, paper_name=paper_name("kanc_mlp_big", grid_size))


@register_model("KKAN (Small)")
def kkan_small(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, pool, KAN conv 5->5, pool, KANLinear 125->10."""
    layers = _kan_trunk(5, grid_size, kan_options) + [
        ("kan1", _kan_linear(5 * _FLAT, 10, grid_size, kan_options)),
    ]
    return ZooModel(layers, paper_name=paper_name("kkan_small", grid_size))


@register_model("KKAN (Medium)")
def kkan_medium(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, pool, KAN conv 5->10, pool, KANLinear 250->10."""
    layers = _kan_trunk(10, grid_size, kan_options) + [
        ("kan1", _kan_linear(10 * _FLAT, 10, grid_size, kan_options)),
    ]
    return ZooModel(layers, paper_name=paper_name("kkan_medium", grid_size))


@register_model("Conv & KAN (Small)")
def conv_kan_small(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """Conv 1->5, ReLU, pool, conv 5->5, ReLU, pool, KANLinear 125->10."""
    layers = _cnn_trunk(5, 5) + [("kan1", _kan_linear(5 * _FLAT, 10, grid_size, kan_options))]
    return ZooModel(layers, paper_name=paper_name("conv_kan_small", grid_size))


@register_model("Conv & KAN (Medium)")
def conv_kan_medium(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """Conv 1->5, ReLU, pool, conv 5->10, ReLU, pool, KANLinear 250->10."""
    layers = _cnn_trunk(5, 10) + [("kan1", _kan_linear(10 * _FLAT, 10, grid_size, kan_options))]
    return ZooModel(layers, paper_name=paper_name("conv_kan_medium", grid_size))


@register_model("CNN (Small)")
def cnn_small() -> ZooModel:
    """Conv 1->5, ReLU, pool, conv 5->5, ReLU, pool, Linear 125->10."""
    layers = _cnn_trunk(5, 5) + [("fc1", nn.Linear(5 * _FLAT, 10))]
    return ZooModel(layers, paper_name=paper_name("cnn_small"))


@register_model("CNN (Medium)")
def cnn_medium() -> ZooModel:
    """Conv 1->5, ReLU, pool, conv 5->10, ReLU, pool, Linear 250->10."""
    layers = _cnn_trunk(5, 10) + [("fc1", nn.Linear(10 * _FLAT, 10))]
    return ZooModel(layers, paper_name=paper_name("cnn_medium"))


@register_model("CNN (Big)")
def cnn_big() -> ZooModel:
    """Conv 1->5, ReLU, pool, conv 5->10, ReLU, pool, Linear 250->100, ReLU, Linear 100->10."""
    layers = _cnn_trunk(5, 10) + [
        ("fc1", nn.Linear(10 * _FLAT, 100)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(100, 10)),
    ]
    return ZooModel(layers, paper_name=paper_name("cnn_big"))


@register_model("CNN (Medium, but with more convs)")
def cnn_more_convs() -> ZooModel:
    """Conv 1->10, ReLU, pool, conv 10->20, ReLU, pool, Linear 500->10."""
    layers = _cnn_trunk(10, 20) + [("fc1", nn.Linear(20 * _FLAT, 10))]
    return ZooModel(layers, paper_name=paper_name("cnn_more_convs"))


@register_model("CKAN_BN")
def ckan_bn(grid_size: int = DEFAULT_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->5, BatchNorm, pool, KAN conv 5->25, BatchNorm, pool, Linear 625->256, Linear 256->10."""
    layers = _kan_trunk(25, grid_size, kan_options, batch_norm=True) + [
        ("fc1", nn.Linear(25 * _FLAT, 256)),
        ("fc2", nn.Linear(256, 10)),
    ]
    return ZooModel(layers, paper_name=paper_name("ckan_bn", grid_size))



# ---------------------------------------------------------------------------------------------
# Small networks beyond the paper: four 3x3 "same" convolutions (28x28, 14x14, 7x7, 3x3), each
# followed by max pooling (not the last) and BatchNorm, then global average pooling and one
# Linear layer; under 100K parameters.

# Most parameters sit at low resolution (7x7, 3x3): the cost of a layer is about its parameter
# count times its number of output pixels, for KAN convs and convs alike.
_SMALL_NET_WIDTHS = (8, 16, 24, 28)  # KAN convs: 9 parameters per tap and channel pair at grid size 4
_SMALL_NET_CNN_WIDTHS = (24, 48, 72, 84)  # 3x wider convs: about the same parameter count
SMALL_NET_GRID_SIZE = 4
SMALL_NET_GRID_RANGE = (-2.0, 2.0)  # inputs after BatchNorm: about 95% of them lie inside


def _same_kan_conv(grid_size: int, kan_options: dict[str, Any]) -> Callable[[int, int], KANConv2d]:
    """``conv(in, out)``: a 3x3 KAN conv with padding 1; on the image (one input channel) the
    default grid range ``[-1, 1]``, after a BatchNorm :data:`SMALL_NET_GRID_RANGE` unless
    ``kan_options`` give one."""

    def conv(in_channels: int, out_channels: int) -> KANConv2d:
        options = {"padding": 1, "grid_size": grid_size, **kan_options}
        if in_channels > 1:
            options.setdefault("grid_range", SMALL_NET_GRID_RANGE)
        return KANConv2d(in_channels, out_channels, 3, **options)

    return conv


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


def _relu() -> list[nn.Module]:
    return [nn.ReLU()]


def _small_net(
    conv: Callable[[int, int], nn.Module], after_norm: Callable[[], list[nn.Module]], widths: tuple[int, ...]
) -> list[tuple[str, nn.Module]]:
    """``conv(in, out)``, max pooling (not after the last), BatchNorm, ``after_norm()`` per
    width; then global average pooling and ``Linear(widths[-1], 10)``."""
    layers: list[tuple[str, nn.Module]] = []
    channels = 1
    for index, width in enumerate(widths, start=1):
        layers.append((f"conv{index}", conv(channels, width)))
        if index < len(widths):
            layers.append((f"pool{index}", nn.MaxPool2d(2)))
        layers.append((f"bn{index}", nn.BatchNorm2d(width)))
        layers += [(f"{type(m).__name__.lower()}{index}", m) for m in after_norm()]
        channels = width
    return layers + [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc1", nn.Linear(channels, 10))]


@register_model("KAN small net")
def kan_small_net(grid_size: int = SMALL_NET_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->8, pool, BN, KAN conv 8->16, pool, BN, KAN conv 16->24, pool, BN, KAN conv 24->28, BN, GAP, Linear 28->10.

    Every KAN conv is 3x3 with padding 1. The first sees the images in ``[-1, 1]`` (the default
    grid range); the others follow a BatchNorm and use the grid range ``(-2, 2)`` unless
    ``kan_options`` give one. ``kan_options`` go to every KAN conv.
    """

    layers = _small_net(_same_kan_conv(grid_size, kan_options), lambda: [], _SMALL_NET_WIDTHS)
    return ZooModel(layers, paper_name=paper_name("kan_small_net", grid_size))


@register_model("CNN small net (matched)")
def cnn_small_net_matched() -> ZooModel:
    """Conv 1->24, pool, BN, ReLU, conv 24->48, pool, BN, ReLU, conv 48->72, pool, BN, ReLU, conv 72->84, BN, ReLU, GAP, Linear 84->10.

    The layout of :func:`kan_small_net` with a ReLU after each BatchNorm and 3x the channels, so
    that its parameter count is within 10% of the KAN net's at grid size 4.
    """
    layers = _small_net(_conv3x3, _relu, _SMALL_NET_CNN_WIDTHS)
    return ZooModel(layers, paper_name=paper_name("cnn_small_net_matched"))


# Residual bottleneck networks: a 3x3 stem and pooling to 14x14, then stages at 14x14, 7x7 and
# 3x3 of residual blocks ``x + BN(1x1(BN(f(BN(1x1(x))))))`` whose 3x3 convolution f works on a few
# ("mid") channels of a wider stream. The KAN net spends its parameters on 3x3 KAN convs of 15
# channels (81 parameters per channel pair at grid size 4) and keeps the stream wide with 1x1
# convolutions; it has no fixed activation (besides max-pooling, the KAN convs' phi are its only
# non-linearity). The CNN has the same layout with a ReLU after each inner BatchNorm and 40 mid
# channels.
_BOTTLENECK_STEM = 24
_BOTTLENECK_WIDTHS = (32, 64, 128)  # the stream at 14x14, 7x7 and 3x3
_BOTTLENECK_BLOCKS = (1, 2, 1)
_BOTTLENECK_KAN_MID = 15
_BOTTLENECK_CNN_MID = 40  # about the KAN net's parameter count (within 10%)


class Bottleneck(nn.Module):
    """``x + BN(conv1x1(act(BN(conv3x3(act(BN(conv1x1(x))))))))``, the 3x3 convolution on ``mid`` channels.

    Args:
        width: channels of the input and output.
        mid: channels of the inner 3x3 convolution.
        conv: ``conv(mid, mid)`` builds the inner 3x3 convolution (size-preserving).
        act: builds the activations after the inner BatchNorms (``[]``: none).
    """

    def __init__(self, width: int, mid: int, conv: Callable[[int, int], nn.Module],
                 act: Callable[[], list[nn.Module]]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, mid, 1, bias=False), nn.BatchNorm2d(mid), *act(),
            conv(mid, mid), nn.BatchNorm2d(mid), *act(),
            nn.Conv2d(mid, width, 1, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _bottleneck_net(
    conv: Callable[[int, int], nn.Module], act: Callable[[], list[nn.Module]], mid: int,
    stem: Callable[[int, int], nn.Module] | None = None,
    block: Callable[[int, int], nn.Module] | None = None,
) -> list[tuple[str, nn.Module]]:
    """``stem(1, 24)`` (default ``conv``), pool, BN, ``act()``; per stage: [pool], 1x1 projection,
    BN, bottleneck blocks (``block(stage, width)``, default ``Bottleneck(width, mid, conv, act)``);
    global average pooling, ``Linear(widths[-1], 10)``."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv1", (stem or conv)(1, _BOTTLENECK_STEM)), ("pool1", nn.MaxPool2d(2)), ("bn1", nn.BatchNorm2d(_BOTTLENECK_STEM)),
        *[(f"{type(m).__name__.lower()}1", m) for m in act()],
    ]
    channels = _BOTTLENECK_STEM
    for stage, (width, blocks) in enumerate(zip(_BOTTLENECK_WIDTHS, _BOTTLENECK_BLOCKS), start=2):
        if stage > 2:
            layers.append((f"pool{stage}", nn.MaxPool2d(2)))
        layers += [(f"proj{stage}", nn.Conv2d(channels, width, 1, bias=False)), (f"bn{stage}", nn.BatchNorm2d(width))]
        layers += [(f"block{stage}_{i}", block(stage, width) if block else Bottleneck(width, mid, conv, act))
                   for i in range(1, blocks + 1)]
        channels = width
    return layers + [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc1", nn.Linear(channels, 10))]


@register_model("KAN bottleneck net")
def kan_bottleneck_net(grid_size: int = SMALL_NET_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->24, pool, BN; stages of 32 (14x14), 64 (7x7), 128 (3x3) channels of 1, 2, 1 residual blocks 1x1 -> KAN conv 15->15 -> 1x1; GAP, Linear 128->10.

    Every KAN conv is 3x3 with padding 1; the stem sees the images in ``[-1, 1]`` (the default
    grid range), the blocks' KAN convs follow a BatchNorm and use the grid range ``(-2, 2)`` unless
    ``kan_options`` give one. No fixed activation anywhere. ``kan_options`` go to every KAN conv.
    """

    layers = _bottleneck_net(_same_kan_conv(grid_size, kan_options), lambda: [], _BOTTLENECK_KAN_MID)
    return ZooModel(layers, paper_name=paper_name("kan_bottleneck_net", grid_size))


@register_model("CNN bottleneck net (matched)")
def cnn_bottleneck_net_matched() -> ZooModel:
    """Conv 1->24, pool, BN, ReLU; stages of 32, 64, 128 channels of 1, 2, 1 residual blocks 1x1 -> conv 40->40 -> 1x1 (BN, ReLU inside); GAP, Linear 128->10.

    The layout of :func:`kan_bottleneck_net` with plain 3x3 convolutions, a ReLU after the stem's
    and each block's inner BatchNorms, and 40 instead of 15 inner channels, so that its parameter
    count is within 10% of the KAN net's at grid size 4.
    """
    layers = _bottleneck_net(_conv3x3, _relu, _BOTTLENECK_CNN_MID)
    return ZooModel(layers, paper_name=paper_name("cnn_bottleneck_net_matched"))


@register_model("KAN-stem bottleneck net")
def kan_stem_bottleneck_net(grid_size: int = SMALL_NET_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->24, pool, BN, ReLU; then the stages of :func:`cnn_bottleneck_net_matched` (conv 40->40 inside, BN, ReLU); GAP, Linear 128->10.

    A hybrid: the matched CNN with a 3x3 KAN conv (padding 1, grid range ``[-1, 1]``: the images)
    as its first layer instead of a 3x3 convolution, so that the learned functions act on the
    pixels themselves; about 2% of its parameters are in it. ``kan_options`` go to the KAN conv.
    """
    layers = _bottleneck_net(_conv3x3, _relu, _BOTTLENECK_CNN_MID, stem=_same_kan_conv(grid_size, kan_options))
    return ZooModel(layers, paper_name=paper_name("kan_stem_bottleneck_net", grid_size))


@register_model("KAN-early bottleneck net")
def kan_early_bottleneck_net(grid_size: int = SMALL_NET_GRID_SIZE, **kan_options: Any) -> ZooModel:
    """KAN conv 1->24, pool, BN, ReLU; stage 1 (32 channels, 14x14): a block 1x1 -> KAN conv 15->15 -> 1x1 with no activation; stages 2 and 3 as in :func:`cnn_bottleneck_net_matched`; GAP, Linear 128->10.

    A hybrid between :func:`kan_bottleneck_net` and :func:`kan_stem_bottleneck_net`: KAN convs
    where the maps are large (the stem on the pixels and the 14x14 stage, whose block is the KAN
    bottleneck net's), the matched CNN's blocks (conv 40->40, BN, ReLU) at 7x7 and 3x3. About 21% of
    its parameters are in KAN convs. ``kan_options`` go to every KAN conv.
    """
    kan = _same_kan_conv(grid_size, kan_options)

    def block(stage: int, width: int) -> nn.Module:
        if stage == 2:
            return Bottleneck(width, _BOTTLENECK_KAN_MID, kan, lambda: [])
        return Bottleneck(width, _BOTTLENECK_CNN_MID, _conv3x3, _relu)

    layers = _bottleneck_net(_conv3x3, _relu, _BOTTLENECK_CNN_MID, stem=kan, block=block)
    return ZooModel(layers, paper_name=paper_name("kan_early_bottleneck_net", grid_size))


# Layer options of every basis family with as many parameters per phi as the paper's B-splines
# at G = 10, K = 3 (15: 13 coefficients, w_base, w_scale), so KAN models keep their size;
# fourier has an even count: G = 7 gives 16 (KANC MLP (Medium): 10,430 parameters, +5%).
MATCHED_BASES: dict[str, dict[str, Any]] = {
    "bspline": {"grid_size": 10},
    "rbf": {"basis": "rbf", "grid_size": 13},
    "wavelet": {"basis": "wavelet", "grid_size": 13},
    "chebyshev": {"basis": "chebyshev", "degree": 12},
    "legendre": {"basis": "legendre", "degree": 12},
    "gram": {"basis": "gram", "degree": 12},
    "jacobi": {"basis": "jacobi", "degree": 12},
    "bernstein": {"basis": "bernstein", "degree": 12},
    "fourier": {"basis": "fourier", "grid_size": 7},
    "relu": {"basis": "relu", "grid_size": 10},
}
