from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from edge_agent.data import Example, load_jsonl
from edge_agent.methods import get_method, method_names
from edge_agent.methods.base import FitResult, TrainingMethod
from fedmq_protocol.messages import AdapterSpec, FitConfig
from tests.tiny_model import ALL_LINEAR, family_examples

SPEC = AdapterSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
BIG = AdapterSpec(r=8, alpha=16.0, target_modules=ALL_LINEAR)


@pytest.fixture(scope="module")
def lora(tiny_llama):
    return get_method("lora")(tiny_llama, SPEC, device="cpu", seed=0)


def _rng_states():
    return torch.random.get_rng_state().clone(), np.random.get_state()[1].copy()


def _assert_same_rng(before):
    after = _rng_states()
    assert torch.equal(before[0], after[0]), "global torch RNG changed"
    assert np.array_equal(before[1], after[1]), "global numpy RNG changed"


def test_registry():
    # the registry's methods and those registered by their file (kd, split)
    assert method_names() == ["kd", "krso", "lora", "qlora", "split", "zo"]
    assert get_method("lora").name == "lora" and get_method("qlora").name == "qlora"
    assert issubclass(get_method("qlora"), get_method("lora"))
    with pytest.raises(ValueError, match="valid: kd, krso, lora, qlora, split, zo"):
        get_method("sgd")
    from edge_agent.methods import METHODS

    assert {n: get_method(n) for n in method_names()} == METHODS and METHODS["kd"].name == "kd"


def test_adapter_names_and_params(lora):
    names = lora.adapter_names()
    assert names[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(names) == 2 * 2 * 2  # layers x {q,v} x {A,B}
    assert not any(".default." in n for n in names)
    assert names == lora.adapter_names()
    a = lora.get_adapter()
    assert list(a) == names and all(v.dtype == np.float32 for v in a.values())
    assert lora.num_trainable_params() == sum(v.size for v in a.values())
    assert lora.device == "cpu"
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)  # B starts at zero


def test_get_set_round_trip(lora):
    orig = lora.get_adapter()
    rng = np.random.default_rng(0)
    new = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in orig.items()}
    lora.set_adapter(new)
    got = lora.get_adapter()
    assert all(np.array_equal(got[k], new[k]) for k in new)
    got[next(iter(got))][...] = 123.0  # a copy: mutating it changes nothing
    assert not np.array_equal(lora.get_adapter()[next(iter(got))], got[next(iter(got))])
    lora.set_adapter({k: v.astype(np.float64) for k, v in orig.items()})  # any float dtype
    assert all(np.array_equal(lora.get_adapter()[k], orig[k]) for k in orig)


def test_set_adapter_rejects_without_changing(lora):
    before = lora.get_adapter()
    names = list(before)
    cases = {
        "wrong shape": ({**{k: v + 1 for k, v in before.items()}, names[3]: np.zeros((3, 3), np.float32)}, names[3]),
        "unknown": ({**{k: v + 1 for k, v in before.items()}, "bogus.lora_A.weight": before[names[0]]}, "bogus"),
        "missing": ({k: v + 1 for k, v in before.items() if k != names[5]}, names[5]),
        "nan": ({**{k: v + 1 for k, v in before.items()}, names[2]: np.full_like(before[names[2]], np.nan)}, names[2]),
    }
    for case, (tensors, offender) in cases.items():
        with pytest.raises(ValueError) as ei:
            lora.set_adapter(tensors)
        assert offender in str(ei.value), case
        after = lora.get_adapter()
        assert all(np.array_equal(after[k], before[k]) for k in before), case


def test_same_seed_same_init_and_rng_untouched(tiny_llama):
    before = _rng_states()
    a = get_method("lora")(tiny_llama, SPEC, device="cpu", seed=5).get_adapter()
    b = get_method("lora")(tiny_llama, SPEC, device="cpu", seed=5).get_adapter()
    c = get_method("lora")(tiny_llama, SPEC, device="cpu", seed=6).get_adapter()
    _assert_same_rng(before)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if "lora_A" in k)


def _fit_and_eval(method: TrainingMethod, exs, cfg):
    e0, n0 = method.evaluate(exs, cfg)
    steps: list[tuple[int, float]] = []
    res = method.fit(exs, cfg, progress=lambda s, loss: steps.append((s, loss)))
    e1, _ = method.evaluate(exs, cfg)
    return e0, e1, res, steps, n0


def test_lora_fit_lowers_loss_and_keeps_rng(tiny_llama, synth):
    exs = family_examples(synth, "next_letter", 64)
    m = get_method("lora")(tiny_llama, BIG, device="cpu", seed=0)
    cfg = FitConfig(local_steps=20, lr=1e-2, batch_size=8, max_seq_len=64, seed=3)
    before = _rng_states()
    e0, e1, res, steps, n = _fit_and_eval(m, exs, cfg)
    _assert_same_rng(before)
    assert isinstance(res, FitResult) and res.steps == 20 and res.num_samples == len(exs) == n
    assert [s for s, _ in steps] == list(range(1, 21))
    assert res.train_loss == pytest.approx(np.mean([loss for _, loss in steps]))
    assert res.tokens > 0 and res.seconds > 0
    assert e1 < e0 - 0.3, (e0, e1)
    assert not m.model.training


def test_fit_is_reproducible_and_seed_dependent(tiny_llama, synth):
    exs = family_examples(synth, "add", 40)
    spec = AdapterSpec(r=4, dropout=0.1, target_modules=("q_proj", "v_proj"))
    cfg = FitConfig(local_steps=4, lr=5e-3, batch_size=4, max_seq_len=48, seed=1)
    runs = []
    for fit_seed in (1, 1, 2):
        m = get_method("lora")(tiny_llama, spec, device="cpu", seed=0)
        m.fit(exs, cfg.model_copy(update={"seed": fit_seed}))
        runs.append(m.get_adapter())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not np.array_equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_fit_should_stop_and_errors(lora, synth):
    exs = family_examples(synth, "add", 16)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3

    res = lora.fit(exs, FitConfig(local_steps=50, batch_size=2, max_seq_len=48), should_stop=stop)
    assert res.steps == 3
    res = lora.fit(exs, FitConfig(local_steps=1), should_stop=lambda: True)
    assert res.steps == 0 and res.tokens == 0 and np.isnan(res.train_loss)
    with pytest.raises(ValueError):
        lora.fit([], FitConfig())
    with pytest.raises(ValueError):
        lora.evaluate([], FitConfig())


def test_labels_mask_prompt_and_truncation(lora):
    ex = Example("What is 2 + 3?", "5")
    ids, labels = lora._encode(ex, 512)
    n_resp = sum(1 for x in labels if x != -100)
    assert n_resp == 2 and labels[-1] == lora.tokenizer.eos_token_id  # "5" + eos (byte tokenizer)
    assert lora.tokenizer.decode(ids[: len(ids) - 2]).endswith("### Response:\n")
    long = Example("x" * 300, "y" * 300)
    for max_len in (8, 64, 100):
        ids, labels = lora._encode(long, max_len)
        assert len(ids) == max_len and any(x != -100 for x in labels)


def test_evaluate_batches(lora, synth):
    exs = load_jsonl(synth / "eval.jsonl")[:12]
    full, n = lora.evaluate(exs, FitConfig(batch_size=4, max_seq_len=64))
    part, n2 = lora.evaluate(exs, FitConfig(batch_size=4, max_seq_len=64, eval_batches=1))
    assert n == 12 and n2 == 4 and np.isfinite(full) and np.isfinite(part)
    # batching does not change the token-weighted mean
    full1, _ = lora.evaluate(exs, FitConfig(batch_size=1, max_seq_len=64))
    assert full1 == pytest.approx(full, rel=1e-4)


def test_bfloat16_base(tiny_llama, synth):
    m = get_method("lora")(tiny_llama, SPEC, device="cpu", dtype="bfloat16", seed=0)
    a = m.get_adapter()
    assert all(v.dtype == np.float32 for v in a.values())
    res = m.fit(family_examples(synth, "add", 8), FitConfig(local_steps=2, batch_size=2, max_seq_len=48))
    assert res.steps == 2 and np.isfinite(res.train_loss)


def test_bad_target_modules(tiny_llama):
    with pytest.raises(ValueError, match="cannot attach LoRA"):
        get_method("lora")(tiny_llama, AdapterSpec(target_modules=("nope_proj",)), device="cpu")


def test_qlora_tiny_cpu_learns(tiny_llama, synth):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    before = _rng_states()
    q = get_method("qlora")(tiny_llama, BIG, device="cpu", seed=0)
    q2 = get_method("qlora")(tiny_llama, BIG, device="cpu", seed=0)
    plain = get_method("lora")(tiny_llama, BIG, device="cpu", seed=0)
    assert any(isinstance(mod, Linear4bit) for mod in q.model.modules())
    assert q.adapter_names() == plain.adapter_names()
    a, b = q.get_adapter(), plain.get_adapter()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same init whatever the base precision
    exs = family_examples(synth, "next_letter", 64)
    cfg = FitConfig(local_steps=20, lr=1e-2, batch_size=8, max_seq_len=64, seed=3)
    e0, e1, res, _steps, _n = _fit_and_eval(q, exs, cfg)
    _assert_same_rng(before)
    assert res.steps == 20 and e1 < e0 - 0.3, (e0, e1)
    # an eval before training must not break gradients (bitsandbytes CPU repacking)
    q2.evaluate(exs, cfg)
    q2.fit(exs, cfg)
    a, b = q.get_adapter(), q2.get_adapter()
    assert all(np.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_qlora_gradient_checkpointing_flag(tiny_llama, synth):
    pytest.importorskip("bitsandbytes")
    q = get_method("qlora")(tiny_llama, SPEC, device="cpu", seed=0, gradient_checkpointing=True)
    res = q.fit(family_examples(synth, "add", 8), FitConfig(local_steps=2, batch_size=2, max_seq_len=48))
    assert res.steps == 2 and np.isfinite(res.train_loss)


@pytest.mark.integration
def test_smollm2_qlora_lowers_heldout_loss(tmp_path):
    """Real SmolLM2-135M-Instruct (cached under $FEDMQ_HOME), QLoRA, 10 steps on CPU."""
    from edge_agent.data import synthesize
    from edge_agent.models import resolve_model

    t0 = time.perf_counter()
    path = resolve_model("smollm2-135m")
    t_resolve = time.perf_counter() - t0
    synthesize(tmp_path, num_devices=1, samples_per_device=80, eval_samples=24, seed=0)
    train = load_jsonl(tmp_path / "device_0.jsonl")
    held = load_jsonl(tmp_path / "eval.jsonl")
    m = get_method("qlora")(path, AdapterSpec(r=8), seed=0)
    cfg = FitConfig(local_steps=10, lr=2e-3, batch_size=4, max_seq_len=64, seed=0)
    e0, _ = m.evaluate(held, cfg)
    res = m.fit(train, cfg)
    e1, _ = m.evaluate(held, cfg)
    print(f"\nsmollm2 qlora: resolve {t_resolve:.1f}s, fit {res.seconds:.1f}s "
          f"({res.seconds / res.steps:.2f}s/step, {res.tokens} tokens), "
          f"held-out loss {e0:.3f} -> {e1:.3f}, train loss {res.train_loss:.3f}")
    assert e1 < e0, (e0, e1)


def test_lora_gradient_checkpointing_same_result(tiny_llama, synth):
    exs = family_examples(synth, "add", 16)
    cfg = FitConfig(local_steps=3, lr=5e-3, batch_size=4, max_seq_len=48)
    out = []
    for gc in (False, True):
        m = get_method("lora")(tiny_llama, SPEC, device="cpu", seed=0, gradient_checkpointing=gc)
        m.fit(exs, cfg)
        out.append(m.get_adapter())
    assert all(np.allclose(out[0][k], out[1][k], atol=1e-5) for k in out[0])


def test_freeze_a_trains_only_lora_b_and_the_update_costs_nothing_for_a(tiny_llama, synth):
    """FFA-LoRA: with ``freeze_a`` lora_A keeps its seeded init (the same on every device) and
    only lora_B moves, so the encoded difference carries no bytes for A."""
    from fedmq_protocol.codec import CodecSpec, encode

    frozen = get_method("lora")(tiny_llama, SPEC.model_copy(update={"freeze_a": True}), device="cpu", seed=0)
    before = frozen.get_adapter()
    frozen.fit(load_jsonl(synth / "device_0.jsonl")[:8],
               FitConfig(local_steps=3, lr=1e-2, batch_size=4, max_seq_len=32))
    after = frozen.get_adapter()
    delta = {k: after[k] - before[k] for k in before}
    assert all(not delta[k].any() for k in delta if "lora_A" in k)
    assert all(delta[k].any() for k in delta if "lora_B" in k)
    tensors = encode(delta, CodecSpec(values="sign")).to_wire()["tensors"]
    assert all(tensors[k].get("nnz") == 0 and tensors[k]["data"] == b"" for k in delta if "lora_A" in k)
