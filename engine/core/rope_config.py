"""Rotary-embedding and sliding-window settings of an HF config, read as transformers reads them.

``rope_source`` finds the scaling a config asks for (transformers 5's rope_parameters or 4.x's rope_scaling and
rope_theta, refused where the two would read it differently), ``rope_fields`` turns it into ModelSpec's rope_*
fields (HF's meanings and defaults; ``longrope_fields`` for longrope), ``sliding_window`` the one window every
layer applies, and ``rope_scaling`` writes a spec's scaling back as HF's ``rope_scaling`` entry. Which family
applies its window how is declared in ``layerfold.core.arch``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from layerfold.core.spec import ModelSpec


def setting(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def number(v: Any, key: str, where: str, whole: bool = False) -> Any:
    """A numeric config setting as int (``whole``) or float. JSON true/false is refused (Python reads true as 1:
    max_position_embeddings 1, rms_norm_eps 1.0), and so are fractions where a whole number belongs."""
    try:
        x = float(v) if isinstance(v, str) else v
        ok = isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and (not whole or x == int(x))
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{where}: {key}={v!r} is not {'a whole number' if whole else 'a finite number'}. Fix: write "
                         "it as a JSON number (no quotes, not true/false), the model's own value")
    return int(x) if whole else float(x)


def rope_source(cfg: Any, where: str) -> tuple[Any, str, dict[str, Any]]:
    """(rope_theta, scaling type, scaling entry). transformers >= 5 writes rope_parameters (theta inside) and reads
    rope_scaling first; 4.x reads rope_theta and rope_scaling only: a config they read differently is refused."""
    thetas, says = [], []
    for key in ("rope_parameters", "rope_scaling"):
        d = setting(cfg, key) or {}
        if not isinstance(d, dict) or any(isinstance(v, dict) for v in d.values()):
            raise ValueError(f"{where}: {key}={d!r} is not one JSON object of rope settings (per-layer-type entries "
                             "are not supported). Fix: restore the model's own config.json")
        kinds = [d[k] for k in ("rope_type", "type") if d.get(k) is not None]
        if kinds[:1] == ["longrope"] and kinds[1:] in (["su"], ["yarn"]):  # Phi3Config renames its type only
            kinds = kinds[:1]
        if len(kinds) == 2 and kinds[0] != kinds[1]:
            raise ValueError(f"{where}: {key} says rope_type={kinds[0]!r} but type={kinds[1]!r}. Fix: keep one of the "
                             "two keys, with the model's own scaling")
        thetas += [d["rope_theta"]] if d.get("rope_theta") is not None else []
        args = {k: v for k, v in d.items() if k not in ("rope_type", "type", "rope_theta")}
        if kinds[:1] != ["default"] and (kinds or args):  # a scaling (an explicit default's factor: unused, as in HF)
            says.append((kinds[0] if kinds else "default", args))
    if len(says) == 2 and says[0] != says[1]:
        raise ValueError(f"{where}: rope_parameters {says[0]} and rope_scaling {says[1]} disagree (transformers 5 "
                         "reads rope_scaling, 4.x only it). Fix: keep one of them, with the model's own scaling")
    thetas += [setting(cfg, "rope_theta")] if setting(cfg, "rope_theta") is not None else []
    if any(t != thetas[0] for t in thetas[1:]):
        raise ValueError(f"{where}: rope_theta is given as {' and '.join(map(repr, thetas))} (rope_parameters, "
                         "rope_scaling, rope_theta). Fix: keep one of them, the model's own value")
    return (thetas or [10000.0])[0], *(says or [("default", {})])[0]


def sliding_window(cfg: Any, rule: str | None, where: str) -> int | None:
    """The sliding window every layer applies, or None. ``rule`` says how the family's transformers class applies
    its ``sliding_window`` (``layerfold.core.arch.WINDOW_RULES``): None, never (Llama); "layers", to every layer, or
    to those layer_types marks (Mistral); "flag", when use_sliding_window is true, from layer max_window_layers on
    or where layer_types marks (Qwen2/Qwen3); "all", to every layer whatever layer_types says (Phi-3: a layer_types
    that says otherwise is refused, not read either way). layerfold has one window for all layers, so a model
    whose layers differ is refused rather than run with the window everywhere."""
    use = rule in ("layers", "all") or rule == "flag" and setting(cfg, "use_sliding_window", False)
    types = setting(cfg, "layer_types")
    if rule == "all" and types is not None:
        spans = "sliding_attention" if setting(cfg, "sliding_window") is not None else "full_attention"
        if types != [spans] * setting(cfg, "num_hidden_layers"):
            raise ValueError(f"{where}: layer_types={types!r}, but this family's transformers class reads no "
                             f"layer_types: every layer attends as sliding_window={setting(cfg, 'sliding_window')!r} "
                             "says. Fix: remove layer_types (or restore the model's own config.json)")
    if not use or setting(cfg, "sliding_window") is None:
        return None
    sw = number(setting(cfg, "sliding_window"), "sliding_window", where, whole=True)
    n = setting(cfg, "num_hidden_layers")
    if types is None and rule == "flag":
        first = number(setting(cfg, "max_window_layers", 28), "max_window_layers", where, whole=True)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if types is None or rule == "all":
        return sw
    known = isinstance(types, list) and all(t in ("full_attention", "sliding_attention") for t in types)
    if not known or len(types) != n:
        raise ValueError(f"{where}: layer_types={types!r} is not one \"full_attention\" or \"sliding_attention\" per "
                         f"layer (num_hidden_layers={n}). Fix: restore the model's own layer_types, or remove it")
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return None
    if len(windowed) != n:
        raise ValueError(f"{where}: layers {windowed[0]}..{windowed[-1]} ({len(windowed)} of {n}) attend through a "
                         f"sliding window of {sw} tokens and the others to every token; layerfold applies one "
                         "attention span to every layer. Fix: use the model with use_sliding_window false (its "
                         "released setting for Qwen2/Qwen3), or open an issue for per-layer windows")
    return sw


def rope_fields(rtype: str, src: dict[str, Any], max_pos: int | None, where: str) -> dict[str, Any]:
    """The spec's rope_* fields other than rope_type, from a config's scaling entry (HF's meanings and defaults);
    ``max_pos``: the config's max_position_embeddings, None where it gives none."""
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rtype, ())
    if any(src.get(k) is None for k in need):
        raise ValueError(f"{where}: rope scaling {rtype!r} ({src}) lacks one of {', '.join(need)}. Fix: give the "
                         "model's own value of each")
    if rtype == "default":
        if src.get("factor") not in (None, 1):  # no type at all: transformers 4.x fails, 5.x runs it unscaled
            raise ValueError(f"{where}: rope scaling {src} has a factor but no scaling type, so nothing would use it. "
                             "Fix: set rope_type to the model's scaling (linear, llama3 or yarn), or remove factor")
        return {}
    if rtype == "linear":
        return {"rope_factor": number(src["factor"], "factor", where)}
    old = src.get("original_max_position_embeddings")
    if max_pos is None and (old is None or src.get("factor") is None):
        raise ValueError(f"{where}: rope scaling {rtype!r} ({src}) leaves original_max_position_embeddings or factor "
                         "to max_position_embeddings, which the config lacks. Fix: give it (the model's own value)")
    old = max_pos if old is None else number(old, "original_max_position_embeddings", where, whole=True)
    if old < 1:
        raise ValueError(f"{where}: rope scaling original_max_position_embeddings={old} is not a context length. "
                         "Fix: give the model's pretraining context (a whole number >= 1)")
    if rtype == "llama3":
        return {"rope_original_max_pos": old, **{f"rope_{k}": number(src[k], k, where) for k in need}}
    # DeepSeek-style configs leave the factor out: it is then the ratio of the two contexts
    factor = max_pos / old if src.get("factor") is None else number(src["factor"], "factor", where)
    truncate = src.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"{where}: rope scaling truncate={truncate!r} is not true or false. Fix: write it as a JSON "
                         "boolean, the model's own value")

    def mscale(scale: float, m: float = 1.0) -> float:  # YaRN's attention temperature
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = src.get("attention_factor")
    if attn is not None:
        attn = number(attn, "attention_factor", where)
    elif src.get("mscale") and src.get("mscale_all_dim"):
        attn = mscale(factor, number(src["mscale"], "mscale", where)) / \
            mscale(factor, number(src["mscale_all_dim"], "mscale_all_dim", where))
    else:
        attn = mscale(factor)
    return {"rope_factor": factor, "rope_original_max_pos": old, "rope_truncate": truncate,
            "rope_beta_fast": number(src.get("beta_fast") or 32.0, "beta_fast", where),
            "rope_beta_slow": number(src.get("beta_slow") or 1.0, "beta_slow", where), "rope_attention_factor": attn}



def longrope_fields(cfg: Any, src: dict[str, Any], max_pos: int | None, top_default: int | None, head_dim: int,
                    where: str) -> dict[str, Any]:
    """The spec's rope_* fields of a longrope scaling entry, read as transformers 4.x and 5 both read it, or a
    ValueError naming the setting. ``max_pos``: the config's max_position_embeddings (None where absent);
    ``top_default``: the family's default for a top-level original_max_position_embeddings (Phi3Config: 4096).

    original context: the top-level original_max_position_embeddings where the config (or its class) has one (4.x
    reads only it, 5 prefers it), else max_position_embeddings (4.x; 5 reads the entry's own key first, so an entry
    whose value differs is refused). Attention factor: the entry's attention_factor, else sqrt(1 + ln s / ln orig)
    with s = max_position_embeddings / orig (1 for s <= 1); an entry ``factor`` is s for 5 but ignored by 4.x
    beside a top-level original context, so one that differs from s is refused."""
    lists = {}
    for k in ("short_factor", "long_factor"):
        v = src.get(k)
        ok = isinstance(v, list) and all(isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x) and
                                         x > 0 for x in v)
        if not ok or len(v) != head_dim // 2:
            got = f"{len(v)} numbers" if ok else repr(v)[:80]
            raise ValueError(f"{where}: longrope {k} is {got}, not a list of {head_dim // 2} finite numbers > 0 (one "
                             f"per rotary frequency pair of {head_dim} rotary dims). Fix: restore the model's own "
                             f"rope_scaling (its {k})")
        lists[k] = tuple(float(x) for x in v)
    top = setting(cfg, "original_max_position_embeddings", top_default)
    own = src.get("original_max_position_embeddings")
    if top is not None:
        orig = number(top, "original_max_position_embeddings", where, whole=True)
    elif max_pos is None:
        raise ValueError(f"{where}: longrope without original_max_position_embeddings or max_position_embeddings. "
                         "Fix: give config.json the model's original_max_position_embeddings at the top level")
    elif own is not None and number(own, "original_max_position_embeddings", where, whole=True) != max_pos:
        raise ValueError(f"{where}: longrope's original_max_position_embeddings={own} sits inside the rope entry, "
                         f"where transformers 5 reads it but 4.x reads max_position_embeddings={max_pos} instead. "
                         "Fix: move original_max_position_embeddings to the top level of config.json (both read it)")
    else:
        orig = max_pos
    if orig < 1 or max_pos is None and src.get("attention_factor") is None:
        raise ValueError(f"{where}: longrope with original_max_position_embeddings={orig} and max_position_embeddings"
                         f"={max_pos}: no context ratio for the attention factor. Fix: give both (the model's own "
                         "values), the original one >= 1")
    s = (max_pos or orig) / orig
    if src.get("factor") is not None and top is not None and abs(number(src["factor"], "factor", where) - s) > 1e-9 * s:
        raise ValueError(f"{where}: longrope factor={src['factor']} differs from max_position_embeddings / "
                         f"original_max_position_embeddings = {s:g}: transformers 5 reads the factor, 4.x the ratio. "
                         "Fix: remove factor (or set attention_factor, which both read)")
    if src.get("factor") is not None and top is None:
        s = number(src["factor"], "factor", where)
    attn = src.get("attention_factor")
    if attn is not None:
        attn = number(attn, "attention_factor", where)
    else:
        if s > 1 and orig < 2:
            raise ValueError(f"{where}: longrope's attention factor divides by ln(original_max_position_embeddings="
                             f"{orig}) = 0. Fix: give attention_factor, or the model's own original context")
        attn = math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0
    if not attn > 0:
        raise ValueError(f"{where}: longrope attention_factor={attn} is not > 0. Fix: restore the model's own value")
    return {"rope_original_max_pos": orig, "rope_attention_factor": attn, "rope_short_factor": lists["short_factor"],
            "rope_long_factor": lists["long_factor"]}


def rope_scaling(spec: ModelSpec) -> dict[str, Any]:
    """HF's ``rope_scaling`` entry for a spec whose rotary embedding is scaled ("linear", "llama3", "yarn" or
    "longrope"; a longrope config also needs the top-level original_max_position_embeddings, which 4.x reads)."""
    if spec.rope_type == "longrope":  # the attention factor as a number: transformers 4.x and 5 read it alike
        s = spec.max_position / spec.rope_original_max_pos
        return {"rope_type": "longrope", "short_factor": list(spec.rope_short_factor),
                "long_factor": list(spec.rope_long_factor), "original_max_position_embeddings":
                spec.rope_original_max_pos, "attention_factor": spec.rope_attention_factor, **({"factor": s} if s >= 1
                                                                                              else {})}
    scaling: dict[str, Any] = {"rope_type": spec.rope_type, "factor": spec.rope_factor}
    if spec.rope_type == "llama3":
        scaling.update(low_freq_factor=spec.rope_low_freq_factor, high_freq_factor=spec.rope_high_freq_factor,
                       original_max_position_embeddings=spec.rope_original_max_pos)
    if spec.rope_type == "yarn":  # the attention factor as a number: no reader has to re-derive it
        scaling.update(original_max_position_embeddings=spec.rope_original_max_pos, beta_fast=spec.rope_beta_fast,
                       beta_slow=spec.rope_beta_slow, attention_factor=spec.rope_attention_factor)
        if not spec.rope_truncate:
            scaling["truncate"] = False
    return scaling

