from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import models
from edge_agent.models import fedmq_home, model_fingerprint, resolve_model


def test_import_does_not_pull_ml_stack():
    code = ("import sys, edge_agent.models, edge_agent.data, edge_agent.methods as m; "
            "assert m.method_names() == ['kd', 'krso', 'lora', 'qlora', 'split', 'zo']; "
            "bad = [x for x in ('torch', 'transformers', 'bitsandbytes', 'peft') if x in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_fedmq_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path / "h"))
    assert fedmq_home() == tmp_path / "h"
    monkeypatch.delenv("FEDMQ_HOME")
    assert fedmq_home() == Path.home() / ".cache" / "fedmq"


def test_tiny_llama_build_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logs: list[str] = []
    p = resolve_model("tiny-llama", cache_dir=tmp_path, log=logs.append)
    assert Path(p) == tmp_path / "models" / "tiny-llama" and (Path(p) / "config.json").is_file()
    assert logs  # built once, said so
    mtime = (Path(p) / "config.json").stat().st_mtime_ns
    assert resolve_model("TINY-LLAMA", cache_dir=tmp_path, log=logs.append) == p
    assert (Path(p) / "config.json").stat().st_mtime_ns == mtime and len(logs) == 1
    assert not [x for x in os.listdir(tmp_path / "models") if ".tmp-" in x]

    tok = AutoTokenizer.from_pretrained(p)
    model = AutoModelForCausalLM.from_pretrained(p)
    assert tok.eos_token and tok.pad_token and tok.bos_token
    assert tok.pad_token_id != tok.eos_token_id
    text = "### Instruction:\nWhat is 2 + 3?\n### Response:\n5 é"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 200_000

    # deterministic: a second cache gives identical weights
    p2 = resolve_model("tiny-llama", cache_dir=tmp_path / "other", log=lambda _m: None)
    assert (Path(p) / "model.safetensors").read_bytes() == (Path(p2) / "model.safetensors").read_bytes()
    assert model_fingerprint(p) == model_fingerprint(p2)


def test_load_causal_lm_cpu(tiny_llama):
    import torch

    m, tok = models.load_causal_lm(tiny_llama, quantize_4bit=False, dtype="bfloat16", device="cpu")
    assert next(m.parameters()).dtype == torch.bfloat16 and not m.training
    assert tok.pad_token_id is not None
    with pytest.raises(ValueError, match="unknown dtype"):
        models.load_causal_lm(tiny_llama, quantize_4bit=False, dtype="float8")
    with pytest.raises(ValueError, match="unknown device"):
        models.load_causal_lm(tiny_llama, quantize_4bit=False, device="tpu")


def test_resolve_paths_and_errors(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model(str(d), cache_dir=tmp_path)
    (d / "config.json").write_text('{"model_type": "llama"}')
    assert resolve_model(str(d), cache_dir=tmp_path) == str(d)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError) as ei:
        resolve_model("gpt-17", cache_dir=tmp_path)
    assert "gpt-17" in str(ei.value) and "smollm2-135m" in str(ei.value) and "tiny-llama" in str(ei.value)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), cache_dir=tmp_path)


def test_fingerprint_stable_and_sensitive(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "config.json").write_text('{"hidden_size": 64, "transformers_version": "5.0", "n": 1}')
    (b / "config.json").write_text('{\n  "n": 1,\n  "hidden_size": 64, "transformers_version": "5.9"\n}')
    fa = model_fingerprint(str(a))
    assert fa == model_fingerprint(str(a)) == model_fingerprint(str(b)) and len(fa) == 16
    (b / "config.json").write_text('{"hidden_size": 128, "n": 1}')
    assert model_fingerprint(str(b)) != fa


def test_failed_build_leaves_nothing(tmp_path):
    def boom(d: Path) -> None:
        (d / "partial.bin").write_bytes(b"x")
        raise RuntimeError("crash mid-build")

    target = tmp_path / "models" / "x"
    with pytest.raises(RuntimeError, match="crash"):
        models._cached_build(target, boom, log=lambda _m: None)
    assert not target.exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".x.lock"]
