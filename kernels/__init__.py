"""Streaming calibration-statistics kernels (Triton) with their torch references.

Each launcher runs its Triton kernel on CUDA tensors or under ``TRITON_INTERPRET=1`` and its
``*_ref`` otherwise (:func:`use_triton`). Statistics accumulate in fp32; token reductions honour
an optional padding mask. This package never imports ``engine``.
"""

from __future__ import annotations

from ._dispatch import use_triton
from .channels import (
    channel_stats,
    channel_stats_ref,
    swiglu_channel_stats,
    swiglu_channel_stats_ref,
)
from .cka import (
    cka_from_hsic,
    hsic_accumulate,
    hsic_accumulate_ref,
    hsic_row_accumulate,
    hsic_row_accumulate_ref,
    hsic_rows,
    ucentered_gram,
    ucentered_gram_ref,
    ucentered_grams,
)
from .cosine import COS_EPS, cosine_pairs_ref, cosine_window_sum, cosine_window_sum_ref, unit_rows, unit_rows_ref
from .gram import gram_accumulate, gram_accumulate_ref

__all__ = [
    "COS_EPS",
    "channel_stats",
    "channel_stats_ref",
    "cka_from_hsic",
    "cosine_pairs_ref",
    "cosine_window_sum",
    "cosine_window_sum_ref",
    "gram_accumulate",
    "gram_accumulate_ref",
    "hsic_accumulate",
    "hsic_accumulate_ref",
    "hsic_row_accumulate",
    "hsic_row_accumulate_ref",
    "hsic_rows",
    "swiglu_channel_stats",
    "swiglu_channel_stats_ref",
    "ucentered_gram",
    "ucentered_gram_ref",
    "ucentered_grams",
    "unit_rows",
    "unit_rows_ref",
    "use_triton",
]
