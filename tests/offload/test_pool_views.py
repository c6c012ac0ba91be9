"""BlockPool over vLLM 0.33's per-layer strided views of one buffer, built with numpy strides."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from kvsched import BlockPool
from kvsched.errors import InvalidArgumentError

L, B, H, N, C = 3, 5, 2, 4, 8  # layers, blocks, heads, tokens per block, content (K and V)
PAGE = H * N * C


def views(order: str):
    """Per-layer (B, H, N, C) views of one uint8 buffer, as vLLM's layouts place them."""
    buf = np.arange(L * B * PAGE, dtype=np.uint32).astype(np.uint8)
    inner = {"HN": (N * C, C), "NH": (C, H * C)}[order[2:]]
    if order.startswith("LB"):  # layer-compact
        layer_stride, block_stride = B * PAGE, PAGE
    else:  # block-outermost
        layer_stride, block_stride = PAGE, L * PAGE
    out = [as_strided(buf[l * layer_stride:], shape=(B, H, N, C), strides=(block_stride, *inner, 1))
           for l in range(L)]
    return buf, out, layer_stride, block_stride


@pytest.mark.parametrize("order", ["LBHN", "LBNH", "BLHN", "BLNH"])
def test_strided_views_are_one_dense_piece_per_block(order):
    buf, vs, layer_stride, block_stride = views(order)
    pool = BlockPool.from_layers(vs, block_dim=0)
    assert pool.num_pieces == 1 and pool.piece_bytes == PAGE and pool.block_stride == block_stride
    assert pool.layer_ptrs[1] - pool.layer_ptrs[0] == layer_stride
    # block b of layer l is the byte range the view's elements span
    for l in (0, L - 1):
        for b in (0, B - 1):
            lo = pool.layer_ptrs[l] + b * pool.block_stride - buf.ctypes.data
            assert sorted(vs[l][b].ravel().tolist()) == sorted(buf[lo:lo + PAGE].tolist())


def test_gaps_are_still_rejected():
    buf = np.zeros(B * PAGE * 2, dtype=np.uint8)
    v = as_strided(buf, shape=(B, H, N, C), strides=(2 * PAGE, 2 * N * C, C, 1))
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        BlockPool.from_layers([v], block_dim=0)
