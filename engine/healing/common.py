"""What both healing stages share: configuration, data, the report, the losses, and the teacher's side.

The teacher is a :class:`~layerfold.core.streaming.LayerStream`: one block at a time from its (mmap'd)
state dict for the layer stage, the whole model once ``stream.model()`` is built for the global stage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from layerfold.core.model import Model
from layerfold.core.streaming import LayerStream

STAGES = ("layer", "global")
STATE_DIR = "heal_state"
GLOBAL_PARAMS = ("auto", "all", "lora", "changed")
TEACHER = ("auto", "device", "host")  # HealConfig.teacher: where the global stage holds the teacher


@dataclass
class HealConfig:
    seq_len: int = 256
    micro_batch: int = 4
    accum: int = 1  # micro-batches per optimizer step
    layer_frac: float = 0.2  # share of the budget for the layer stage (when both stages run)
    lr_layer: float = 5e-4
    lr_global: float = 3e-4  # SmolLM2 shortgpt-8, 16k tokens: 3e-4 beat 1e-4 (ppl 28.3 vs 32.1, train_all)
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 5
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    hidden_weight: float = 0.0  # global stage: weight of the hidden-state term at the correspondences
    layer_input: str = "student"  # "student" | "teacher": input of a layer in the layer stage
    eval_every: int = 30  # global steps between validation perplexities
    val_tokens: int = 4096  # short, so evaluating every eval_every steps stays a small share of the budget
    # (the setting of the healing runs in docs/RESULTS.md: tools/compare_heal.py --val-tokens 4096)
    save_every_s: float = 120.0  # heal_state is written at least this often (and at every stop)
    # what budget_minutes measures: "cpu" (process CPU time / threads: the same work on a busy or an idle
    # machine; the measured healing runs, docs/RESULTS.md) on a CPU, "wall" on a GPU (the CPU is not what
    # the run spends there); "auto" picks by the student's device
    clock: str = "auto"
    seed: int = 0
    # bf16 autocast of the training forward/backward: pays where bf16 matmuls are native (AVX512-BF16/AMX
    # CPUs, GPUs); the measured healing runs used it. None: on where it pays (auto_autocast)
    autocast: bool | None = None
    # what the global stage trains besides the changed layers: "all" (every parameter: the best measured
    # configuration, docs/RESULTS.md), "lora" (low-rank adapters on the unchanged layers' linears, merged
    # into the weights at the end: for models whose AdamW state would not fit), "changed" (nothing else);
    # "auto": "all" when the AdamW state fits the memory at hand, else "lora"
    global_params: str = "auto"
    lora_rank: int = 8  # the SLM paper and SliceGPT heal with rank 8, alpha 16
    lora_alpha: float = 16.0
    stop_after_steps: int | None = None  # pause (state saved) after this many optimizer steps in this call
    # where the global stage holds the teacher: "device" (built whole there), "host" (host memory, one pass
    # over its layers per chunk of upcoming micro-batches: healing.teacher), "auto" (host where it does not
    # fit beside the student: healing.teacher.teacher_place). The results are the same either way.
    teacher: str = "auto"

    def check(self) -> HealConfig:
        if self.layer_input not in ("student", "teacher"):
            raise ValueError(f"layer_input={self.layer_input!r}. Fix: use 'student' or 'teacher'")
        if self.clock not in ("auto", "wall", "cpu"):
            raise ValueError(f"clock={self.clock!r}. Fix: use 'auto', 'wall' or 'cpu'")
        if self.teacher not in TEACHER:
            raise ValueError(f"teacher={self.teacher!r}. Fix: use one of {', '.join(TEACHER)}")
        if self.global_params not in GLOBAL_PARAMS:
            raise ValueError(f"global_params={self.global_params!r}. Fix: use one of {', '.join(GLOBAL_PARAMS)}")
        if min(self.seq_len, self.micro_batch, self.accum, self.eval_every) < 1 or not 0 <= self.layer_frac <= 1:
            raise ValueError("seq_len, micro_batch, accum, eval_every must be >= 1 and layer_frac in [0, 1]. "
                             "Fix: correct the heal configuration")
        for name, lo, strict in (("lr_layer", 0.0, True), ("lr_global", 0.0, True), ("min_lr_frac", 0.0, False),
                                 ("weight_decay", 0.0, False), ("grad_clip", 0.0, True), ("hidden_weight", 0.0, False),
                                 ("lora_alpha", 0.0, True), ("save_every_s", 0.0, True), ("val_tokens", 1, False),
                                 ("warmup_steps", 0, False), ("lora_rank", 1, False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (strict and v == lo) or (name == "min_lr_frac" and v > 1):
                need = "in [0, 1]" if name == "min_lr_frac" else f"{'>' if strict else '>='} {lo}"
                raise ValueError(f"heal: {name}={v!r} must be a finite number {need}. Fix: correct {name} "
                                 f"(--{name.replace('_', '-')} on the command line)")
        return self


@dataclass
class HealData:
    train: Tensor  # (N,) token ids of the training text (calibration split)
    val: Tensor  # (M,) token ids of held-out text


@dataclass
class HealReport:
    status: str  # "done" | "interrupted" | "paused"
    stages: list[str]
    trained_layers: list[int]  # student layers trained by the layer stage / global stage (all with train_all)
    train_all: bool
    layer_stage: list[dict[str, Any]]  # per trained layer: correspondence, losses, tokens, time
    curve: list[tuple[int, float]]  # (training tokens so far, val perplexity)
    start_val_ppl: float
    best_val_ppl: float
    best_tokens: int
    tokens: int
    stage_tokens: dict[str, int]  # {"layer": ..., "global": ...}: a layer-stage token runs a few layers only
    steps: int
    wall_minutes: float
    cpu_minutes: float  # process CPU time, all threads
    threads: int
    budget: dict[str, Any]
    memory: dict[str, Any]
    config: dict[str, Any]
    resumed: bool = False
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per finished stage (with its
    # evaluations): stage_tokens / stage_seconds is the stage's training rate
    global_params: str = "changed"  # what the global stage trained besides the changed layers (as resolved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- choices made from the machine ---------------------------------------------------------------------
def auto_clock(device: torch.device) -> str:
    return "wall" if device.type == "cuda" else "cpu"


def auto_autocast(device: torch.device) -> bool:
    """bf16 autocast where bf16 matrix products are native: CUDA, and CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return True
    from layerfold.inference.native import _cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def auto_global_params(student: Any, teacher_params: int, device: torch.device, masters: bool = False) -> str:
    """"all" when training every parameter (weights, gradients and two AdamW moments, plus the whole teacher
    the global stage holds, plus the copy of the best state) fits 70% of the memory at hand (device memory on
    CUDA, available host memory otherwise), else "lora". ``masters``: trained weights narrower than fp32 get
    fp32 master copies (upcast_masters), so their weight, gradient and moments cost 16 bytes."""
    esize = next(student.parameters()).element_size()
    need = student.num_params() * ((16 if masters else 4 * esize) + esize) + teacher_params * esize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have = free + torch.cuda.memory_allocated(device)
    else:
        from layerfold.calibration.buffers import host_available

        have = host_available()
    return "all" if need <= 0.7 * have else "lora"


def upcast_masters(params: dict[str, Tensor], names: Sequence[str]) -> dict[str, torch.dtype]:
    """Hold the trained parameters that are narrower than fp32 (a bf16 checkpoint, as on a GPU) in fp32 while
    healing: autocast still runs the products in bf16, but AdamW's updates accumulate in fp32 (in bf16 an
    update smaller than 1/256 of its weight rounds away: at healing's learning rates most of them).
    Returns the original dtypes for :func:`restore_dtypes`."""
    orig = {}
    for n in names:
        p = params[n]
        if p.is_floating_point() and p.element_size() < 4:
            orig[n] = p.dtype
            p.data = p.data.float()
    return orig


def restore_dtypes(params: dict[str, Tensor], orig: dict[str, torch.dtype]) -> None:
    for n, dt in orig.items():
        params[n].data = params[n].data.to(dt)


# ---- small pieces ---------------------------------------------------------------------------------
def relative_mse(y: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of ||y - y*||^2 / ||y*||^2 (fp32): every token weighs the same, whatever its scale."""
    y, target = y.float(), target.float()
    return ((y - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)).mean()


def kl_teacher_student(s_logits: Tensor, t_logits: Tensor) -> Tensor:
    """Mean over tokens of KL(p_teacher || p_student), fp32."""
    s = F.log_softmax(s_logits.float().flatten(0, -2), -1)
    t = F.log_softmax(t_logits.float().flatten(0, -2), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def heal_targets(layer_map: Sequence[Sequence[int]], changed: Sequence[int], n_teacher: int) -> list[int]:
    """Student layers to heal: changed ones, the first kept layer after each removed run, and the last
    layer when trailing layers were removed."""
    out, prev_end = set(changed), -1
    for k, grp in enumerate(layer_map):
        if min(grp) > prev_end + 1:
            out.add(k)
        prev_end = max(grp)
    if prev_end < n_teacher - 1:
        out.add(len(layer_map) - 1)
    return sorted(out)


@torch.no_grad()
def teacher_states(teacher: LayerStream, ids: Tensor, depths: set[int],
                   logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
    """The teacher's hidden states h_d for d in depths (0 = embeddings), and its logits when asked (those
    need the whole model: ``teacher.model()`` built first). One block at a time until then."""
    full = teacher.model() if teacher.materialized else None
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device)[None].expand(B, T)
    h = full.embed(ids) if full is not None else teacher.embed(ids)
    ropes = teacher.ropes(pos, h.dtype)
    mask = teacher.mask(T)
    out = {0: h} if 0 in depths else {}
    last = teacher.spec.n_layers if logits else max(depths)
    for i in range(last):
        block = full.layers[i] if full is not None else teacher.block(i)
        ls = teacher.spec.layers[i]
        cos, sin = ropes.get(ls.head_dim, (None, None)) if ls.has_attn else (None, None)
        h = block(h, cos, sin, mask, None, i)
        if i + 1 in depths:
            out[i + 1] = h
    return out, (full.logits(h) if logits and full is not None else None)


def shared_prefix(student: Model, teacher: LayerStream, layer_map: Sequence[Sequence[int]], trained: set[int]) -> int:
    """Leading student layers that are the teacher's own (same index, same weights, not trained): the
    student's h_p equals the teacher's, so the student may start there."""
    emb = student.embed.weight
    if emb.shape != teacher.state["embed.weight"].shape or not torch.equal(
            emb, teacher.state["embed.weight"].to(emb.device, emb.dtype)):
        return 0
    p = 0
    while p < len(layer_map) and list(layer_map[p]) == [p] and p not in trained and p < teacher.spec.n_layers \
            and student.spec.layers[p] == teacher.spec.layers[p] and teacher.layer_equal(student, p):
        p += 1
    return p


def layer_of(name: str) -> int:
    """Layer index of a parameter name ``layers.{i}....``; -1 for embeddings, final norm and head."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else -1


def chunks(tokens: Tensor, T: int, what: str) -> Tensor:
    n = tokens.numel() // T
    if n < 1:
        raise ValueError(f"heal: the {what} text has {tokens.numel()} tokens, fewer than one sequence of {T}. "
                         "Fix: give more text (--data) or a shorter --seq-len")
    return tokens[: n * T].view(n, T).long()


__all__ = ["STAGES", "STATE_DIR", "TEACHER", "HealConfig", "HealData", "HealReport", "chunks", "heal_targets",
           "kl_teacher_student", "layer_of", "relative_mse", "shared_prefix", "teacher_states"]
