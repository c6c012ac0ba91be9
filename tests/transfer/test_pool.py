"""BlockPool: geometry from numpy arrays, per-layer arrays (both vLLM layouts), raw pointers,
the CUDA array interface and DLPack; validation of everything that could make blocks overlap."""

from __future__ import annotations

import gc
import types
import weakref

import numpy as np
import pytest

from kvsched.errors import InvalidArgumentError, KvschedError
from kvsched.pool import BlockPool

pytestmark = pytest.mark.timeout(60)


def test_from_array_layers_blocks_contiguous():
    arr = np.zeros((4, 32, 16, 8, 2), dtype=np.float16)  # (layers, blocks, tokens, heads*dim...)
    pool = BlockPool.from_array(arr)
    assert pool.device == "cpu"
    assert (pool.num_layers, pool.num_blocks, pool.num_pieces) == (4, 32, 1)
    assert pool.block_bytes == 16 * 8 * 2 * 2
    assert pool.block_stride == pool.block_bytes and pool.is_dense
    assert pool.dtype == "float16"
    assert pool.layer_ptrs == tuple(arr[i].ctypes.data for i in range(4))
    assert any(o is arr for o in pool.owners)


def test_from_array_with_kv_dimension_before_blocks():
    arr = np.zeros((3, 2, 10, 64), dtype=np.uint8)  # (layers, K/V, blocks, bytes)
    pool = BlockPool.from_array(arr, block_dim=2)
    assert (pool.num_blocks, pool.num_pieces, pool.piece_bytes) == (10, 2, 64)
    assert pool.piece_offsets == (0, 10 * 64)
    assert pool.block_bytes == 128


def test_from_layers_vllm_flash_attention_layout():
    # vLLM FlashAttention: per layer (2, num_blocks, block_size, heads, head_dim); K and V apart.
    layers = [np.zeros((2, 20, 16, 4, 8), dtype=np.float16) for _ in range(5)]
    pool = BlockPool.from_layers(layers, block_dim=1)
    piece = 16 * 4 * 8 * 2
    assert (pool.num_layers, pool.num_blocks, pool.num_pieces) == (5, 20, 2)
    assert pool.piece_bytes == piece and pool.block_bytes == 2 * piece
    assert pool.piece_offsets == (0, 20 * piece)
    assert pool.block_stride == piece and pool.is_dense
    assert pool.layer_ptrs == tuple(t.ctypes.data for t in layers)


def test_from_layers_vllm_flashinfer_layout_and_names():
    # vLLM FlashInfer: per layer (num_blocks, 2, block_size, heads, head_dim): K and V together.
    layers = {f"model.layers.{i}.attn": np.zeros((12, 2, 16, 2, 4), dtype=np.float32) for i in range(3)}
    pool = BlockPool.from_layers(layers)
    assert (pool.num_blocks, pool.num_pieces) == (12, 1)
    assert pool.block_bytes == 2 * 16 * 2 * 4 * 4
    assert pool.layer_names == tuple(layers)


def test_from_layers_rejects_mismatched_layers():
    with pytest.raises(InvalidArgumentError, match="layer 1 differs"):
        BlockPool.from_layers([np.zeros((4, 8)), np.zeros((5, 8))])
    with pytest.raises(InvalidArgumentError, match="layer 1 differs"):
        BlockPool.from_layers([np.zeros((4, 8), np.float16), np.zeros((4, 8), np.float32)])
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_layers([])


def test_non_contiguous_block_contents_rejected():
    base = np.zeros((2, 8, 16), dtype=np.uint8)
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        BlockPool.from_array(base[:, :, ::2])
    # a sliced block range is fine: the block stride is just larger than a block
    pool = BlockPool.from_array(np.zeros((2, 8, 32), dtype=np.uint8)[:, :, :16])
    assert pool.block_bytes == 16 and pool.block_stride == 32 and not pool.is_dense


def test_block_dim_checks():
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_array(np.zeros((2, 3, 4)), block_dim=0)
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_layers([np.zeros((2, 3))], block_dim=2)
    with pytest.raises(TypeError):
        BlockPool.from_layers([np.zeros((2, 3))], block_dim=1.0)
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_array(np.zeros(8))


def test_from_pointers_documents_the_layout():
    mem = np.zeros(2 * 2 * 10 * 64, dtype=np.uint8)  # 2 layers of (2, 10 blocks, 64 bytes)
    base = mem.ctypes.data
    pool = BlockPool.from_pointers(
        [base, base + 2 * 10 * 64],
        num_blocks=10,
        block_bytes=128,
        block_stride=64,
        piece_offsets=(0, 10 * 64),
        device="cpu",
        dtype="uint8",
        owner=mem,
    )
    assert (pool.num_layers, pool.num_pieces, pool.piece_bytes) == (2, 2, 64)
    assert pool.owners == (mem,)
    assert pool.extents() == [(base, mem.nbytes)]  # adjacent layers merge into one range


def test_from_pointers_validation():
    with pytest.raises(InvalidArgumentError, match="overlap"):
        BlockPool.from_pointers([4096], num_blocks=4, block_bytes=128, block_stride=64)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        # piece 1 of block 0 (offset 100) overlaps piece 0 of block 2 (offset 128)
        BlockPool.from_pointers([4096], 4, 128, block_stride=64, piece_offsets=(0, 100))
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_pointers([4096], 4, 100, piece_offsets=(0, 64, 128))  # 100 not divisible by 3
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_pointers([0], 4, 64)  # null pointer
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_pointers([4096], 4, 64, device="gpu")
    with pytest.raises(TypeError):
        BlockPool.from_pointers([4096.0], 4, 64)
    with pytest.raises(InvalidArgumentError):
        BlockPool.from_pointers([4096], -1, 64)
    # interleaved pieces that never collide are fine: K at 0, V at 64, stride 128
    pool = BlockPool.from_pointers([4096], 8, 128, block_stride=128, piece_offsets=(0, 64))
    assert not pool.is_dense
    assert BlockPool.from_pointers([4096], 8, 64, device="cuda").device == "cuda:0"


def test_errors_are_kvsched_and_value_errors():
    with pytest.raises(ValueError):
        BlockPool.from_pointers([4096], 4, 128, block_stride=64)
    with pytest.raises(KvschedError):
        BlockPool.from_pointers([4096], 4, 128, block_stride=64)


def test_pool_keeps_source_memory_alive():
    class Owner:
        pass

    owner = Owner()
    ref = weakref.ref(owner)
    pool = BlockPool.from_pointers([4096], 1, 64, owner=owner)
    del owner
    gc.collect()
    assert ref() is not None
    del pool
    gc.collect()
    assert ref() is None


def test_array_interface_object_and_readonly():
    arr = np.arange(4 * 6 * 8, dtype=np.uint8).reshape(4, 6, 8)

    class Wrapped:
        __array_interface__ = arr.__array_interface__

    pool = BlockPool.from_array(Wrapped())
    assert pool.layer_ptrs[0] == arr.ctypes.data and pool.block_bytes == 8
    ro = arr.copy()
    ro.flags.writeable = False
    assert BlockPool.from_array(ro).readonly


class _DLPackOnly:
    """Exposes an array through DLPack alone (like a torch CPU tensor)."""

    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, *args, **kwargs):
        return self._arr.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_dlpack_host_array():
    arr = np.arange(3 * 5 * 4, dtype=np.float32).reshape(3, 5, 4)
    pool = BlockPool.from_array(_DLPackOnly(arr))
    assert pool.device == "cpu"
    assert pool.dtype == "float32"
    assert (pool.num_layers, pool.num_blocks, pool.block_bytes) == (3, 5, 16)
    assert pool.layer_ptrs == tuple(arr[i].ctypes.data for i in range(3))
    strided = np.zeros((2, 10, 4), dtype=np.float32)[:, ::2]
    pool = BlockPool.from_array(_DLPackOnly(strided))
    assert pool.num_blocks == 5 and pool.block_stride == 32


def test_cuda_array_interface_object():
    # a fake device array: only the interface is read, the memory is never touched
    shape = (2, 16, 2, 8)
    fake = types.SimpleNamespace(
        __cuda_array_interface__={
            "data": (0x7F0000000000, False),
            "shape": shape,
            "typestr": "<f2",
            "strides": None,
            "version": 3,
        },
        device=types.SimpleNamespace(id=1),
    )

    class Dev:
        __cuda_array_interface__ = fake.__cuda_array_interface__
        device = fake.device

    pool = BlockPool.from_layers([Dev(), Dev()], block_dim=1)
    assert pool.device == "cuda:1" and pool.is_cuda and pool.device_index == 1
    assert (pool.num_blocks, pool.num_pieces, pool.piece_bytes) == (16, 2, 2 * 8 * 2)
    assert pool.dtype == "float16"


def test_not_an_array():
    with pytest.raises(TypeError):
        BlockPool.from_array(object())
    with pytest.raises(TypeError):
        BlockPool.from_array(np.array([[None]]))


def test_torch_tensors_when_available():
    torch = pytest.importorskip("torch")
    t = torch.zeros((2, 6, 4, 4), dtype=torch.bfloat16)
    pool = BlockPool.from_array(t)
    assert pool.dtype == "bfloat16" and pool.device == "cpu" and pool.block_bytes == 32
    pool = BlockPool.from_layers([torch.zeros((2, 6, 4), dtype=torch.float16) for _ in range(2)], block_dim=1)
    assert pool.num_pieces == 2 and pool.piece_bytes == 8
