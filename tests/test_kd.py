"""KD-FedLLM: probe set, consensus, refusals, the wire, and distillation on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.modes import create_mode
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.kd import (
    DeviceTopK,
    KdConsensus,
    KdProbeSet,
    KdTask,
    KdUpdate,
    Probe,
    consensus,
    encode_topk,
    load_probes,
    probe_sha256,
    sparse_kl,
)
from tests.kd_helpers import GOLDEN_KD, TOKENIZER, build_golden, write_probe_set

# -- consensus ---------------------------------------------------------------------------------


def _reference(devices: list[DeviceTopK], positions: list[int], weighting: str, keep: int, power: float = 1.0):
    """Position by position with dicts: the rule as docs/protocol.md states it."""
    probe_of = [s for s, n in enumerate(positions) for _ in range(n)]
    out = []
    for t, s in enumerate(probe_of):
        if weighting == "samples":
            w = [float(d.num_samples) for d in devices]
        elif weighting == "confidence":
            w = [float(d.confidence[s]) ** power for d in devices]
        else:
            best = max(range(len(devices)), key=lambda i: (devices[i].confidence[s], -i))
            w = [1.0 if i == best else 0.0 for i in range(len(devices))]
        mass: dict[int, float] = {}
        for d, wi in zip(devices, w, strict=True):
            if wi == 0:
                continue
            z = sum(math.exp(v) for v in d.logprobs[t])
            for tok, v in zip(d.ids[t], d.logprobs[t], strict=True):
                mass[int(tok)] = mass.get(int(tok), 0.0) + wi / sum(w) * math.exp(v) / z
        top = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
        total = sum(p for _, p in top)
        out.append({tok: p / total for tok, p in top})
    return out


def _random_device(rng, n_pos: int, n_probes: int, k: int, vocab: int, samples: int) -> DeviceTopK:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n_pos)])
    logits = rng.standard_normal((n_pos, vocab)) * 2
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return DeviceTopK(ids=ids.astype(np.int64), logprobs=np.take_along_axis(logp, ids, axis=1),
                      confidence=rng.uniform(0.05, 0.95, n_probes), num_samples=samples)


@pytest.mark.parametrize(("weighting", "power"), [("samples", 1), ("confidence", 1), ("confidence", 3.0),
                                                  ("best", 1)])
def test_consensus_matches_a_position_by_position_reference(weighting, power):
    rng = np.random.default_rng(3)
    positions = [2, 1, 3]
    devices = [_random_device(rng, 6, 3, k, 12, n) for k, n in ((4, 10), (3, 30), (5, 5))]
    ids, probs = consensus(devices, positions, weighting, keep=6, power=power)
    ref = _reference(devices, positions, weighting, keep=6, power=power)
    for t, want in enumerate(ref):
        got = {int(i): float(p) for i, p in zip(ids[t], probs[t], strict=True) if p > 0}
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-12 for k in want)
        assert abs(probs[t].sum() - 1) < 1e-12


def test_a_large_confidence_power_approaches_best_without_underflow():
    import dataclasses

    rng = np.random.default_rng(4)
    positions = [2, 1, 3]
    devices = [_random_device(rng, 6, 3, k, 12, n) for k, n in ((4, 10), (3, 30), (5, 5))]
    # confidences below 0.01: each one raised to the power 200 alone underflows to 0.0
    devices = [dataclasses.replace(d, confidence=d.confidence / 100) for d in devices]
    assert all(np.all(d.confidence ** 200 == 0) for d in devices)
    sharp = consensus(devices, positions, "confidence", keep=6, power=200.0)
    best = consensus(devices, positions, "best", keep=6)

    def dense(ids: np.ndarray, probs: np.ndarray) -> np.ndarray:  # [positions, vocab]
        out = np.zeros((ids.shape[0], 12))
        np.add.at(out, (np.arange(ids.shape[0])[:, None], ids), probs)
        return out

    np.testing.assert_allclose(dense(*sharp), dense(*best), atol=1e-3)


def test_consensus_of_one_device_is_its_renormalised_top_k_and_pads_short_rows():
    d = DeviceTopK(ids=np.array([[3, 1]]), logprobs=np.log(np.array([[0.3, 0.1]])), confidence=np.array([0.5]),
                   num_samples=1)
    ids, probs = consensus([d], [1], "samples", keep=4)
    assert ids.tolist() == [[3, 1, 0, 0]]
    assert np.allclose(probs, [[0.75, 0.25, 0, 0]])


def test_sparse_kl_is_the_kl_over_the_support():
    logp = np.log(np.array([[0.5, 0.25, 0.25]]))
    kl = sparse_kl(np.array([[0, 1]]), np.array([[0.5, 0.5]]), logp)
    assert abs(kl - (0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25))) < 1e-12


# -- the probe set and the config ---------------------------------------------------------------


def test_probe_set_file_errors_name_the_key_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "", "response": "x"}\n')
    with pytest.raises(ValueError, match=r"kd.probe_path: .*p.jsonl:2: prompt and response"):
        load_probes(bad)
    with pytest.raises(ValueError, match=r"kd\.probe_path: cannot read probe set"):
        CoordinatorConfig.model_validate({"kd": {"probe_path": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(ValueError, match="less than or equal to 128"):
        CoordinatorConfig.model_validate({"kd": {"probe_path": str(write_probe_set(bad)), "top_k": 500}})


def test_probe_set_message_must_hash_to_its_manifest():
    probes = (Probe(prompt="a", response="b"),)
    ok = KdProbeSet(manifest={"sha256": probe_sha256(probes), "count": 1}, probes=probes)
    assert KdProbeSet.from_msgpack(ok.to_msgpack()) == ok
    with pytest.raises(ValueError, match="does not hash"):
        KdProbeSet(manifest={"sha256": "0" * 64, "count": 1}, probes=probes)


# -- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def kd_mode(tmp_path):
    cfg = CoordinatorConfig.model_validate({
        "state_dir": str(tmp_path / "c"), "kd": {"probe_path": str(write_probe_set(tmp_path / "p.jsonl", 1)),
                                                 "top_k": 4, "lambda": 0.5}})
    return create_mode(cfg)


def _update(mode, *, sha=None, tokenizer=TOKENIZER, vocab=50, positions=None, ids=None, lp=None, conf=None,
            k=4, device="dev-1") -> m.Update:
    n = len(mode.probes)
    positions = positions or [2] * n
    total = sum(positions)
    rng = np.random.default_rng(0)
    if ids is None:
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(total)])
    if lp is None:
        lp = np.log(np.full((total, k), 0.9 / k))
    id_map, lp_map = encode_topk(ids, lp, "float16")
    conf = np.full(n, 0.5, dtype="<f4") if conf is None else conf
    payload = KdUpdate(probe_sha256=sha or mode.sha256, tokenizer=tokenizer, vocab_size=vocab, positions=positions,
                       ids=id_map, logprobs=lp_map, confidence=np.asarray(conf, dtype="<f4").tobytes())
    return m.Update(kind="fit", task_id="t", round=1, device_id=device, base_version=0, num_samples=8,
                    payload=payload)


def test_bad_logits_updates_are_refused_with_a_reason_and_counted(kd_mode):
    mode = kd_mode
    n = len(mode.probes)
    mode.validate_update(_update(mode))  # the first device fixes tokenizer, vocabulary and positions
    assert (mode.tokenizer, mode.vocab_size, mode.positions) == (TOKENIZER, 50, tuple([2] * n))
    total = 2 * n
    bad_ids = np.tile(np.arange(4), (total, 1))
    bad_ids[0, 0] = 50
    nonfinite = np.log(np.full((total, 4), 0.2))
    nonfinite[3, 1] = np.nan
    cases = {
        "probe_hash": (_update(mode, sha="ab" * 32), "answers probe set"),
        "tokenizer": (_update(mode, tokenizer="cd" * 32), "devices must share a tokenizer"),
        "positions": (_update(mode, positions=[2] * (n - 1) + [3]), f"probe {n - 1} has 3 positions"),
        "shape": (_update(mode, ids=np.zeros((total - 1, 4))), "must both be"),
        "out_of_vocabulary": (_update(mode, ids=bad_ids), "1 token ids outside the vocabulary [0, 50)"),
        "non_finite": (_update(mode, lp=nonfinite), "logprobs.*non-finite"),
        "k_over_limit": (_update(mode, k=5), "k=5 log-probs per position; the limit is top_k=4"),
        "confidence": (_update(mode, conf=np.full(n, 2.0)), "confidences must be finite and in [0, 1]"),
    }
    for kind, (upd, reason) in cases.items():
        with pytest.raises(ProtocolError, match=reason.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            mode.validate_update(upd)
        assert mode.refused.get(kind) == 1, (kind, mode.refused)
    assert sum(mode.refused.values()) == len(cases)
    assert mode.state_blob()["refused"] == mode.refused  # persisted with the mode state


def test_a_device_with_another_tokenizer_than_the_configured_one_is_refused(tmp_path):
    cfg = CoordinatorConfig.model_validate({"kd": {"probe_path": str(write_probe_set(tmp_path / "p.jsonl", 1)),
                                                   "tokenizer": TOKENIZER}})
    mode = create_mode(cfg)
    assert mode.task_payload("fit", 1).manifest.tokenizer == TOKENIZER  # every task names it
    with pytest.raises(ProtocolError, match="the federation's tokenizer is f0f0"):
        mode.validate_update(_update(mode, tokenizer="cd" * 32))
    assert mode.refused == {"tokenizer": 1}


def test_a_device_whose_status_names_another_tokenizer_is_never_tasked(kd_mode):
    from broker_coordinator.registry import DeviceRegistry
    from broker_coordinator.strategy import select_devices
    from fedmq_protocol.topics import Topics

    mode = kd_mode
    topics = Topics("fedmq", "default")
    reg = DeviceRegistry({}, topics, 60.0)
    for dev, tok in (("dev-0", TOKENIZER), ("dev-1", "cd" * 32), ("dev-2", None)):
        st = m.DeviceStatus(device_id=dev, online=True, seq=1, method="kd", num_samples=8, state="idle",
                            tokenizer=tok)
        reg.on_status(topics.device_status(dev), st.to_json())
        assert reg.devices[dev].tokenizer == tok
    mode.validate_update(_update(mode, device="dev-0"))  # the first update fixes the federation's tokenizer
    for r in range(1, 4):  # every round's selection: the mismatched device is left out, counted once
        chosen = select_devices(r, list(reg.devices.values()), min_clients=1, accepts=mode.accepts)
        assert chosen == ["dev-0", "dev-2"]  # dev-2 said nothing: its update decides
    assert mode.refused == {"tokenizer": 1} and mode.mismatched == {"dev-1": "cd" * 32}
    with pytest.raises(ValueError, match="tokenizer"):
        m.DeviceStatus(device_id="dev-3", online=True, seq=1, tokenizer="not hex")


def test_aggregate_publishes_and_persists_the_consensus(kd_mode, tmp_path):
    mode = kd_mode
    ups = [_update(mode, device=f"dev-{i}") for i in range(2)]
    contributions = [mode.validate_update(u) for u in ups]
    out = mode.aggregate(1, 1, ups, contributions)
    assert out.message.tensors.empty and out.message.version == 1
    retained = dict(mode.retained_messages("fedmq/test"))
    cons = KdConsensus.from_msgpack(retained["fedmq/test/kd/consensus"])
    assert cons.round == 1 and cons.num_devices == 2
    ids, probs = cons.arrays()
    want_ids, want_p = consensus(contributions, mode.positions, "samples", 4)
    assert np.array_equal(ids, want_ids) and np.allclose(probs, want_p, atol=1e-6)
    assert KdProbeSet.from_msgpack(retained["fedmq/test/kd/probes"]).manifest.sha256 == mode.sha256
    assert mode.retained_messages("fedmq/test") == []  # published once ...
    assert len(mode.retained_messages("fedmq/test", everything=True)) == 2  # ... unless the broker lost them
    # restored from the persisted blob
    from broker_coordinator.state import CoordinatorState

    again = create_mode(mode.cfg)
    again.restore(CoordinatorState(round_completed=1, mode_state=mode.state_blob()))
    assert again.consensus == mode.consensus and again.positions == mode.positions
    assert again.task_payload("fit", 2).consensus_round == 1
    # a federation keeps its probe set: another file under kd.probe_path refuses to resume
    write_probe_set(mode.spec.probe_path, 1, seed=5)
    with pytest.raises(ValueError, match=r"kd\.probe_path: .* but this federation started on probe set"):
        create_mode(mode.cfg).restore(CoordinatorState(round_completed=1, mode_state=mode.state_blob()))


def test_the_consensus_records_the_confidence_power_it_was_made_with(tmp_path):
    def mode_with(weighting, power):
        cfg = CoordinatorConfig.model_validate({"state_dir": str(tmp_path / f"c-{weighting}-{power}"), "kd": {
            "probe_path": str(write_probe_set(tmp_path / "p.jsonl", 1)), "top_k": 4,
            "weighting": weighting, "confidence_power": power}})
        return create_mode(cfg)

    for weighting, power, recorded in (("confidence", 1.5, 1.5), ("confidence", 1.0, 1.0), ("samples", 1.5, 1.0)):
        mode = mode_with(weighting, power)
        ups = [_update(mode, device=f"dev-{i}") for i in range(2)]
        mode.aggregate(1, 1, ups, [mode.validate_update(u) for u in ups])
        wire = dict(mode.retained_messages("fedmq/test"))["fedmq/test/kd/consensus"]
        assert KdConsensus.from_msgpack(wire).confidence_power == recorded
        # a plain power (or one the weighting does not use) is left off the wire, as before it existed
        assert (b"confidence_power" in wire) == (recorded != 1.0)


# -- the wire -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["task_fit_kd", "update_fit_kd", "kd_probes", "kd_consensus"])
def test_kd_messages_keep_their_golden_bytes(name):
    data = (GOLDEN_KD / f"{name}.msgpack").read_bytes()
    assert build_golden()[name] == data
    cls = {"task": m.Task, "update": m.Update, "kd_probes": KdProbeSet, "kd_consensus": KdConsensus}
    decoder = cls.get(name.split("_")[0]) or cls[name]
    msg = decoder.from_msgpack(data)
    assert msg.to_msgpack() == data
    if name == "task_fit_kd":
        assert isinstance(msg.payload, KdTask) and msg.payload.consensus_round == 1
    if name == "kd_consensus":
        ids, probs = msg.arrays()
        assert ids.shape == (4, 2) and np.allclose(probs.sum(axis=1), 1)


# -- distillation on tiny models ----------------------------------------------------------------


def test_distillation_pulls_a_smaller_model_towards_the_consensus(tmp_path, tiny_family):
    """Two sizes sharing the byte-level tokenizer: the consensus of a trained 2-block model,
    distilled into the 1-block one, brings it closer to that consensus than the same training
    without the distillation term does."""
    from edge_agent.data import load_jsonl, synthesize
    from edge_agent.methods.kd import Distill, KdMethod
    from tests.tiny_model import ALL_LINEAR

    adapter = m.AdapterSpec(r=4, target_modules=ALL_LINEAR)
    big = KdMethod(tiny_family("tiny-llama"), adapter, device="cpu", template="plain")
    small = KdMethod(tiny_family("tiny-llama:blocks=1"), adapter, device="cpu", template="plain")
    assert big.tokenizer_fingerprint == small.tokenizer_fingerprint
    assert small.num_trainable_params() < big.num_trainable_params()
    probes = load_probes(write_probe_set(tmp_path / "p.jsonl", 1))
    synthesize(tmp_path / "d", num_devices=1, samples_per_device=32, eval_samples=2, seed=1)
    train = load_jsonl(tmp_path / "d" / "device_0.jsonl")
    big.fit(train, m.FitConfig(local_steps=30, lr=1e-2, batch_size=8, max_seq_len=64))
    t = big.probe_topk(probes, top_k=8, max_response_tokens=8, max_len=64)
    dev = DeviceTopK(ids=t.ids, logprobs=t.logprobs.astype(np.float64), confidence=t.confidence.astype(np.float64),
                     num_samples=1)
    target = consensus([dev], t.positions, "samples", 8)

    def kl() -> float:
        ans = small.probe_topk(probes, top_k=1, max_response_tokens=8, max_len=64, consensus=target)
        assert ans.positions == t.positions  # the same positions on both models
        return float(ans.kl)

    cfg = m.FitConfig(local_steps=15, lr=1e-2, batch_size=4, max_seq_len=64)
    start, before = small.get_state(), kl()
    small.fit(train, cfg)
    without = kl()
    small.set_state(start)
    small.fit(train, cfg, distill=Distill(probes, *target, lam=2.0, temperature=1.0, max_response_tokens=8,
                                          probe_batch_size=4))
    with_kd = kl()
    assert small.last_kd_loss is not None
    assert with_kd < without < before, (before, without, with_kd)


def test_consensus_loglik_scores_the_public_response_with_a_floor_outside_the_support():
    from edge_agent.methods.kd import OUTSIDE_SUPPORT, consensus_loglik

    # two probes: response tokens [7, 3] and [5]; the consensus keeps two tokens per position
    rows = [(([1, 2, 7, 3], [-100, -100, 7, 3]), 2), (([1, 5], [-100, 5]), 1)]
    ids = np.array([[7, 9], [4, 8], [5, 0]])
    probs = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    got = consensus_loglik(rows, ids, probs)
    # 3 is outside the second position's support: it counts as OUTSIDE_SUPPORT
    np.testing.assert_allclose(got, [(np.log(0.75) + np.log(OUTSIDE_SUPPORT)) / 2, 0.0])


def test_select_better_distils_only_where_the_consensus_explains_the_response_better(tmp_path, tiny_family):
    """A device trained on the probes' own answers explains them better than a consensus that
    is far from them: with select=better it distils on none of them (its adapter moves as with
    no distillation at all), with select=all on every drawn probe."""
    from edge_agent.data import Example
    from edge_agent.methods.kd import Distill, KdMethod
    from tests.tiny_model import ALL_LINEAR

    meth = KdMethod(tiny_family("tiny-llama"), m.AdapterSpec(r=4, target_modules=ALL_LINEAR), device="cpu",
                    template="plain")
    probes = load_probes(write_probe_set(tmp_path / "p.jsonl", 1))
    rows = [Example(p.prompt, p.response) for p in probes]
    meth.fit(rows * 4, m.FitConfig(local_steps=40, lr=2e-2, batch_size=8, max_seq_len=64))
    t = meth.probe_topk(probes, top_k=4, max_response_tokens=8, max_len=64)
    # a consensus that puts all its mass on the model's least likely kept token at every position
    far = (t.ids[:, -1:].copy(), np.ones((t.ids.shape[0], 1)))
    cfg = m.FitConfig(local_steps=3, lr=1e-2, batch_size=4, max_seq_len=64, seed=5)
    start = meth.get_state()
    meth.fit(rows, cfg)
    plain = meth.get_state()
    for select, used in (("better", 0), ("all", 3 * 4)):
        meth.set_state(start)
        meth.fit(rows, cfg, distill=Distill(probes, *far, lam=2.0, temperature=1.0, max_response_tokens=8,
                                            probe_batch_size=4, select=select))
        assert (meth.kd_probes_drawn, meth.kd_probes_used) == (3 * 4, used)
        same = all(np.array_equal(meth.get_state()[k], plain[k]) for k in plain)
        assert same == (select == "better")


def test_a_task_that_distils_on_every_probe_keeps_its_bytes_and_select_better_round_trips():
    from fedmq_protocol.modes.kd import KdTask

    golden = m.Task.from_msgpack(build_golden()["task_fit_kd"])
    kd = golden.payload_as(KdTask)
    assert kd.select == "all" and b"select" not in golden.to_msgpack()
    better = golden.model_copy(update={"payload": kd.model_copy(update={"select": "better"})})
    assert m.Task.from_msgpack(better.to_msgpack()).payload_as(KdTask).select == "better"
    with pytest.raises(ProtocolError, match="select"):
        obj = better.to_obj()
        obj["kd"]["select"] = "some"
        m.Task.from_obj(obj)


def test_probe_positions_cover_every_response_token(tiny_llama, tmp_path):
    from edge_agent.methods.kd import KdMethod

    meth = KdMethod(tiny_llama, m.AdapterSpec(r=2), device="cpu", template="plain")
    probes = [Probe(prompt="Reverse: abc", response="cba"), Probe(prompt="Add 1 and 2.", response="3")]
    ans = meth.probe_topk(probes, top_k=3, max_response_tokens=32, max_len=64)
    assert ans.positions == [3, 1]  # byte-level: one position per response byte
    assert ans.ids.shape == (4, 3) and np.all(ans.logprobs <= 0)
    assert np.all((ans.confidence > 0) & (ans.confidence <= 1))
    assert Path(tiny_llama).is_dir()


def test_an_agent_with_another_tokenizer_refuses_the_task_and_a_foreign_consensus(tmp_path, tiny_family):
    """A tiny Qwen2 (byte-level too, but other special tokens) in a tiny-Llama federation."""
    from edge_agent.methods.kd import KdMethod
    from edge_agent.modes import AgentContext, GlobalRejected
    from edge_agent.modes.kd import KdMode
    from fedmq_protocol.topics import Topics

    llama = KdMethod(tiny_family("tiny-llama"), m.AdapterSpec(r=2), device="cpu")
    qwen = KdMethod(tiny_family("tiny-qwen2"), m.AdapterSpec(r=2), device="cpu")
    assert llama.tokenizer_fingerprint != qwen.tokenizer_fingerprint
    probes = (Probe(prompt="Add 1 and 2.", response="3"),)
    probe_set = KdProbeSet(manifest={"sha256": probe_sha256(probes), "count": 1}, probes=probes)
    from types import SimpleNamespace

    config = SimpleNamespace(broker=SimpleNamespace(max_message_bytes=1 << 24))  # what the mode reads of it
    mode = KdMode(AgentContext(config, Topics("fedmq", "t"), tmp_path, lambda *a, **k: None))
    mode.on_message("probes", "fedmq/t/kd/probes", probe_set.to_msgpack())
    payload = KdTask(manifest={**probe_set.manifest.model_dump(), "tokenizer": llama.tokenizer_fingerprint},
                     top_k=4, lam=1.0, temperature=1.0, max_response_tokens=8, probe_batch_size=1)
    task = m.Task(kind="fit", task_id="t1", round=1, device_id="dev-9", global_version=0, deadline_s=60,
                  adapter=m.AdapterSpec(r=2), payload=payload)
    mode.check_fit(task, llama)  # the federation's tokenizer: accepted
    with pytest.raises(ValueError, match=r"tokenizer .* is not the federation's"):
        mode.check_fit(task, qwen)
    from fedmq_protocol.modes.kd import encode_consensus

    ids, probs = encode_consensus(np.zeros((1, 1)), np.ones((1, 1)))
    cons = KdConsensus(round=1, probe_sha256=probe_set.manifest.sha256, tokenizer=llama.tokenizer_fingerprint,
                       vocab_size=llama.vocab_size, positions=(1,), weighting="samples", num_devices=1, ids=ids,
                       probs=probs)
    mode.on_message("consensus", "fedmq/t/kd/consensus", cons.to_msgpack())
    assert mode.can_reach(1)
    with pytest.raises(GlobalRejected, match="consensus is over tokenizer"):
        mode.apply_global(qwen, 1, None)
    mode.apply_global(llama, 1, None)
    assert mode.applied == cons
