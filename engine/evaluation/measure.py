"""What the benchmarks measure with: timers, the bandwidth probe, peak memory, and the engines compared.

The bandwidth probe is the hardware's bound in the same run: the faster of a large GEMV (the operation
decode is made of) and a large max-reduction (a plain streaming read), each on a buffer far larger than
the last-level cache. The engines: layerfold's Runtime, and HF transformers' eager ``generate`` on the
same weights (checked against layerfold's logits first).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from layerfold.core.memstat import proc_status_bytes, reset_rss_peak
from layerfold.core.model import Model
from layerfold.inference.runtime import Runtime

__all__ = ["Peak", "hf_baseline", "measure_bandwidth", "run_hf", "run_layerfold", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mean_time(fn: Callable[[], Any], device: torch.device, min_s: float = 0.5) -> float:
    """Mean seconds per call over at least ``min_s`` of back-to-back calls. A mean over a stretch of
    time (not the best short burst) meets the same preemption and memory traffic from other
    processes as the decode runs it is compared with, so a shared machine does not inflate the bound."""
    fn()
    sync(device)
    n, t = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(device)
        el = time.perf_counter() - t
        if el >= min_s and n >= 3:
            return el / n


def measure_bandwidth(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      min_s: float = 0.5) -> dict[str, float]:
    """Achievable read bandwidth in GB/s: a GEMV over a 256 MiB (CPU) / 2 GiB (GPU) matrix of
    ``dtype`` and a max-reduction over the same bytes (both far beyond any cache), each timed over at
    least ``min_s`` seconds; the bound uses the faster of the two."""
    device = torch.device(device)
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    cols = 8192
    rows = nbytes // (cols * torch.empty((), dtype=dtype).element_size())
    w = torch.full((rows, cols), 0.01, device=device, dtype=dtype)  # written, so every page is real memory
    x = torch.randn(1, cols, device=device, dtype=dtype)
    size = w.numel() * w.element_size()
    gemv = size / _mean_time(lambda: F.linear(x, w), device, min_s) / 1e9
    flat = w.view(-1).view(torch.float32)  # a max over 4-byte words: the cheapest compute per byte read
    read = size / _mean_time(lambda: flat.amax(), device, min_s) / 1e9
    return {"gemv_gbs": gemv, "read_gbs": read, "bandwidth_gbs": max(gemv, read)}


class Peak:
    """Peak memory growth over a block: RSS high-water mark on CPU (reset through
    /proc/self/clear_refs), the caching allocator's peak on CUDA."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            reset_rss_peak()
            self.base = proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = max(0, proc_status_bytes("VmHWM") - self.base)


def hf_baseline(model: Model) -> tuple[Any | None, str]:
    """The same weights in an HF transformers model (default attention, no compile), or None and why.

    Only a uniform spec maps onto an HF config; the logits are checked against ``model`` first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerfold.core.arch import hf_config_from_spec, state_to_hf

    try:
        cfg = hf_config_from_spec(model.spec)
    except ValueError as e:
        return None, f"HF baseline skipped: {str(e).split('. Fix')[0]}"
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    res = hf.load_state_dict(state_to_hf(model.state_dict(), model.spec), strict=False)
    if res.unexpected_keys or set(res.missing_keys) - ({"lm_head.weight"} if model.spec.tie_embeddings else set()):
        return None, f"HF baseline skipped: weight names do not map ({res})"
    if model.spec.tie_embeddings:
        hf.tie_weights()
    hf.eval()
    # Ordinary (not special) tokens; half-precision forwards of two implementations round differently,
    # so there the check only catches gross mapping errors (a wrong rope or norm setting, a lost head).
    v = model.spec.vocab_size
    ids = torch.randint(v // 10, max(v // 2, v // 10 + 1), (2, 16), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with torch.inference_mode():
        ours, theirs = model(ids).float(), hf(ids).logits.float()
    err = (ours - theirs).abs().max().item() / max(ours.abs().max().item(), 1e-6)
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    half = model.dtype in (torch.float16, torch.bfloat16)
    if err > (0.2 if half else 1e-3) or agree < (0.7 if half else 0.99):
        return None, (f"HF baseline skipped: its logits differ from layerfold's (relative {err:.2g}, argmax "
                      f"agreement {agree:.0%})")
    return hf, ""


def run_layerfold(rt: Runtime, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Greedy generation on the runtime: prefill, then new_tokens - 1 decode steps. On CUDA the tokens
    stay on the device (no host round trip between steps); the clock stops after a synchronize."""
    rt.reset()
    sync(rt.device)
    on_device = rt.device.type == "cuda"
    t0 = time.perf_counter()
    tok = rt.prefill(prompts).argmax(-1)
    tok = tok if on_device else tok.tolist()
    sync(rt.device)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = rt.decode(tok).argmax(-1)
        tok = tok if on_device else tok.tolist()
    sync(rt.device)
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1}


def run_hf(hf: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # put() sees the prompt, then every new token: stamp the first one
        def __init__(self) -> None:
            self.calls, self.first = 0, 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor(prompts, device=hf.device)
    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                          pad_token_id=0)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return {"ttft_s": clock.first - t0, "decode_s": t2 - clock.first}
