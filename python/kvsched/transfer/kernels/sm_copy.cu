// kvsched's SM copy kernel: scattered block copies done by a few CTAs instead of the copy engine.
//
// Why: the copy engine spends about 1 us per copy, so 4-16 KiB blocks reach 4-7 GB/s with one
// batched DMA call where one contiguous copy reaches ~50 GB/s (vLLM PR #42212 on an H100, see
// docs/gpu_copies.md). A kernel moves many small blocks at once over the same PCIe link, reading
// or writing pinned host memory through its device mapping (UVA: the host address is the device
// address).
//
// Work split: one warp per copy. Warp w of W takes copies w, w + W, w + 2W, ...; each lane loads
// the descriptor of one of the warp's next 32 copies (one round trip to the descriptor table per
// 32 copies, however far away the table is: it may be pinned host memory), then the warp walks
// them, fetching each copy's (dst, src, bytes) from its lanes with shuffles. Within a copy, each
// lane moves UNROLL 16-byte words per round, all loads issued before the stores, so a warp has
// 32 * UNROLL * 16 = 4 KiB in flight: PCIe reads take ~1-2 us, and bandwidth needs bytes in
// flight, not threads. A 16-byte word needs src and dst 16-byte aligned; otherwise 8-byte words
// when both are 8-byte aligned, else single bytes (correct, slow; KV blocks are aligned).
//
// The grid is capped by the caller (a few CTAs) so the copies leave the compute kernels their SMs.
//
// Regenerate the shipped PTX after editing: python python/kvsched/transfer/kernels/gen_ptx.py

#include <stdint.h>

#define KVSCHED_UNROLL 4
#define KVSCHED_FULL_MASK 0xffffffffu

template <typename Word>
__device__ __forceinline__ void copy_words(char* dst, const char* src, uint64_t words, unsigned lane) {
    Word* d = reinterpret_cast<Word*>(dst);
    const Word* s = reinterpret_cast<const Word*>(src);
    const uint64_t step = 32u * KVSCHED_UNROLL;
    uint64_t i = lane;
    for (; i + (KVSCHED_UNROLL - 1) * 32u < words; i += step) {
        Word v[KVSCHED_UNROLL];
#pragma unroll
        for (int u = 0; u < KVSCHED_UNROLL; ++u) v[u] = s[i + u * 32u];
#pragma unroll
        for (int u = 0; u < KVSCHED_UNROLL; ++u) d[i + u * 32u] = v[u];
    }
    for (; i < words; i += 32u) d[i] = s[i];
}

__device__ __forceinline__ void copy_one(char* dst, const char* src, uint64_t n, unsigned lane) {
    const uint64_t both = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src);
    uint64_t head = 0;
    if ((both & 15u) == 0) {
        head = n & ~uint64_t(15);
        copy_words<uint4>(dst, src, head >> 4, lane);
    } else if ((both & 7u) == 0) {
        head = n & ~uint64_t(7);
        copy_words<uint2>(dst, src, head >> 3, lane);
    }
    for (uint64_t i = head + lane; i < n; i += 32u) dst[i] = src[i];
}

// table: 3 * count 64-bit words, [dst_0 .. dst_{count-1}, src_0 .., bytes_0 ..] (the same three
// arrays the batched DMA path hands to cuMemcpyBatchAsync, back to back).
extern "C" __global__ void kvsched_sm_copy(const uint64_t* __restrict__ table, uint64_t count) {
    const unsigned lane = threadIdx.x & 31u;
    const uint64_t warp = (uint64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    const uint64_t warps = (uint64_t(gridDim.x) * blockDim.x) >> 5;
    for (uint64_t first = warp; first < count; first += 32u * warps) {
        // Lane l holds the descriptor of copy first + l * warps.
        const uint64_t mine = first + lane * warps;
        uint64_t d = 0, s = 0, n = 0;
        if (mine < count) {
            d = table[mine];
            s = table[count + mine];
            n = table[2 * count + mine];
        }
        for (unsigned k = 0; k < 32u; ++k) {
            if (first + k * warps >= count) break;  // the same for every lane: no divergence
            const uint64_t dk = __shfl_sync(KVSCHED_FULL_MASK, d, k);
            const uint64_t sk = __shfl_sync(KVSCHED_FULL_MASK, s, k);
            const uint64_t nk = __shfl_sync(KVSCHED_FULL_MASK, n, k);
            copy_one(reinterpret_cast<char*>(dk), reinterpret_cast<const char*>(sk), nk, lane);
        }
    }
}
