"""The sparse operators against their dense PyTorch definitions."""

import json

import pytest
import torch
import torch.nn.functional as F

from fisedit_ray.kernels import chunks
from fisedit_ray.kernels.attention import active_query_attention
from fisedit_ray.kernels.conv import conv_matrix, dense_conv2d, sparse_conv2d
from fisedit_ray.kernels.gather import conv_input_positions, gather_plan
from fisedit_ray.kernels.group_norm import (
    cell_sums,
    gather_norm_act,
    group_stats,
    group_sums,
    norm_scale_shift,
)
from fisedit_ray.kernels.linear import PACKED_MIN_WEIGHT, GemmWeight, linear, packing_available
from fisedit_ray.macs import count_macs
from fisedit_ray.masks import blob_mask


def tokens(x):
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize("size", [(12, 12), (9, 14)])
def test_sparse_conv_equals_dense_conv(kernel, stride, padding, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 6, *size)
    dense = tokens(conv(x))
    out_size = conv(x).shape[-2:]
    mask = blob_mask(tuple(out_size), 0.3, seed=1)
    out_cells = mask.flatten().nonzero().flatten()
    in_mask = blob_mask(size, 0.4, seed=2)  # which input cells count as "active" does not matter
    rank = torch.full((size[0] * size[1],), -1)
    in_cells = in_mask.flatten().nonzero().flatten()
    rank[in_cells] = torch.arange(len(in_cells))
    positions = conv_input_positions(out_cells, out_size[1], size, kernel, stride, padding)
    index, halo_cells = gather_plan(positions, rank)
    xt = tokens(x)
    assert not in_mask.flatten()[halo_cells].any()
    args = (xt[:, in_cells], xt[:, halo_cells], index, GemmWeight.of(conv_matrix(conv.weight)), conv.bias)
    out = sparse_conv2d(*args)
    torch.testing.assert_close(out, dense[:, out_cells], rtol=1e-5, atol=1e-5)
    # patches gathered into a caller's buffer big enough for them: the same bits, in its memory
    workspace = torch.empty(10_000)
    memory = workspace.untyped_storage().data_ptr()
    assert torch.equal(sparse_conv2d(*args, workspace), out)
    assert workspace.untyped_storage().data_ptr() == memory
    assert workspace.numel() == 2 * index.numel() * 6  # it holds the patches: batch x taps x channels
    # the dense way: the whole map from the active rows and every other cell, the same outputs
    rest = (~in_mask.flatten()).nonzero().flatten()
    whole = dense_conv2d(xt[:, in_cells], in_cells, xt[:, rest], rest, size, conv, out_cells)
    torch.testing.assert_close(whole, dense[:, out_cells], rtol=1e-5, atol=1e-5)


def test_incremental_group_norm_equals_group_norm():
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(4, 16)
    gn.weight.data.normal_()
    gn.bias.data.normal_()
    old, new = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8) * 3 + 1
    mask = blob_mask((8, 8), 0.25, seed=3)
    mixed = torch.where(mask, new, old)
    cells = mask.flatten().nonzero().flatten()
    sums = (
        group_sums(tokens(old), 4)
        - group_sums(tokens(old)[:, cells], 4)
        + group_sums(tokens(new)[:, cells], 4)
    )
    mean, rstd = group_stats(sums, 64 * 4, gn.eps)
    scale, shift = norm_scale_shift(mean, rstd, gn.weight, gn.bias, 16, torch.float32)
    out = gather_norm_act(tokens(new), cells, scale, shift, silu=True)
    torch.testing.assert_close(out, tokens(F.silu(gn(mixed)))[:, cells], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell_sums_in_row_chunks_are_the_same_bits(monkeypatch, dtype):
    """Over more rows than `chunks.TEMPORARY_BYTES` allows at once, per-cell sums come in chunks:
    each cell's sums are its own, so the chunks change no bit."""
    torch.manual_seed(0)
    x = torch.randn(2, 37, 16) * 3 + 1
    whole = cell_sums(x, 4, dtype)
    monkeypatch.setattr(chunks, "TEMPORARY_BYTES", 2 * 16 * dtype.itemsize * 5)  # 5 rows at a time
    assert chunks.row_chunks(x, 1, 2 * 16 * dtype.itemsize)[0].shape[1] == 5
    chunked = cell_sums(x, 4, dtype)
    assert chunked.dtype == dtype and torch.equal(chunked, whole)
    g = x.reshape(2, 37, 4, 4).to(dtype)
    torch.testing.assert_close(whole, torch.cat([g.sum(3), (g * g).sum(3)], dim=2))


def test_active_query_attention_equals_full_attention_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 20, 16).unbind(0)
    full = (
        F.scaled_dot_product_attention(
            q.reshape(2, 20, 4, 4).transpose(1, 2),
            k.reshape(2, 20, 4, 4).transpose(1, 2),
            v.reshape(2, 20, 4, 4).transpose(1, 2),
        )
        .transpose(1, 2)
        .reshape(2, 20, 16)
    )
    rows = torch.tensor([0, 3, 7, 19])
    torch.testing.assert_close(active_query_attention(q[:, rows], k, v, heads=4), full[:, rows])
    # keys and values as `[B, L, heads, D]` views of head-major memory (`CacheReader.full(heads=)`)
    k_heads, v_heads = (x.reshape(2, 20, 4, 4).transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    torch.testing.assert_close(active_query_attention(q[:, rows], k_heads, v_heads, heads=4), full[:, rows])


def test_gather_plan_addresses_active_halo_and_padding():
    rank = torch.tensor([-1, 0, -1, 1])
    index, halo = gather_plan(torch.tensor([[1, 0, -1, 3, 2]]), rank)
    assert halo.tolist() == [0, 2]
    assert index.tolist() == [[0, 2, 4, 1, 3]]  # actives 0-1, halos 2-3, zero row 4


@pytest.mark.parametrize("rows", [1, 4, 7, 70])  # batch 2: 2 to 140 rows
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_with_a_packed_weight_equals_f_linear(rows, with_bias, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 1032, generator=g)[:, :, :1024].to(dtype)  # not contiguous, as sliced values
    weight = (torch.randn(1024, 1024, generator=g) / 32).to(dtype)
    bias = torch.randn(1024, generator=g).to(dtype) if with_bias else None
    prepared = GemmWeight.of(weight)
    assert weight.numel() >= PACKED_MIN_WEIGHT[dtype]
    if packing_available(dtype):
        assert prepared.packed is not None and prepared.weight is None
    else:  # this CPU cannot pack it (bfloat16 without AVX-512): the plain weight, the same results
        assert prepared.packed is None and prepared.weight.data_ptr() == weight.data_ptr()
    out = linear(x, prepared, bias)
    assert out.shape == (2, rows, 1024) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=tol, atol=tol)
    _, macs = count_macs(lambda: linear(x, prepared, bias))  # the counter sees the packed GEMM
    assert macs == 2 * rows * 1024 * 1024


def test_small_weights_stay_plain():
    weight = torch.randn(64, 64)
    prepared = GemmWeight.of(weight)
    assert prepared.packed is None and prepared.weight.data_ptr() == weight.data_ptr()
    x = torch.randn(3, 64)
    assert torch.equal(linear(x, prepared), torch.nn.functional.linear(x, weight))


def test_conv_costs_choose_by_the_nearest_measured_shape_and_interpolate():
    from fisedit_ray.kernels.conv_cost import ConvCosts

    costs = ConvCosts(
        (  # 64x64x320: dense wins from 80% (interpolated); 8x8x1280: never
            (4096, 320, 0.5, 3.0, 2.0),
            (4096, 320, 1.0, 3.0, 4.0),
            (64, 1280, 0.5, 3.0, 1.0),
            (64, 1280, 1.0, 3.0, 2.0),
        )
    )
    assert not costs.runs_dense(4096, 320, 320, 0.75)  # sparse 3.0 = dense 3.0: not faster
    assert costs.runs_dense(4096, 320, 320, 0.8)
    assert costs.runs_dense(4096, 320, 640, 1.0)  # channels within reach: the nearest shape's ratio
    assert not costs.runs_dense(4096, 320, 320, 0.1)  # below the measured range: its lowest point
    assert not costs.runs_dense(64, 1280, 1280, 1.0)
    assert not costs.runs_dense(4096, 32, 32, 1.0)  # far from every measured shape: pixel-wise
    assert not costs.runs_dense(256, 320, 320, 1.0)
    assert not ConvCosts.PIXEL_WISE.runs_dense(4096, 320, 320, 1.0)


def test_the_shipped_conv_cost_table_is_read():
    from fisedit_ray.kernels.conv_cost import TABLE, ConvCosts

    tables = json.loads(TABLE.read_text())["tables"]
    for table in tables:
        costs = ConvCosts.shipped(table["device"], getattr(torch, table["dtype"]))
        assert len(costs.rows) == len(table["rows"]) > 0
    assert ConvCosts.shipped("no-such-device", torch.float32) is ConvCosts.PIXEL_WISE
