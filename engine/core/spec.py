"""ModelSpec / LayerSpec: the one frozen description of a (possibly pruned) model's shapes.

A dense HF model is the special case where every layer is alike. Pruned models vary per layer:
depth surgery removes or replaces layers (an ``mlp`` block is a SwiGLU FFN with its own pre-norm and
residual), width surgery changes head counts, FFN widths and the residual width itself (SliceGPT),
in which case the residual path of a block carries a shortcut matrix mapping width in -> width out.

A layer reads the residual stream at width ``d_in``; its attention writes at ``d_mid`` (the residual
is carried d_in -> d_mid by the attention shortcut when the widths differ or a rotation changes
basis); its MLP reads ``d_mid`` and writes ``d_out`` (MLP shortcut d_mid -> d_out).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any

BLOCK_KINDS = ("decoder", "mlp")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # source families (core.arch.SUPPORTED), export names them


def _err(where: str, msg: str, fix: str) -> ValueError:
    return ValueError(f"{where}: {msg}. Fix: {fix}")


def _check_types(obj: Any, where: str) -> None:
    """Each field of a spec holds its kind of value (a config.json edited by hand or from elsewhere may not): whole
    numbers (not true/false, not 4.0) >= 0, finite positive real numbers, true/false, text, or null where allowed."""
    for f in fields(obj):
        v, kind = getattr(obj, f.name), _KINDS.get(f.name)
        if kind is None or (v is None and f.name in ("sliding_window", "bos_token_id")):
            continue
        if kind == "int":
            ok, want = isinstance(v, Integral) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"
        elif kind == "real":
            ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            want = "a finite number > 0"
        elif kind == "bool":
            ok, want = isinstance(v, bool), "true or false"
        elif kind == "ids":
            ok = isinstance(v, tuple) and all(isinstance(x, Integral) and not isinstance(x, bool) and x >= 0 for x in v)
            want = "a list of token ids (whole numbers >= 0)"
        elif kind == "reals":
            ok = isinstance(v, tuple) and all(isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)
                                              and x > 0 for x in v)
            want = "a list of finite numbers > 0"
        else:
            ok, want = isinstance(v, str), "a string"
        if not ok:
            raise _err(where, f"{f.name}={v!r} is not {want}", f"set {f.name} to {want} (the source model's value)")


_INTS = ("d_in", "d_mid", "d_out", "n_heads", "n_kv_heads", "head_dim", "d_ffn", "vocab_size", "d_model",
         "rope_original_max_pos", "max_position", "sliding_window", "bos_token_id", "rotary_dim")
_KINDS = {**dict.fromkeys(_INTS, "int"),
          **dict.fromkeys(("has_attn", "has_mlp", "attn_shortcut", "mlp_shortcut", "tie_embeddings", "qkv_bias",
                           "qk_norm", "rope_truncate"), "bool"),
          **dict.fromkeys(("norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                           "rope_beta_fast", "rope_beta_slow", "rope_attention_factor"), "real"),
          "kind": "str", "arch": "str", "rope_type": "str", "eos_token_ids": "ids",
          "rope_short_factor": "reals", "rope_long_factor": "reals"}
_LISTS = ("eos_token_ids", "rope_short_factor", "rope_long_factor")  # JSON lists, held as tuples
_LONGROPE = ("rope_short_factor", "rope_long_factor")  # written to JSON only when set (older checkpoints lack them)
_OPTIONAL = ("rotary_dim",)  # written to JSON only when set (0): older checkpoints stay byte-for-byte the same


@dataclass(frozen=True)
class LayerSpec:
    d_in: int  # residual width entering the layer
    d_mid: int  # residual width between attention and MLP
    d_out: int  # residual width leaving the layer
    n_heads: int = 0  # query heads (0 when has_attn is False)
    n_kv_heads: int = 0  # key/value heads; n_heads % n_kv_heads == 0
    head_dim: int = 0
    d_ffn: int = 0  # SwiGLU intermediate width (0 when has_mlp is False)
    has_attn: bool = True
    has_mlp: bool = True
    attn_shortcut: bool = False  # residual path d_in -> d_mid goes through a (d_mid, d_in) matrix
    mlp_shortcut: bool = False  # residual path d_mid -> d_out goes through a (d_out, d_mid) matrix
    kind: str = "decoder"  # "decoder" | "mlp" (a replacement block: pre-norm + SwiGLU + residual)

    # ---- derived -------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head: query head h belongs to KV head h // group_size."""
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    def validate(self, where: str = "layer") -> None:
        _check_types(self, where)
        for f in ("d_in", "d_mid", "d_out"):
            if getattr(self, f) <= 0:
                raise _err(where, f"{f}={getattr(self, f)} must be positive", f"set {f} to the residual width")
        if self.kind not in BLOCK_KINDS:
            raise _err(where, f"kind={self.kind!r} is unknown", f"use one of {BLOCK_KINDS}")
        if self.kind == "mlp" and self.has_attn:
            raise _err(where, "an 'mlp' block has no attention", "set has_attn=false or kind='decoder'")
        if not (self.has_attn or self.has_mlp):
            raise _err(where, "layer has neither attention nor MLP", "drop the layer from the spec instead")
        if self.has_attn:
            if min(self.n_heads, self.n_kv_heads, self.head_dim) <= 0:
                raise _err(where, "attention needs n_heads, n_kv_heads, head_dim > 0",
                           "set them or has_attn=false")
            if self.n_heads % self.n_kv_heads:
                raise _err(where, f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}",
                           "keep whole KV groups (all query heads of a KV head together)")
            if self.head_dim % 2:
                raise _err(where, f"head_dim={self.head_dim} is odd", "rotary embeddings need an even head_dim")
        elif self.d_in != self.d_mid and not self.attn_shortcut:
            raise _err(where, "no attention but d_in != d_mid", "set d_mid = d_in")
        if self.has_mlp and self.d_ffn <= 0:
            raise _err(where, f"d_ffn={self.d_ffn} must be positive", "set d_ffn or has_mlp=false")
        if not self.has_mlp and self.d_mid != self.d_out and not self.mlp_shortcut:
            raise _err(where, "no MLP but d_mid != d_out", "set d_out = d_mid")
        if self.d_in != self.d_mid and not self.attn_shortcut:
            raise _err(where, f"d_in={self.d_in} != d_mid={self.d_mid} without an attention shortcut",
                       "set attn_shortcut=true (and provide the shortcut matrix) or equal widths")
        if self.d_mid != self.d_out and not self.mlp_shortcut:
            raise _err(where, f"d_mid={self.d_mid} != d_out={self.d_out} without an MLP shortcut",
                       "set mlp_shortcut=true (and provide the shortcut matrix) or equal widths")


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    d_model: int  # embedding width (= layers[0].d_in)
    layers: tuple[LayerSpec, ...]
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3" | "yarn" | "longrope"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_original_max_pos: int = 8192  # llama3, yarn, longrope: the context the model was pretrained with
    rope_beta_fast: float = 32.0  # yarn: rotations per context above which a frequency is kept as it is
    rope_beta_slow: float = 1.0  # yarn: rotations below which it is interpolated by rope_factor
    rope_truncate: bool = True  # yarn: round the ramp's ends to whole dimensions (HF's default)
    rope_attention_factor: float = 1.0  # yarn, longrope: cos and sin are scaled by it (as HF reads the config)
    # partial rotary (Phi-4-mini: 96 of 128): rotary on rotary_dim dims of each head, the rest passed through; 0 =
    # the whole head. The rotary pairs sit where whole-head rotary has its first rotary_dim / 2 pairs (dims j and
    # j + head_dim / 2, j < rotary_dim / 2), their frequencies computed over rotary_dim dims; the other pairs turn at
    # frequency 0 (core.model.rope_inv_freq). An HF checkpoint's q/k rows are permuted into that layout at load time
    # (core.partial_rotary): the weights of a layerfold checkpoint with rotary_dim set are stored permuted.
    rotary_dim: int = 0
    # longrope (Phi-3-*-128k, Phi-3.5): per-frequency divisors, one per rotary pair ((rotary_dim or head_dim) / 2); a
    # row whose furthest position + 1 exceeds rope_original_max_pos uses the long ones (core.model.rope_tables)
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    max_position: int = 8192
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rotary
    sliding_window: int | None = None  # Mistral; None = full causal attention
    arch: str = "llama"  # source architecture family, used by export
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_final(self) -> int:
        return self.layers[-1].d_out if self.layers else self.d_model

    @property
    def uniform(self) -> bool:
        """True when every layer is the same plain decoder layer (exportable as a vanilla HF model)."""
        if not self.layers:
            return False
        first = self.layers[0]
        return all(l == first for l in self.layers) and first.kind == "decoder" and first.has_attn \
            and first.has_mlp and not first.attn_shortcut and not first.mlp_shortcut \
            and first.d_in == first.d_mid == first.d_out == self.d_model

    def validate(self) -> ModelSpec:
        _check_types(self, "model")
        if self.vocab_size <= 0 or self.d_model <= 0:
            raise _err("model", "vocab_size and d_model must be positive", "check the source config")
        if self.arch not in ARCHS:  # the family export writes; a config naming another was edited or mismatched
            raise _err("model", f"arch={self.arch!r} is not a family layerfold runs", f"use one of {ARCHS} (the "
                       "source model's family); another architecture has to be converted from its HF directory, "
                       "which names what it does not support")
        if self.rope_type not in ROPE_TYPES:
            raise _err("model", f"rope_type={self.rope_type!r} is unsupported", f"use one of {ROPE_TYPES}")
        if self.rope_type == "yarn" and (self.rope_theta == 1 or self.rope_original_max_pos < 1):
            # YaRN's ramp divides by log(rope_theta) and takes the log of the original context
            raise _err("model", f"YaRN rope scaling with rope_theta={self.rope_theta} and rope_original_max_pos="
                       f"{self.rope_original_max_pos} has no frequency ramp", "set rope_theta (not 1) and "
                       "rope_original_max_pos (>= 1) to the source model's values")
        if not self.layers:
            raise _err("model", "no layers", "keep at least one layer")
        self._check_rotary_dim()
        self._check_longrope()
        special = [t for t in (self.bos_token_id, *self.eos_token_ids) if t is not None and t >= self.vocab_size]
        if special:  # a token the head never scores: generation would never stop at it (or start from it)
            raise _err("model", f"bos_token_id={self.bos_token_id}, eos_token_ids={list(self.eos_token_ids)} name "
                       f"token {special[0]}, outside the vocabulary of {self.vocab_size} tokens (ids 0.."
                       f"{self.vocab_size - 1})", f"set bos_token_id / eos_token_id (eos_token_ids in a layerfold "
                       f"config) to the model's own token ids, below {self.vocab_size}")
        if self.max_position <= 0 or (self.sliding_window is not None and self.sliding_window <= 0):
            raise _err("model", f"max_position={self.max_position} and sliding_window={self.sliding_window} must be "
                       "positive", "set them to the source model's values (sliding_window null for full attention)")
        prev = self.d_model
        for i, l in enumerate(self.layers):
            if not isinstance(l, LayerSpec):
                raise TypeError(f"layers[{i}] is {type(l).__name__}, expected LayerSpec")
            l.validate(f"layers[{i}]")
            if l.d_in != prev:
                raise _err(f"layers[{i}]", f"d_in={l.d_in} but the previous width is {prev}",
                           "make each layer's d_in equal the previous layer's d_out (d_model for layer 0)")
            prev = l.d_out
        if self.tie_embeddings and self.d_final != self.d_model:
            raise _err("model", "tied head but final width differs from the embedding width",
                       "set tie_embeddings=false and store lm_head.weight")
        return self

    def rotary_pairs(self, head_dim: int) -> int:
        """The rotary frequency pairs of a head of ``head_dim`` (rotary_dim / 2 with partial rotary)."""
        return (self.rotary_dim or head_dim) // 2

    def _check_rotary_dim(self) -> None:
        dims = sorted({l.head_dim for l in self.layers if l.has_attn})
        if self.rotary_dim and (self.rotary_dim % 2 or (dims and self.rotary_dim > dims[0])):
            raise _err("model", f"rotary_dim={self.rotary_dim} is not an even number of dims within every attention "
                       f"head (head_dim {', '.join(map(str, dims))})", "set rotary_dim to the source model's "
                       "rotary width (head_dim * partial_rotary_factor, even), or 0 for rotary over the whole head")

    def _check_longrope(self) -> None:
        """longrope needs one short and one long factor per rotary frequency pair of every attention layer; other
        scalings carry none (a factor list nothing reads would hide a config mistake)."""
        if self.rope_type != "longrope":
            for f in _LONGROPE:
                if getattr(self, f):
                    raise _err("model", f"{f} is set but rope_type={self.rope_type!r} does not use it",
                               f"set rope_type to \"longrope\" (the source model's scaling) or remove {f}")
            return
        if self.rope_original_max_pos < 1:
            raise _err("model", f"longrope with rope_original_max_pos={self.rope_original_max_pos}", "set "
                       "rope_original_max_pos to the source model's original_max_position_embeddings (>= 1)")
        pairs = sorted({self.rotary_pairs(l.head_dim) for l in self.layers if l.has_attn})
        what = f"rotary_dim {self.rotary_dim}" if self.rotary_dim else "head_dim"
        heads = ", ".join(str(d) for d in sorted({l.head_dim for l in self.layers if l.has_attn}))
        counts = " and ".join(map(str, pairs))
        for f in _LONGROPE:
            n = len(getattr(self, f))
            if pairs and pairs != [n]:
                raise _err("model", f"{f} holds {n} factors, but the attention heads of {heads} have {counts} rotary "
                           f"frequency pairs ({what} / 2)",
                           f"give {f} one factor per pair (the source model's short_factor / long_factor), with one "
                           "head size for every attention layer")

    # ---- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(l) for l in self.layers]
        for f in _LISTS:
            d[f] = list(d[f])
            if f in _LONGROPE and not d[f]:
                del d[f]
        for f in _OPTIONAL:
            if not d[f]:
                del d[f]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if not isinstance(d, dict):
            raise TypeError(f"model spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise _err("model spec", f"unknown field(s) {sorted(unknown)}", f"remove them; known: {sorted(known)}")
        if "layers" not in d or "vocab_size" not in d or "d_model" not in d:
            raise _err("model spec", "missing vocab_size, d_model or layers", "write a complete spec")
        lknown = {f.name for f in fields(LayerSpec)}
        layers = []
        if not isinstance(d["layers"], list):
            raise _err("model spec", f"layers is a JSON {type(d['layers']).__name__}", "give a list of layer objects")
        for i, ld in enumerate(d["layers"]):
            if not isinstance(ld, dict):
                raise _err(f"layers[{i}]", f"is a JSON {type(ld).__name__}, not an object", "give each layer as an "
                           "object with d_in, d_mid, d_out, ...")
            bad = set(ld) - lknown
            if bad:
                raise _err(f"layers[{i}]", f"unknown field(s) {sorted(bad)}", f"known: {sorted(lknown)}")
            try:
                layers.append(LayerSpec(**ld))
            except TypeError as e:
                raise _err(f"layers[{i}]", str(e), "give d_in, d_mid and d_out") from None
        kw = dict(d)
        kw["layers"] = tuple(layers)
        for f in _LISTS:
            v = kw.get(f) or ()
            kw[f] = tuple(v) if isinstance(v, list) else v  # not a list: validate names it
        return cls(**kw).validate()

    @classmethod
    def from_json(cls, s: str) -> ModelSpec:
        return cls.from_dict(json.loads(s))

    def with_layers(self, layers: list[LayerSpec] | tuple[LayerSpec, ...], **kw: Any) -> ModelSpec:
        return replace(self, layers=tuple(layers), **kw).validate()


def dense_layer(d: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ffn: int) -> LayerSpec:
    return LayerSpec(d_in=d, d_mid=d, d_out=d, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=head_dim, d_ffn=d_ffn)


__all__ = ["LayerSpec", "ModelSpec", "dense_layer", "BLOCK_KINDS", "ROPE_TYPES", "field"]
