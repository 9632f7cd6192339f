"""LoRA adapters: start as the identity change, train only themselves, merge into plain weights."""

from __future__ import annotations

import torch

from layerfold.healing.lora import LoRALinear, add_lora, has_lora, merge_lora
from tests.support.models import tiny_model


def test_adapters_start_neutral_train_alone_and_merge_exactly() -> None:
    m = tiny_model(n_layers=3, std=0.1, seed=0)
    ids = torch.randint(0, m.spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    names = set(m.state_dict())
    with torch.no_grad():
        before = m(ids)
    params = add_lora(m, [0, 2], rank=4, alpha=8.0)
    assert len(params) == 2 * 7 * 2 and has_lora(m)  # A and B for q, k, v, o, gate, up, down of two layers
    with torch.no_grad():
        assert torch.equal(m(ids), before)  # B starts at zero
    for p in m.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.5)
    loss = m(ids).float().logsumexp(-1).mean()  # any loss that moves the output
    loss.backward()
    frozen = [p for n, p in m.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen) and all(p.grad is not None for p in params)
    opt.step()
    with torch.no_grad():
        trained = m(ids)
    assert not torch.allclose(trained, before)
    assert merge_lora(m) == 14 and not has_lora(m)
    assert set(m.state_dict()) == names  # an ordinary checkpoint: the same tensor names
    with torch.no_grad():
        torch.testing.assert_close(m(ids), trained, rtol=1e-4, atol=1e-4)


def test_layers_without_a_target_are_skipped() -> None:
    from tests.support.models import hetero_runtime_spec

    m = tiny_model(hetero_runtime_spec(), seed=1)
    params = add_lora(m, range(m.spec.n_layers), rank=2)
    wrapped = [mod for mod in m.modules() if isinstance(mod, LoRALinear)]
    # 5 layers: full, full (+ shortcut, not a target), MLP block (no attention), attention only, full
    assert len(wrapped) == 7 + 7 + 3 + 4 + 7 and len(params) == 2 * len(wrapped)
