"""The ``configuration_decilm.py`` written next to a ``--format decilm`` export.

vLLM builds the config of a ``model_type: nemotron-nas`` model through ``AutoConfig`` with
``--trust-remote-code`` (the model type is not in transformers), then reads
``config.block_configs[i].attention.no_op``, ``.attention.n_heads_in_group``, ``.ffn.no_op`` and, when
the FFN section *has* an ``ffn_mult`` attribute, derives the FFN width from it, else reads
``.ffn.intermediate_size`` (vllm/model_executor/models/nemotron_nas.py). So a section here gets exactly the
attributes its JSON holds (a null is no attribute): a width that ``ffn_mult`` cannot express exactly
is written as ``intermediate_size`` alone. The file is layerfold's own, written for transformers 4.x and 5.x.
"""

from __future__ import annotations

CONFIG_FILE = "configuration_decilm.py"
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig"}

SOURCE = '''"""DeciLM / Nemotron-NAS config (model_type "nemotron-nas"), written by layerfold's decilm export.

block_configs: one {"attention": {...}, "ffn": {...}} per layer. A section carries exactly the keys its
JSON holds (null values are left out), so ``hasattr(ffn, "ffn_mult")`` tells whether the width comes from
ffn_mult (as vLLM's DeciLM model reads it) or from intermediate_size.
"""

try:
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _Base


class BlockSection:
    def __init__(self, **kw):
        self.no_op = bool(kw.pop("no_op", False))
        self.replace_with_linear = bool(kw.pop("replace_with_linear", False))
        for k, v in kw.items():
            if v is not None:
                setattr(self, k, v)

    def to_dict(self):
        return dict(vars(self))


class BlockConfig:
    def __init__(self, attention=None, ffn=None, **kw):
        self.attention = attention if isinstance(attention, BlockSection) else BlockSection(**(attention or {}))
        self.ffn = ffn if isinstance(ffn, BlockSection) else BlockSection(**(ffn or {}))

    def to_dict(self):
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(_Base):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, head_dim=None, intermediate_size=None,
                 hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, attention_bias=False, mlp_bias=False, tie_word_embeddings=False, **kwargs):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        # transformers 5 and current vLLM read rope_parameters; older ones rope_theta and rope_scaling
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
        if rope_scaling:
            self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
'''

__all__ = ["AUTO_MAP", "CONFIG_FILE", "SOURCE"]
