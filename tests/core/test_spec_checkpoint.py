"""ModelSpec validation/serialisation and the checkpoint format: round trip, errors, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import layerfold
from layerfold.core.checkpoint import CheckpointError, load_checkpoint, open_weights, save_checkpoint
from layerfold.core.loading import load_spec_state, source_kind
from layerfold.core.spec import LayerSpec, ModelSpec
from tests.support.models import hetero_reference_spec, tiny_hf, tiny_model
from tests.support.tolerances import assert_close


def test_spec_json_round_trip():
    s = hetero_reference_spec()
    assert ModelSpec.from_json(s.to_json()) == s


@pytest.mark.parametrize("change, field", [
    (dict(n_heads=5), "n_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(d_ffn=0), "d_ffn"),
    (dict(d_mid=40), "d_mid"),
    (dict(kind="mlp"), "attention"),
    (dict(kind="weird"), "kind"),
])
def test_layer_validation_names_the_field(change, field):
    base = dict(d_in=48, d_mid=48, d_out=48, n_heads=6, n_kv_heads=2, head_dim=8, d_ffn=80)
    base.update(change)
    with pytest.raises(ValueError, match=field) as e:
        LayerSpec(**base).validate()
    assert "Fix:" in str(e.value)


def test_model_validation_width_chain():
    s = hetero_reference_spec().to_dict()
    s["layers"][2]["d_in"] = 44
    with pytest.raises(ValueError, match=r"layers\[2\].*d_in"):
        ModelSpec.from_dict(s)
    s = hetero_reference_spec().to_dict()
    s["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        ModelSpec.from_dict(s)


@pytest.fixture()
def saved(tmp_path):
    m = tiny_model(hetero_reference_spec())
    out = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), provenance={"source": "test"})
    return m, out


def test_round_trip_bit_exact(saved):
    m, out = saved
    cfg, state = load_checkpoint(out)
    assert cfg["spec"] == m.spec and cfg["provenance"]["source"] == "test"
    for k, v in m.state_dict().items():
        assert torch.equal(state[k], v), k
    m2, tok = layerfold.load(out, tokenizer=False)
    assert tok is None
    ids = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))


def test_weights_are_memory_mapped(saved):
    _, out = saved
    state = open_weights(out / "model.safetensors")
    t = state["embed.weight"]
    # an mmap'd tensor's storage is the whole file, not a private copy of the tensor
    assert t.untyped_storage().nbytes() == (out / "model.safetensors").stat().st_size


def test_bf16_round_trip(tmp_path):
    m = tiny_model(hetero_reference_spec(), dtype=torch.bfloat16)
    out = save_checkpoint(tmp_path / "bf", m.spec, m.state_dict())
    _, state = load_checkpoint(out)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert state["embed.weight"].dtype == torch.bfloat16


def test_missing_unexpected_misshaped(saved, tmp_path):
    """save_checkpoint refuses a state that does not fit its spec before writing anything; written anyway
    (check=False, as a hand-edited file would be), the loader names the tensor."""
    m, out = saved
    missing = dict(m.state_dict())
    missing.pop("layers.1.attn_shortcut.weight")
    cases = (("missing", missing, "layers.1.attn_shortcut.weight"),
             ("extra", dict(m.state_dict(), **{"layers.0.extra.weight": torch.zeros(2)}), "layers.0.extra.weight"),
             ("shape", dict(m.state_dict(), **{"layers.3.attn.q.weight": torch.zeros(3, 3)}),
              r"layers.3.attn.q.weight.*shape"))
    for name, sd, match in cases:
        with pytest.raises(CheckpointError, match=f"save_checkpoint: state: .*{match}.*Fix: save the state of a"):
            save_checkpoint(tmp_path / name, m.spec, sd)
        assert not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}*"))
        bad = save_checkpoint(tmp_path / name, m.spec, sd, check=False)
        with pytest.raises(CheckpointError, match=match):
            layerfold.load(bad, tokenizer=False)


def test_truncated_and_corrupt_files(saved):
    _, out = saved
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        layerfold.load(out, tokenizer=False)
    w.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        layerfold.load(out, tokenizer=False)
    w.write_bytes(data)
    (out / "config.json").write_text('{"format": "layerfold", "spec": ')
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        layerfold.load(out, tokenizer=False)


def test_atomic_and_never_over_source(saved, tmp_path):
    m, out = saved
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(out, m.spec, m.state_dict())
    with pytest.raises(CheckpointError, match="source"):
        save_checkpoint(out, m.spec, m.state_dict(), sources=[out], overwrite=True)
    with pytest.raises(CheckpointError, match="source"):
        save_checkpoint(out / "inner", m.spec, m.state_dict(), sources=[out])

    class Boom(dict):
        def items(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "crash", m.spec, Boom())
    assert not (tmp_path / "crash").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crash")]
    assert (out / "model.safetensors").read_bytes() == before


def test_source_kinds_and_errors(tmp_path, saved):
    _, out = saved
    assert source_kind(out) == "checkpoint"
    assert source_kind("smollm2-135m") == "alias"
    with pytest.raises(FileNotFoundError, match="not an alias"):
        source_kind(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        source_kind(tmp_path / "empty")
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="llama, mistral, qwen2, qwen3"):
        load_spec_state(hf)


def test_hf_dir_import(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path / "q2", safe_serialization=True)
    m, _ = layerfold.load(tmp_path / "q2", tokenizer=False)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert_close(m(ids), hf(ids).logits, torch.float32, "imported HF dir vs transformers")
    assert Path(tmp_path / "q2" / "config.json").exists()


def _strict(text: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_written_json_is_strict(tmp_path):
    """report.json, config.json and stats.json are read by other tools: NaN and Inf become null."""
    from layerfold.calibration.calibrate import calibrate
    from tests.support.models import hetero_calib_spec

    m = tiny_model(d_model=16, n_layers=2, heads=2, kv_heads=1, head_dim=8, ffn=24, vocab=32)
    rep = {"ppl": float("nan"), "curve": [(0, float("inf")), (8, 3.5)], "nested": {"x": -float("inf")}}
    out = save_checkpoint(tmp_path / "ck", m.spec, m.state_dict(), report=rep,
                          provenance={"healed": {"best_val_ppl": float("nan")}})
    back = _strict((out / "report.json").read_text())
    assert back == {"ppl": None, "curve": [[0, None], [8, 3.5]], "nested": {"x": None}}
    assert _strict((out / "config.json").read_text())["provenance"]["healed"]["best_val_ppl"] is None
    h = layerfold.build_model(hetero_calib_spec(), None)
    st = calibrate(h, torch.randint(0, 50, (2, 8)), window=2, cka=False, channels=False)
    st.save(tmp_path / "stats")
    derived = _strict((tmp_path / "stats" / "stats.json").read_text())["derived"]
    assert "null" in json.dumps(derived)  # the cosines of pairs of unequal width


def test_arch_must_be_a_family_layerfold_runs():
    """A config naming another architecture (a hand edit, or a mismatched file) is refused, naming the ones it
    runs; those are the families the HF import supports."""
    from layerfold.core.arch import SUPPORTED
    from layerfold.core.spec import ARCHS

    assert set(ARCHS) == set(SUPPORTED)
    s = hetero_reference_spec().to_dict()
    for arch in ARCHS:
        assert ModelSpec.from_dict({**s, "arch": arch}).arch == arch
    with pytest.raises(ValueError, match=r"arch='gpt2' is not a family layerfold runs.*Fix: use one of .*llama"):
        ModelSpec.from_dict({**s, "arch": "gpt2"})


def test_config_errors_name_the_cause_once(saved):
    """config.json's "dtype" (which transformers reads too, e.g. when the tokenizer loads) must be one layerfold
    writes; a damaged spec's error carries one fix, not two."""
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "dtype": "float8"}))
    with pytest.raises(CheckpointError, match=r"\"dtype\" is 'float8', not one of float32, bfloat16"):
        load_checkpoint(out)
    spec = {**cfg["spec"], "vocab_size": -3}
    (out / "config.json").write_text(json.dumps({**cfg, "spec": spec}))
    with pytest.raises(CheckpointError, match="invalid model spec") as e:
        load_checkpoint(out)
    assert str(e.value).count("Fix:") == 1, str(e.value)
