"""Drop-in replacement for the paper's ``KAN_Convolutional_Layer`` (change one import, keep weights).

``KAN_Convolutional_Layer`` takes the paper's constructor arguments, is a :class:`KANConv2d`, and
loads both our state dicts and the paper's per-(output, input)-pair layout
(``convs.{p}.conv.base_weight`` etc., ``p = o * in_channels + i``).
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from .layers import KANConv2d

__all__ = ["KAN_Convolutional_Layer", "convert_paper_state_dict"]

_PAIR_KEY = re.compile(r"^convs\.(\d+)\.conv\.(base_weight|spline_weight|spline_scaler|grid)$")


class KAN_Convolutional_Layer(KANConv2d):
    """The paper's KAN convolution layer, computed by :class:`kanvolution.KANConv2d`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, grid_size, spline_order,
        scale_noise, scale_base, scale_spline, base_activation, grid_eps, grid_range: as in the
        paper's code (same order and defaults).
        device: where the parameters live (the paper's default, ``"cpu"``).

    Examples:
        >>> import torch
        >>> from kanvolution.compat import KAN_Convolutional_Layer
        >>> layer = KAN_Convolutional_Layer(in_channels=1, out_channels=5, kernel_size=(3, 3), grid_size=10)
        >>> layer(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 5, 26, 26])
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        kernel_size: Sequence[int] = (2, 2),
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] = (0, 0),
        dilation: Sequence[int] = (1, 1),
        grid_size: int = 5,
        spline_order: int = 3,
        scale_noise: float = 0.1,
        scale_base: float = 1.0,
        scale_spline: float = 1.0,
        base_activation=nn.SiLU,
        grid_eps: float = 0.02,
        grid_range: Sequence[float] = (-1, 1),
        device="cpu",
    ) -> None:
        super().__init__(
            in_channels, out_channels, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
            device=device, grid_size=grid_size, spline_order=spline_order, grid_range=tuple(grid_range),
            base_activation=base_activation, scale_noise=scale_noise, scale_base=scale_base,
            scale_spline=scale_spline, grid_eps=grid_eps,
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if any(k.startswith(prefix + "convs.") for k in state_dict):
            converted = convert_paper_state_dict(
                {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "convs.")},
                in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel_size,
                grid_size=self.grid_size, spline_order=self.spline_order,
            )
            for key in [k for k in state_dict if k.startswith(prefix + "convs.")]:
                del state_dict[key]
            for key, value in converted.items():
                state_dict[prefix + key] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _is_uniform(knots: torch.Tensor) -> bool:
    steps = knots[1:] - knots[:-1]
    if not bool((steps > 0).all()):
        return False
    tol = 1e-4 * float(steps.abs().mean()) + 64 * torch.finfo(knots.dtype).eps * float(knots.abs().max())
    return bool(((steps - steps.mean()).abs() <= tol).all())


def convert_paper_state_dict(state: dict, *, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                             grid_size: int, spline_order: int) -> dict:
    """Turn the paper's per-pair tensors into ``base_weight``/``spline_weight``/``spline_scaler``/``grid``.

    Raises:
        ValueError: on missing or extra pairs, wrong shapes, or grids that are not one uniform
            knot vector per input channel (the same for every output channel and kernel tap).
    """
    kh, kw = kernel_size
    taps = kh * kw
    n_bases = grid_size + spline_order
    n_knots = grid_size + 2 * spline_order + 1
    pairs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _PAIR_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected key {key!r} in a paper-layout state dict")
        pairs.setdefault(int(match.group(1)), {})[match.group(2)] = value
    expected = in_channels * out_channels
    if sorted(pairs) != list(range(expected)):
        raise ValueError(
            f"the paper's layout needs pairs convs.0 .. convs.{expected - 1} for {out_channels} output x "
            f"{in_channels} input channels, got {len(pairs)} pairs"
        )
    shapes = {"base_weight": (1, taps), "spline_weight": (1, taps, n_bases), "spline_scaler": (1, taps),
              "grid": (taps, n_knots)}
    dtype = pairs[0]["base_weight"].dtype if "base_weight" in pairs[0] else torch.get_default_dtype()
    base = torch.empty(out_channels, in_channels, kh, kw, dtype=dtype)
    spline = torch.empty(out_channels, in_channels, kh, kw, n_bases, dtype=dtype)
    scaler = torch.empty(out_channels, in_channels, kh, kw, dtype=dtype)
    grids: list[torch.Tensor | None] = [None] * in_channels
    for p, tensors in pairs.items():
        o, i = divmod(p, in_channels)
        for name, shape in shapes.items():
            if name not in tensors:
                raise ValueError(f"convs.{p}.conv.{name} is missing")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"convs.{p}.conv.{name} has shape {tuple(tensors[name].shape)}, expected {shape} for "
                    f"kernel {kh}x{kw}, grid_size={grid_size}, spline_order={spline_order}"
                )
        base[o, i] = tensors["base_weight"].reshape(kh, kw)
        spline[o, i] = tensors["spline_weight"].reshape(kh, kw, n_bases)
        scaler[o, i] = tensors["spline_scaler"].reshape(kh, kw)
        grid = tensors["grid"].to(torch.float64)
        first = grid[0]
        if not _is_uniform(first):
            raise ValueError(f"convs.{p}.conv.grid is not a uniform knot vector; only uniform grids can be loaded")
        tol = 1e-6 * (1.0 + float(first.abs().max()))
        if not torch.allclose(grid, first.expand_as(grid), rtol=0.0, atol=tol):
            raise ValueError(
                f"convs.{p}.conv.grid differs between kernel taps; kanvolution keeps one knot vector per input "
                "channel"
            )
        if grids[i] is None:
            grids[i] = first
        elif not torch.allclose(grids[i], first, rtol=0.0, atol=tol):
            raise ValueError(
                f"the grids of input channel {i} differ between output channels (pair {p}); kanvolution keeps "
                "one knot vector per input channel"
            )
    return {"base_weight": base, "spline_weight": spline, "spline_scaler": scaler,
            "grid": torch.stack(grids).to(dtype)}  # type: ignore[arg-type]
