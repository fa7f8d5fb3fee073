"""The registered ops (kanvolution.ops): opcheck, devices, activations, empty batches, memory
formats, torch.compile, autocast and DDP."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kanvolution import KANConv1d, KANConv2d, KANConv3d, KANLinear
from kanvolution import functional as KF
from kanvolution.models import create_model, list_models
from kanvolution.ops import ACTIVATIONS, activation_name, get_basis, kan_backward, kan_forward
from kanvolution.ops.kan import COMPILE_OPTIONS
from kanvolution.reference import kan_conv_reference, kan_linear_reference

F64, F32 = torch.float64, torch.float32
LAYERS = {
    "linear": (lambda **kw: KANLinear(5, 3, **kw), (4, 5)),
    "conv1d": (lambda **kw: KANConv1d(2, 3, 3, padding=1, **kw), (2, 2, 9)),
    "conv2d": (lambda **kw: KANConv2d(2, 4, 3, stride=(1, 2), groups=2, **kw), (2, 2, 7, 8)),
    "conv3d": (lambda **kw: KANConv3d(2, 3, 2, dilation=(1, 2, 1), **kw), (2, 2, 4, 6, 5)),
}


def _layer(kind, device="cpu", dtype=F32, **kw):
    make, shape = LAYERS[kind]
    torch.manual_seed(3)
    layer = make(device=device, dtype=dtype, **kw)
    with torch.no_grad():
        layer.spline_weight.normal_()
    return layer, torch.randn(shape, device=device, dtype=dtype) * 1.3


def _adapt(layer, x):
    """Non-uniform knots, adapted to the data."""
    layer.update_grid(x)
    assert get_basis("bspline") and layer.grid[0].diff().std() > 1e-3


def _op_args(kind, dtype, adapted, channels_last, device="cpu"):
    layer, x = _layer(kind, device, dtype)
    if adapted:
        _adapt(layer, x)
    # The op takes the input channel-last: contiguous as a channels-last layer input gives it, or
    # a strided view of an NCHW input.
    x = x.movedim(1, -1)
    if channels_last:
        x = x.contiguous()
    stride = list(getattr(layer, "stride", ()))
    dilation = list(getattr(layer, "dilation", ()))
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler).detach()
    return (x.requires_grad_(), layer.grid, weight.requires_grad_(), "bspline", layer.spline_order, "silu",
            stride, dilation, layer.groups, channels_last)


OPCHECK_CASES = [(kind, dtype, adapted, cl) for kind in LAYERS for dtype in (F32, F64) for adapted in (False, True)
                 for cl in ((False, True) if kind in ("conv2d", "conv3d") else (False,))]


@pytest.mark.parametrize("kind,dtype,adapted,channels_last", OPCHECK_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_opcheck(device, kind, dtype, adapted, channels_last):
    args = _op_args(kind, dtype, adapted, channels_last, device)
    torch.library.opcheck(kan_forward, args)
    out = kan_forward(*args)
    grad = torch.randn_like(out)
    x, grid, weight, *conf = args
    masks = ([True, True], [True, False], [False, True]) if dtype == F64 and not adapted else ([True, True],)
    for mask in masks:
        torch.library.opcheck(kan_backward, (grad, x.detach(), grid, weight.detach(), *conf[:-1], mask))


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("adapted", [False, True])
def test_parity_with_reference_on_every_device(device, kind, adapted):
    layer, x = _layer(kind, device, F64)
    if adapted:
        _adapt(layer, x)
    x.requires_grad_()
    out = layer(x)
    args = (x, layer.base_weight, layer.spline_weight, layer.spline_scaler, layer.grid, layer.bias)
    if kind == "linear":
        want = kan_linear_reference(*args, layer.spline_order, layer.base_activation)
    else:
        want = kan_conv_reference(*args, layer.stride, layer.padding, layer.dilation, layer.groups,
                                  layer.padding_mode, layer.spline_order, layer.base_activation)
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    params = [x, layer.base_weight, layer.spline_weight, layer.spline_scaler]
    for got, exp in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        assert torch.allclose(got, exp, rtol=1e-9, atol=1e-11)


ACTIVATION_SPELLINGS = [
    (nn.SiLU, "silu"), (F.silu, "silu"), (nn.Identity, "identity"), (nn.ReLU, "relu"), (torch.relu, "relu"),
    (nn.GELU, "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.Tanh, "tanh"), (torch.tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"), (torch.sigmoid, "sigmoid"), (nn.Mish, "mish"),
]


@pytest.mark.parametrize("activation,name", ACTIVATION_SPELLINGS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_activation_names_and_their_derivatives(activation, name):
    layer = KANConv2d(1, 2, 2, grid_size=3, base_activation=activation, dtype=F64)
    assert layer._activation_op == name
    fn, grad = ACTIVATIONS[name]
    x = torch.randn(50, dtype=F64, requires_grad=True)
    g = torch.randn(50, dtype=F64)
    (want,) = torch.autograd.grad(fn(x), x, g)
    assert torch.allclose(grad(g, x.detach()), want, atol=1e-12)
    x4 = torch.randn(2, 1, 4, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x4,))


def test_custom_callable_takes_the_naive_path_with_the_same_result():
    assert activation_name(lambda t: t) is None
    named = KANConv2d(2, 3, 3, base_activation=nn.Tanh, dtype=F64)
    custom = KANConv2d(2, 3, 3, base_activation=lambda t: torch.tanh(t), dtype=F64)
    custom.load_state_dict(named.state_dict())
    assert custom._activation_op is None
    x = torch.randn(2, 2, 7, 7, dtype=F64)
    assert torch.allclose(custom(x), named(x), atol=1e-12)
    named.base_activation = nn.ReLU()  # changing the activation later is seen too
    assert named._activation_op == "relu"


def test_unknown_basis_or_activation_name_is_refused():
    with pytest.raises(ValueError, match="unknown basis 'fouri'"):
        get_basis("fouri")
    with pytest.raises(ValueError, match="unknown base activation 'swish2'"):
        KF.expand_bases(torch.zeros(1, 1), KF.uniform_knots(3, 1), 1, "swish2")


IMPLEMENTATIONS = ["fused", "naive", "reference"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_empty_batch_like_torch(device, kind, implementation):
    layer, x = _layer(kind, device, F32, bias=True, implementation=implementation)
    empty = x[:0].clone().requires_grad_()
    out = layer(empty)
    torch_layer = {"linear": lambda: nn.Linear(5, 3), "conv1d": lambda: nn.Conv1d(2, 3, 3, padding=1),
                   "conv2d": lambda: nn.Conv2d(2, 4, 3, stride=(1, 2), groups=2),
                   "conv3d": lambda: nn.Conv3d(2, 3, 2, dilation=(1, 2, 1))}[kind]().to(device)
    assert out.shape == torch_layer(empty).shape and out.dtype == x.dtype
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())


@pytest.mark.parametrize("ndim,fmt", [(1, torch.channels_last), (1, torch.channels_last_3d), (3, torch.channels_last_3d),
                                      (2, torch.channels_last)])
def test_module_to_memory_format_accepted_like_torch_conv(ndim, fmt):
    cls, torch_cls = {1: (KANConv1d, nn.Conv1d), 2: (KANConv2d, nn.Conv2d), 3: (KANConv3d, nn.Conv3d)}[ndim]
    torch_cls(2, 3, 3).to(memory_format=fmt)  # accepted by torch: so by us
    layer = cls(2, 3, 3)
    x = torch.randn((2, 2) + (6,) * ndim)
    want = layer(x)
    layer.to(memory_format=fmt)
    assert layer.spline_weight.is_contiguous()
    assert torch.allclose(layer(x), want, atol=1e-6)


# -- torch.compile ------------------------------------------------------------------------------


def _step(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def _assert_close(got, want, rtol=1e-5):
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=rtol, atol=rtol * w.abs().max().item()), (g - w).abs().max()


@pytest.mark.parametrize("name", list_models())
def test_compile_every_zoo_model_aot_eager(name):
    model = create_model(name)
    x = torch.randn(6, 1, 28, 28)
    want = _step(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_close(_step(compiled, x), want)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_compile_every_layer_kind_aot_eager(kind):
    layer, x = _layer(kind)
    _adapt(layer, x)  # non-uniform knots: decided inside the kernel, never while tracing
    want = _step(layer, x)
    torch._dynamo.reset()
    _assert_close(_step(torch.compile(layer, fullgraph=True, backend="aot_eager"), x), want)


class _AllKinds(nn.Module):
    """Every layer kind in one graph, so that one inductor compilation covers them all."""

    def __init__(self):
        super().__init__()
        self.c1 = KANConv1d(1, 2, 3, padding=1, grid_size=6)
        self.c2 = KANConv2d(1, 2, 3, padding=1, base_activation=nn.Tanh)
        self.c3 = KANConv3d(1, 2, 2)
        self.lin = KANLinear(2 * 28 + 2 * 28 + 2 * 8, 4, bias=True)

    def forward(self, x):  # x: (N, 1, 28)
        a = self.c1(x).flatten(1)
        b = self.c2(x.view(-1, 1, 4, 7)).flatten(1)
        c = self.c3(x[..., :27].reshape(-1, 1, 3, 3, 3) * 0.5).flatten(1)
        return self.lin(torch.cat([a, b, c], dim=1))


def test_compile_inductor_every_layer_kind_and_a_zoo_model():
    torch.manual_seed(0)
    for model, x in [(_AllKinds(), torch.randn(5, 1, 28)), (create_model("kanc_mlp_small"), torch.randn(6, 1, 28, 28))]:
        want = _step(model, x)
        torch._dynamo.reset()
        start = time.perf_counter()
        got = _step(torch.compile(model, fullgraph=True), x)
        print(f"inductor {type(model).__name__}: {time.perf_counter() - start:.1f} s")
        _assert_close(got, want)
        _assert_close(_step(torch.compile(model, fullgraph=True), x), want)  # cached, second step


def _conv_pool_trunk():
    """Two conv/ReLU/max-pool blocks before a KANLinear, as in ``conv_kan_small``."""
    return nn.Sequential(nn.Conv2d(1, 5, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(5, 5, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), KANLinear(125, 10, grid_range=(0, 1)))


@pytest.mark.parametrize("options", [
    # Not strict: whether inductor's heuristics make the faulty reordering depends on what else the
    # process compiled before (seen both ways on this trunk); COMPILE_OPTIONS below must always pass.
    pytest.param({}, marks=pytest.mark.xfail(
        strict=False, reason="torch 2.13 inductor's peak-memory reordering may run the max-pool backward "
        "scatter after its reader: zero convolution gradients")),
    COMPILE_OPTIONS,
], ids=["inductor-defaults", "compile-options"])
def test_compile_inductor_conv_pool_trunk_gradients(options):
    torch.manual_seed(0)
    model = _conv_pool_trunk()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    want = _step(model, x)
    torch._dynamo.reset()
    got = _step(torch.compile(model, fullgraph=True, options=options), x)
    assert all(w.abs().max() > 0 for w in want[1:])  # every parameter has a gradient to compare
    _assert_close(got, want)  # output, then every parameter's gradient, to 1e-5 relative


# -- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("cnn")])
def test_autocast_bf16_trains_every_kan_zoo_model(name):
    model = create_model(name)
    x = torch.randn(4, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_on_every_device(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is tested in bfloat16")
    model = create_model("kanc_mlp_small").to(device)
    x = torch.randn(4, 1, 28, 28, device=device)
    want = model(x)
    with torch.autocast(device.type, dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert torch.allclose(out.float(), want, atol=0.1)
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters())


def test_autocast_layer_policy():
    layer = KANConv2d(3, 4, 3, bias=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out2 = layer(nn.Conv2d(3, 3, 1)(x).relu())  # a bf16 input from a conv before
        cl = layer(x.contiguous(memory_format=torch.channels_last))
        lin = KANLinear(3, 2)(torch.randn(5, 3, dtype=torch.bfloat16))
    assert out.dtype == out2.dtype == cl.dtype == lin.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), rtol=0.05, atol=0.05)
    assert layer.grid.dtype == F32
    f64 = KANConv2d(3, 4, 3, dtype=F64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f64(x.double()).dtype == F64  # float64 layers are left alone


def test_autocast_bf16_training_tracks_float32():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    losses = {}
    for mode in ("fp32", "bf16"):
        torch.manual_seed(1)
        model = create_model("kanc_mlp_small")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[mode] = []
        for _ in range(8):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                loss = F.nll_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[mode].append(loss.item())
    assert losses["fp32"][-1] < 0.9 * losses["fp32"][0]  # it learns (random labels: memorises)
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) <= 0.01 * a


# -- DDP ----------------------------------------------------------------------------------------


def _ddp_worker(rank, world, init_file, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(create_model("kanc_mlp_small"))
        x = torch.randn(3, 1, 28, 28)[: 3 if rank == 0 else 0]  # rank 1: the empty last batch
        out = model(x)
        out.sum().backward()
        results[rank] = [p.grad.clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def test_ddp_with_an_empty_batch_on_one_rank(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = create_model("kanc_mlp_small")
    model(torch.randn(3, 1, 28, 28)).sum().backward()
    for rank in (0, 1):  # gradients averaged over the ranks: half of the full batch's sum
        for got, p in zip(results[rank], model.parameters()):
            assert torch.allclose(got, p.grad / 2, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_have_the_strides_of_the_fake_kernels_with_size_one_dimensions(channels_last):
    layer = KANConv2d(1, 2, 3)
    x = torch.randn(1, 1, 3, 3)  # N = C = 1 and a 1x1 output: strides of size-1 dimensions are free
    xl = x.movedim(1, -1)
    weight = KF.combine_weights(layer.base_weight, layer.spline_weight, layer.spline_scaler).detach()
    args = (xl, layer.grid, weight, "bspline", 3, "silu", [1, 1], [1, 1], 1, channels_last)
    torch.library.opcheck(kan_forward, args)
    out = kan_forward(*args)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.stride() == torch.empty(out.shape, memory_format=fmt).stride()
    grad_x, _ = kan_backward(torch.ones_like(out), xl, layer.grid, weight, *args[3:-1], [True, True])
    assert grad_x.stride() == torch.empty_like(xl).stride()  # x's own strides (xl is dense)
