"""The registry contract an op relies on: an expansion op built from ``(name, state, option)`` alone,
with a fake kernel from ``num_basis`` and autograd from ``derivative``, passes ``opcheck`` and
``torch.compile`` for every family."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kanvolution.bases import basis_functions, create_basis, list_bases


@torch.library.custom_op("kanvolution_bases_test::expand", mutates_args=())
def expand_op(x: Tensor, name: str, state: Tensor, option: int) -> Tensor:
    return basis_functions(name).expand(x, state, option).contiguous()


@expand_op.register_fake
def _(x, name, state, option):
    return x.new_empty(x.shape + (basis_functions(name).num_basis(state, option),))


def _setup(ctx, inputs, output):
    x, name, state, option = inputs
    ctx.save_for_backward(x, state)
    ctx.name, ctx.option = name, option


def _backward(ctx, grad):
    x, state = ctx.saved_tensors
    return (grad * basis_functions(ctx.name).derivative(x, state, ctx.option)).sum(-1), None, None, None


expand_op.register_autograd(_backward, setup_context=_setup)


def _basis(name: str):
    return create_basis(name, 3, grid_size=4, spline_order=2, degree=3, dtype=torch.float64)


@pytest.mark.parametrize("name", list_bases())
def test_opcheck(name):
    name_, state, option = _basis(name).op_args()
    x = (torch.rand(5, 3, dtype=torch.float64) * 3 - 1.5).requires_grad_(True)
    torch.library.opcheck(expand_op, (x, name_, state, option))


@pytest.mark.parametrize("name", list_bases())
def test_op_matches_module_and_compiles(name):
    torch._dynamo.reset()  # one code object compiled per family: keep under the recompile limit
    basis = _basis(name)
    x = (torch.rand(7, 3, dtype=torch.float64) * 3 - 1.5).requires_grad_(True)
    eager = expand_op(x, *basis.op_args())
    torch.testing.assert_close(eager, basis(x), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda v: expand_op(v, *basis.op_args()), (x,))
    compiled = torch.compile(lambda v: expand_op(v, *basis.op_args()).square().sum(), backend="aot_eager", fullgraph=True)
    got = compiled(x)
    (g_compiled,) = torch.autograd.grad(got, x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(got, eager.square().sum(), rtol=0, atol=1e-12)
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=1e-12)
