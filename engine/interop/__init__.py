"""Pruned models in other formats and tools: plain HF transformers, vLLM's DeciLM (Nemotron-NAS)
``block_configs``, llama.cpp's GGUF, and an lm-evaluation-harness model adapter.

``formats`` decides which format can carry a model, ``hf`` / ``decilm`` / ``gguf_file`` write them,
``verify`` loads an export back and compares logits, ``export`` is the one entry point, ``harness`` is the
lm-eval adapter (needs the ``lm-eval`` extra). docs/INTEROP.md has the commands.
"""
