"""The Triton kernels equal the PyTorch operators (on a GPU, or in Triton's CPU interpreter)."""

import pytest
import torch

from fisedit_ray.kernels.attention import active_query_attention
from fisedit_ray.kernels.conv import conv_matrix, sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.group_norm import gather_norm_act, norm_scale_shift
from fisedit_ray.kernels.linear import GemmWeight
from fisedit_ray.masks import blob_mask

pytest.importorskip("triton")
from fisedit_ray.kernels.triton_attention import active_query_attention_triton  # noqa: E402
from fisedit_ray.kernels.triton_conv import sparse_conv2d_triton  # noqa: E402
from fisedit_ray.kernels.triton_norm import gather_norm_act_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin, cout, kernel, stride", [(6, 5, 3, 1), (40, 70, 3, 2), (36, 20, 1, 1)])
def test_sparse_conv(cin, cout, kernel, stride):
    torch.manual_seed(0)
    size = (10, 9)
    conv = torch.nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)
    out_size = tuple(conv(torch.zeros(1, cin, *size)).shape[-2:])
    out_cells = blob_mask(out_size, 0.4, seed=1).flatten().nonzero().flatten()
    in_cells = blob_mask(size, 0.3, seed=2).flatten().nonzero().flatten()
    rank = torch.full((size[0] * size[1],), -1)
    rank[in_cells] = torch.arange(len(in_cells))
    positions = conv_input_positions(out_cells, out_size[1], size, kernel, stride, kernel // 2)
    index, halo_cells = gather_plan(positions, rank)
    x = torch.randn(2, size[0] * size[1], cin)
    args = (x[:, in_cells], x[:, halo_cells], index, conv_matrix(conv.weight.detach()), conv.bias.detach())
    expected = sparse_conv2d(*args[:3], GemmWeight.of(args[3]), args[4])  # PyTorch's, tested vs F.conv2d
    got = sparse_conv2d_triton(*(a.to(DEVICE) for a in args))
    torch.testing.assert_close(got.cpu(), expected, **TOL)


@pytest.mark.parametrize("rows", [None, torch.tensor([5, 0, 17, 3, 3])])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_gather_norm_act(rows, int8, silu):
    torch.manual_seed(0)
    x = torch.randn(2, 20, 48) * 3
    x_scale = None
    if int8:
        x_scale = (x.abs().amax(-1, keepdim=True) / 127).half()
        x = (x / x_scale.float()).round().to(torch.int8)
    mean, rstd = torch.randn(2, 8, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64) + 0.5
    scale, shift = norm_scale_shift(mean, rstd, torch.randn(48), torch.randn(48), 48, torch.float32)
    expected = gather_norm_act(x, rows, scale, shift, silu, x_scale, torch.float32)
    on = [None if t is None else t.to(DEVICE) for t in (x, rows, scale, shift, x_scale)]
    got = gather_norm_act_triton(on[0], on[1], on[2], on[3], silu, on[4], torch.float32)
    torch.testing.assert_close(got.cpu(), expected, **TOL)


@pytest.mark.parametrize("heads, head_dim, queries, keys", [(3, 40, 5, 70), (2, 16, 33, 32)])
def test_active_query_attention(heads, head_dim, queries, keys):
    torch.manual_seed(0)
    c = heads * head_dim
    q, k, v = torch.randn(2, queries, c), torch.randn(2, keys, c), torch.randn(2, keys, c)
    expected = active_query_attention(q, k, v, heads)
    got = active_query_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), heads)
    torch.testing.assert_close(got.cpu(), expected, **TOL)


def test_the_flop_counter_sees_the_triton_kernels():
    """On a GPU the engine's MAC stats come from torch's counter: the kernels are torch operators
    with FLOP formulas equal to what the PyTorch path counts."""
    from fisedit_ray.macs import count_macs

    torch.manual_seed(0)
    rows, index = torch.randn(2, 30, 40), torch.randint(0, 31, (25, 9))
    matrix, bias = torch.randn(70, 9 * 40), torch.randn(70)
    args = (rows[:, :20], rows[:, 20:], index, matrix, bias)
    _, torch_macs = count_macs(lambda: sparse_conv2d(*args[:3], GemmWeight.of(matrix), bias))
    _, triton_macs = count_macs(lambda: sparse_conv2d_triton(*(a.to(DEVICE) for a in args)))
    assert triton_macs == torch_macs > 0
    q, k, v = torch.randn(2, 5, 120), torch.randn(2, 70, 120), torch.randn(2, 70, 120)
    _, torch_macs = count_macs(lambda: active_query_attention(q, k, v, 3))
    _, triton_macs = count_macs(
        lambda: active_query_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), 3)
    )
    assert triton_macs == torch_macs > 0
