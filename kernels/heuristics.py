"""Launch choices of the kernels in one place: tiles, warps and pipeline stages, with why.

Where a choice was measured, the comment names the benchmark (``bench/gpu_suite.py`` parts, or
``bench/bench_kernels.py``) and docs/PERFORMANCE.md holds the numbers; where it was not, it says so.
Choices that depend on the card more than on the shape are timed at run time instead (the runtime's
GEMV pick, :func:`layerfold.kernels.gemv.pick_linear`), over the candidates listed here.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- decode GEMV (kernels/gemv.py) ------------------------------------------------------------------
GEMV_MAX_ROWS = 8  # above this, a tensor-core GEMM (cuBLAS) wins: the GEMV's fp32 FMAs scale with rows


@dataclass(frozen=True)
class GemvConfig:
    block_o: int  # output columns (weight rows) per program
    block_k: int  # weight columns per loop step (for one activation row; divided by rows when scale_k)
    warps: int
    stages: int = 3
    scale_k: bool = True  # keep BLOCK_N x BLOCK_O x BLOCK_K accumulators in registers as rows grow
    split_k: int = 1  # programs sharing one column block's K range (the last to finish adds their sums)

    @property
    def name(self) -> str:
        split = f"_sk{self.split_k}" if self.split_k > 1 else ""
        return f"triton_o{self.block_o}_k{self.block_k}_w{self.warps}_s{self.stages}{split}"


# Candidates the runtime times against cuBLAS per weight shape (pick_linear). Each loop step loads a
# BLOCK_O x BLOCK_K bf16 tile (8-16 KiB) in 16-byte loads, one tile in flight per program (compiled for
# sm_90 the loop's loads are plain loads, not pipelined: tools/compile_sm90.py loop); the accumulators stay
# at 32-64 fp32 values per thread. Not tuned on a GPU when written: the pick measures them on the card.
GEMV_CONFIGS = (
    GemvConfig(block_o=16, block_k=256, warps=4),
    GemvConfig(block_o=8, block_k=512, warps=4),
    GemvConfig(block_o=32, block_k=128, warps=4),
    GemvConfig(block_o=16, block_k=512, warps=8),
    GemvConfig(block_o=4, block_k=1024, warps=4, stages=4),
    # split-K, for weights with few output rows (the attention output and MLP down projections of a 7B
    # model: 4096 rows, 256 column blocks of 16 for 132 SMs, each streaming 128-352 KiB alone). A compile
    # for sm_90 (local Triton 3.9) shows the GEMV's loop loads as plain 16-byte loads, no asynchronous
    # copies, so a program keeps one tile (8 KiB) in flight; with 2 programs an SM that is too little to
    # cover HBM's latency. 4-8 programs per column block give every SM 8 or more. Not yet measured.
    GemvConfig(block_o=16, block_k=256, warps=4, split_k=4),
    GemvConfig(block_o=32, block_k=256, warps=4, split_k=8),
)
GEMV_SPLIT_COUNTERS = 1 << 16  # per device: one arrival counter per column block of a split-K GEMV


def gemv_interpreter_config(rows: int, split_k: int = 1) -> GemvConfig:
    """The interpreter runs programs one after another: few large programs, whole small matrices (a split-K
    config keeps its split, so the split's arithmetic is what the interpreter tests)."""
    return GemvConfig(block_o=32, block_k=64, warps=1, stages=1, scale_k=False, split_k=split_k)


# ---- decode attention (kernels/attn_decode.py) ------------------------------------------------------
def attn_decode_splits(rows: int, kv_heads: int, max_len: int, sms: int, block_s: int) -> int:
    """Key-range splits per (row, KV head) (flash-decoding): enough programs for about two waves over
    the SMs when rows x heads alone give fewer, each split at least one BLOCK_S tile of the cache.
    Fixed by the cache size (not the current length) so a CUDA graph replays the same grid."""
    programs = max(1, rows * kv_heads)
    want = -(-2 * sms // programs)
    tiles = -(-max_len // block_s)
    return max(1, min(want, tiles, 64))


# ---- calibration statistics (kernels/channels.py) ---------------------------------------------------------
@dataclass(frozen=True)
class ReduceConfig:
    block_n: int  # tokens per loop step
    block_c: int  # channels per program (16-byte loads along channels)
    programs_per_sm: int  # token splits chosen so that there are about this many programs per SM
    warps: int


# A bandwidth-bound reduction over tokens: each program's loop has one load in flight at a time, so the
# parallelism that hides the memory latency comes from many programs (token splits), not from long
# loops. bench/gpu_suite.py's kernels part times the variants in CHANNEL_VARIANTS on the card. GPU run 3
# (H200, 7B shapes, 16,384 tokens; docs/PERFORMANCE.md) chose 16 tokens x 128 channels at 32 programs per
# SM: channel_stats 62% and swiglu_channel_stats 78% of the bandwidth, against 36% / 52% for the former
# (32, 128, 16, 4) and at most 52% / 58% for the other variants. The sweep goes on past it (more programs,
# shorter steps) for the next run.
CHANNEL_STATS = ReduceConfig(block_n=16, block_c=128, programs_per_sm=32, warps=4)
CHANNEL_VARIANTS = (ReduceConfig(32, 128, 16, 4), CHANNEL_STATS, ReduceConfig(16, 128, 64, 4),
                    ReduceConfig(8, 128, 64, 4), ReduceConfig(16, 256, 32, 4), ReduceConfig(16, 64, 32, 2))


# ---- fused norm and rotary (kernels/rmsnorm.py, kernels/rope_cache.py) -----------------------------------
def row_warps(block: int) -> int:
    """Warps for one program per row of ``block`` values: 4 up to 2048 and 8 above (the layer-norm
    tutorial's rule of thumb, one warp per ~512 fp32 values); not tuned here."""
    return 4 if block <= 2048 else 8


__all__ = ["CHANNEL_STATS", "CHANNEL_VARIANTS", "GEMV_CONFIGS", "GEMV_MAX_ROWS", "GEMV_SPLIT_COUNTERS", "GemvConfig",
           "ReduceConfig", "attn_decode_splits", "gemv_interpreter_config", "row_warps"]
