"""Zeroth-order training (FedKSeed): directions, the client rule, ledger replay, coordinator side."""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.modes.zo import ZoMode
from broker_coordinator.state import CoordinatorState, FileStateStore
from edge_agent.data import Example
from edge_agent.methods import get_method, zo_directions
from edge_agent.methods.qlora import disable_cpu_inference_packing
from edge_agent.methods.zo import ZoMethod, draw_direction
from edge_agent.models import resolve_model
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.zo import (
    ZoLedgerRound,
    ZoSpec,
    ZoTask,
    ZoUpdate,
    aggregate_round,
    candidate_seeds,
    pack_pool,
    param_seed,
    pro_probabilities,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [Example(prompt=f"What is {i} plus {i}?", response=f"{2 * i}") for i in range(12)]
FIT = m.FitConfig(local_steps=12, batch_size=3, max_seq_len=32, seed=5)


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("tiny-llama")


def _method(path: str, target: str = "full", workers: int | None = None, backend: str | None = None) -> ZoMethod:
    return ZoMethod(path, m.AdapterSpec(), device="cpu", target=target, workers=workers, backend=backend)


def _params(method: ZoMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.trainable_state().items()}


def _ledger_round(rnd: int, spec: ZoSpec, pools: list[dict[int, float]], samples: list[int]) -> ZoLedgerRound:
    ups = [(n, ZoUpdate(base_fingerprint="x", indices=pack_pool(p)[0], g=pack_pool(p)[1]))
           for n, p in zip(samples, pools, strict=True)]
    return aggregate_round(rnd, spec, None, ups)


# ------------------------------------------------------------------ seeds and directions
def test_candidate_seeds_are_deterministic_distinct_and_torch_free():
    a, b = candidate_seeds(123, 4096), candidate_seeds(123, 4096)
    assert a == b and len(set(a)) == 4096 and all(0 < s < 2**63 for s in a)
    assert candidate_seeds(124, 8) != a[:8]
    assert candidate_seeds(123, 8) == a[:8]  # a prefix: K only truncates the stream
    assert param_seed(a[0], 0) != param_seed(a[0], 1)
    with pytest.raises(ValueError):
        candidate_seeds(1, 0)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_directions_are_reproducible_and_never_touch_the_global_rng(direction):
    state = torch.random.get_rng_state()
    z1 = draw_direction(99, 3, 3_000_001, direction)
    z2 = draw_direction(99, 3, 3_000_001, direction)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1[:1000], draw_direction(99, 4, 1000, direction))
    assert abs(float(z1.mean())) < 5e-3 and abs(float(z1.std()) - 1.0) < 5e-3
    if direction == "rademacher":
        assert set(torch.unique(z1).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_compiled_kernels_equal_the_numpy_backend_bit_for_bit(direction):
    """Two implementations of the definition (numba kernels; numpy with the rare path in plain
    Python), including the ziggurat's rare path (wedges, the tail beyond R) at odd offsets."""
    slow_total = 0
    for key, e0, n in [(1, 0, 70_001), (2**62 + 12345, 1, 70_000), (param_seed(7, 300), 10_000_001, 50_003)]:
        got = zo_directions.draw(key, n, direction, e0=e0)
        want = zo_directions.draw(key, n, direction, e0=e0, backend="numpy")
        assert got.dtype == want.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
        lo = zo_directions.words(key, e0 >> 1, (n >> 1) + 2)
        halves = np.stack([lo & np.uint64(0xFFFFFFFF), lo >> np.uint64(32)], axis=1).reshape(-1)
        slow_total += int(np.sum((halves >> np.uint64(zo_directions.U_SHIFT))
                                 >= zo_directions.KI2[(halves & np.uint64(zo_directions.IDX_MASK)).astype(np.int64)]))
    if direction == "gaussian":
        assert slow_total > 500  # wedges of the rare path were exercised
        # ... and the tail beyond R: layer 0 words whose uniform is past R / x_0
        lo = zo_directions.words(5, 0, 4_000_000) & np.uint64(0xFFFFFFFF)
        layer0 = (lo & np.uint64(zo_directions.IDX_MASK - 1)) == 0
        tail = np.flatnonzero(layer0 & ((lo >> np.uint64(zo_directions.U_SHIFT)) >= zo_directions.KI2[0]))
        assert len(tail) > 20
        for n in tail[:100]:
            z = zo_directions.draw(5, 1, "gaussian", e0=2 * int(n))[0]
            assert abs(z) > float(zo_directions.ZIG_R)
            assert z == zo_directions.draw(5, 1, "gaussian", e0=2 * int(n), backend="numpy")[0]


def test_any_split_of_a_parameter_draws_the_same_elements():
    whole = zo_directions.draw(42, 100_003, "gaussian")
    for cuts in ([0, 1, 2, 4097, 50_000, 100_003], [0, 33_333, 66_667, 100_003]):
        parts = [zo_directions.draw(42, b - a, "gaussian", e0=a) for a, b in itertools.pairwise(cuts)]
        assert np.array_equal(np.concatenate(parts), whole)
    theta = np.linspace(-1, 1, 100_003, dtype=np.float32)
    split = theta.copy()
    terms = [(42, 0.125), (43, -3e-4)]
    zo_directions.add_terms(theta, 0, terms, "gaussian")
    zo_directions.add_terms(split[:777], 0, terms, "gaussian")
    zo_directions.add_terms(split[777:], 777, terms, "gaussian")
    assert np.array_equal(theta, split)
    # two exactly rounded float32 operations per term, term after term
    expect = np.linspace(-1, 1, 100_003, dtype=np.float32)
    for key, c in terms:
        expect = expect + np.float32(c) * zo_directions.draw(key, 100_003, "gaussian", backend="numpy")
    assert np.array_equal(theta, expect)
    numpy_theta = np.linspace(-1, 1, 100_003, dtype=np.float32)
    zo_directions.add_terms(numpy_theta, 0, terms, "gaussian", backend="numpy")
    assert np.array_equal(numpy_theta, expect)


def test_gaussian_directions_are_standard_normal():
    z = zo_directions.draw(2024, 4_000_000, "gaussian").astype(np.float64)
    for k in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(k / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > k) - p) < 5 * math.sqrt(p / z.size) + 1e-7
    grid = np.linspace(-3, 3, 61)
    cdf = np.array([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in grid])
    ks = np.max(np.abs(np.searchsorted(np.sort(z), grid) / z.size - cdf))
    assert ks < 1.63 / math.sqrt(z.size) * 1.5
    assert abs(np.mean(z**4) - 3.0) < 0.02 and abs(np.mean(z**3)) < 0.01
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 3e-3  # neighbours share a hash word
    other = zo_directions.draw(2025, 4_000_000, "gaussian")
    assert abs(np.corrcoef(z, other)[0, 1]) < 3e-3


def test_ziggurat_tables_split_the_density_into_equal_areas():
    v = float(zo_directions.ZIG_V)
    x = zo_directions.XJ
    areas = x[1:] * (zo_directions.FX[2:] - zo_directions.FX[1:-1])
    assert np.allclose(areas, v, rtol=1e-9)
    r = float(zo_directions.ZIG_R)
    tail = math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
    assert r * math.exp(-r * r / 2) + tail == pytest.approx(v, rel=1e-9)


# ------------------------------------------------------------------ the client rule
def _reference_fit(path: str, spec: ZoSpec, cfg: m.FitConfig) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """FedKSeed's client loop written plainly: whole-tensor z per parameter, four passes per step."""
    ref = _method(path, workers=1)
    params = list(ref.trainable_state().values())
    seeds = candidate_seeds(spec.seed, spec.num_seeds)
    encoded = [ref._encode(ex, cfg.max_seq_len) for ex in EXAMPLES]
    batch_rng, seed_rng = random.Random(cfg.seed), random.Random(f"zo-seeds:{cfg.seed}")
    order: list[int] = []
    pool: dict[int, float] = {}
    for _ in range(cfg.local_steps):
        idx = []
        while len(idx) < cfg.batch_size:
            if not order:
                order = list(range(len(encoded)))
                batch_rng.shuffle(order)
            idx.append(order.pop())
        batch = ref._collate([encoded[i] for i in idx])
        k = seed_rng.randrange(spec.num_seeds)
        zs = [draw_direction(seeds[k], i, p.numel(), spec.direction).view(p.shape) for i, p in enumerate(params)]
        with torch.no_grad():
            for p, z in zip(params, zs, strict=True):
                p += spec.eps * z
            lp = float(ref.model(**batch).loss)
            for p, z in zip(params, zs, strict=True):
                p -= 2 * spec.eps * z
            lm = float(ref.model(**batch).loss)
            for p, z in zip(params, zs, strict=True):
                p += spec.eps * z
            g = (lp - lm) / (2 * spec.eps)
            for p, z in zip(params, zs, strict=True):
                p -= spec.lr * g * z
        pool[k] = pool.get(k, 0.0) + g
    return pool, _params(ref)


@pytest.mark.parametrize("direction,backend", [("gaussian", "numba"), ("rademacher", "numba"), ("gaussian", "numpy")])
def test_fit_matches_a_straightforward_reference_of_the_fedkseed_rule(tiny, direction, backend):
    spec = ZoSpec(seed=11, num_seeds=16, eps=1e-2, lr=1e-3, direction=direction)
    method = _method(tiny, workers=2, backend=backend)
    res = method.fit(EXAMPLES, FIT, spec=spec)
    ref_pool, ref_params = _reference_fit(tiny, spec, FIT)
    assert res.steps == FIT.local_steps and math.isfinite(res.train_loss)
    assert sorted(method.last_pool) == sorted(ref_pool)  # same seeds drawn
    for k, g in ref_pool.items():
        assert method.last_pool[k] == pytest.approx(g, rel=1e-3, abs=1e-3)
    for name, p in method.trainable_state().items():
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-5)

    # Replaying a ledger round equals the server rule written plainly: theta -= lr * sum_i w_i g_i * z.
    entry = _ledger_round(1, spec, [ref_pool, {0: 0.5}], [3, 1])
    fresh, expect = _method(tiny), _params(_method(tiny, workers=1))
    fresh.apply_round(entry)
    seeds = candidate_seeds(spec.seed, spec.num_seeds)
    weighted = {k: 0.75 * g for k, g in ref_pool.items()}
    weighted[0] = weighted.get(0, 0.0) + 0.25 * 0.5
    for k in sorted(weighted):
        for i, p in enumerate(expect.values()):
            z = draw_direction(seeds[k], i, p.numel(), spec.direction).view(p.shape)
            p -= spec.lr * float(np.float32(weighted[k])) * z
    for name, p in fresh.trainable_state().items():
        torch.testing.assert_close(p, expect[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("target,backend", [("full", "numba"), ("full", "numpy"), ("lora", None)])
def test_training_then_applying_the_round_equals_not_training(tiny, target, backend, tmp_path):
    spec = ZoSpec(seed=3, num_seeds=32, eps=1e-2, lr=1e-3, target=target)
    trained, idle = _method(tiny, target, backend=backend), _method(tiny, target, backend=backend)
    trained.snapshot(tmp_path / "pre.pt")
    trained.fit(EXAMPLES, FIT, spec=spec)
    assert trained.param_digest() != idle.param_digest()
    entry = _ledger_round(1, spec, [trained.last_pool, {1: 0.25}], [12, 12])
    trained.restore(tmp_path / "pre.pt")
    assert trained.param_digest() == _method(tiny, target).param_digest()
    trained.apply_round(entry)
    idle.apply_round(entry)
    assert trained.param_digest() == idle.param_digest()
    for name, p in idle.trainable_state().items():
        assert torch.equal(p, trained.trainable_state()[name]), name


@pytest.mark.parametrize("target", ["full", "lora"])
def test_zo_method_evaluates_held_out_data_with_and_without_a_memory_plan(tiny, target):
    method = _method(tiny, target)
    loss, n = method.evaluate(EXAMPLES, FIT)
    assert n > 0 and math.isfinite(loss)
    from edge_agent.methods.base import FitMemory

    plan = FitMemory(micro_batch=2)  # a memory plan's micro-batch: the same loss, less activation memory
    assert method.evaluate(EXAMPLES, FIT, memory=plan)[0] == pytest.approx(loss, rel=1e-5)


def test_lora_target_trains_only_the_adapter_of_an_nf4_base(tiny):
    method = get_method("zo")(tiny, m.AdapterSpec(), device="cpu", target="lora")
    assert all(".lora_" in n for n in method.trainable_state())
    assert any(type(mod).__name__ == "Linear4bit" for mod in method.model.modules())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters() if ".lora_" not in n}
    method.fit(EXAMPLES, FIT, spec=ZoSpec(num_seeds=8, eps=1e-2, lr=1e-3, target="lora"))
    # bitsandbytes may have repacked the 4-bit weights for its CPU inference kernel: compare in
    # the original layout
    disable_cpu_inference_packing(method.model)
    for n, p in method.model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def _replay_in_process(jobs: list[str], threads: int, workers: int) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.zo_replay_worker", str(threads), str(workers), *jobs],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    digests = {}
    for line in out.stdout.splitlines():
        if line.startswith("DIGEST"):
            _, got_threads, job, digest = line.split()
            assert int(got_threads) == threads
            digests[job] = digest
    assert sorted(digests) == sorted(jobs)
    return digests


def test_two_processes_with_different_thread_counts_replay_a_ledger_to_identical_bits(tmp_path):
    rng = np.random.default_rng(0)
    jobs = []
    # (model, target, direction, rounds): SmolLM2's 28M-element embedding is split across workers
    for model, target, direction, rounds in [("tiny-llama", "full", "gaussian", 3),
                                             ("tiny-llama", "lora", "rademacher", 3),
                                             ("smollm2-135m", "full", "gaussian", 1)]:
        spec = ZoSpec(seed=5, num_seeds=4096, eps=1e-3, lr=1e-4, target=target, direction=direction)
        entries = []
        for r in range(1, rounds + 1):
            pools = [{int(k): float(rng.normal() * 10) for k in rng.choice(4096, 2, replace=False)} for _ in range(2)]
            entries.append(_ledger_round(r, spec, pools, [10, 30]))
        ledger = tmp_path / f"{model}-{target}.msgpack"
        ledger.write_bytes(msgpack.packb([e.model_dump(by_alias=True) for e in entries], use_bin_type=True))
        jobs.append(f"{model}:{target}:{ledger}")
    a = _replay_in_process(jobs, threads=1, workers=1)
    b = _replay_in_process(jobs, threads=2, workers=3)
    assert a == b
    assert len(set(a.values())) == len(jobs)  # and the ledgers did change the models differently


# ------------------------------------------------------------------ coordinator side (torch-free)
def test_fedkseed_pro_probabilities_favour_seeds_with_large_gradients():
    p = pro_probabilities({0: [10.0, -30.0], 1: [1.0], 2: [5000.0]}, 4)
    # scores: mean|clip| = 20, 1, 1000 (clipped), 0 -> minmax -> softmax
    norm = np.array([20, 1, 1000, 0]) / 1000
    expect = np.exp(norm) / np.exp(norm).sum()
    np.testing.assert_allclose(p, expect, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0) and p[2] > p[0] > p[1] > p[3]
    np.testing.assert_allclose(pro_probabilities({}, 5), np.full(5, 0.2))


def test_pro_sampling_draws_seeds_by_the_task_probabilities(tiny):
    probs = np.zeros(8, dtype="<f4")
    probs[[2, 5]] = 0.5
    task = ZoTask(num_seeds=8, eps=1e-2, lr=1e-4, pro=True, probabilities=probs.tobytes())
    method = _method(tiny)
    method.fit(EXAMPLES, FIT, spec=task, probabilities=task.probability_array())
    assert set(method.last_pool) <= {2, 5}
    with pytest.raises(ValueError):
        ZoTask(num_seeds=8, probabilities=np.ones(8, dtype="<f4").tobytes())


def _upd(pool: dict[int, float], fp: str = "abc", n: int = 10, dev: str = "d0") -> m.Update:
    idx, g = pack_pool(pool)
    return m.Update(kind="fit", task_id="t", round=1, device_id=dev, base_version=0, num_samples=n,
                    zo=ZoUpdate(base_fingerprint=fp, indices=idx, g=g))


def test_coordinator_aggregates_sample_weighted_g_into_a_persisted_ledger(tmp_path):
    cfg = CoordinatorConfig(zo={"num_seeds": 16, "pro": True}, min_clients=2)
    mode = ZoMode(cfg)
    state = CoordinatorState()
    mode.restore(state)
    assert mode.initial_global().tensors.empty  # version 0 is the base checkpoint itself
    payload = mode.task_payload("fit", 1)
    assert payload.num_seeds == 16 and payload.probabilities is not None
    a, b = _upd({1: 2.0, 3: -1.0}, n=10), _upd({3: 4.0}, n=30, dev="d1")
    contributions = [mode.validate_update(u) for u in (a, b)]
    outcome = mode.aggregate(1, 1, [a, b], contributions)
    assert outcome.message.is_snapshot and outcome.message.tensors.empty
    state.global_model, state.mode_state, state.round_completed = outcome.snapshot, mode.state_blob(), 1
    entry = mode.ledger[0]
    assert entry.entries() == [(1, pytest.approx(0.5)), (3, pytest.approx(-0.25 + 3.0))]
    assert entry.spec.base_fingerprint == "abc"
    with pytest.raises(ProtocolError, match="base"):
        mode.validate_update(_upd({1: 1.0}, fp="other"))
    store = FileStateStore(tmp_path)
    store.save(state)
    loaded = store.load()
    reloaded = ZoMode(cfg)
    reloaded.restore(loaded)
    assert loaded is not None and reloaded.ledger == mode.ledger
    # the published retained ledger round decodes to the same entry, once per process
    msgs = mode.retained_messages("fedmq/x")
    assert [t for t, _ in msgs] == ["fedmq/x/zo/ledger/1"]
    assert ZoLedgerRound.from_msgpack(msgs[0][1]) == entry
    assert mode.retained_messages("fedmq/x") == []
    # Pro probabilities now favour the seeds that moved
    p = np.frombuffer(reloaded.task_payload("fit", 2).probabilities, dtype="<f4")
    assert p[3] > p[1] > p[0]


def test_ledger_rounds_beyond_the_last_completed_round_are_dropped_on_load(tmp_path):
    cfg = CoordinatorConfig(zo={"num_seeds": 4})
    ledger = [aggregate_round(r, cfg.mode_options, None, [(1, _upd({0: 1.0}).payload)]) for r in (1, 2)]
    mode = ZoMode(cfg)
    mode.ledger = ledger
    state = CoordinatorState(round_completed=1, global_model=mode.initial_global(), mode_state=mode.state_blob())
    FileStateStore(tmp_path).save(state)
    reloaded = ZoMode(cfg)
    reloaded.restore(FileStateStore(tmp_path).load())
    assert [e.round for e in reloaded.ledger] == [1]


@pytest.mark.parametrize("bad,reason", [
    (lambda u: u.model_copy(update={"payload": None}), "no seed pool"),
    (lambda u: u.model_copy(update={"payload": u.payload.model_copy(
        update={"indices": b"\x02\x00\x01\x00", "g": b"\0" * 8})}), "ascending"),
    (lambda u: u.model_copy(update={"payload": u.payload.model_copy(update={"indices": b"\x63\x00"})}), "below 16"),
    (lambda u: u.model_copy(update={"payload": u.payload.model_copy(
        update={"g": np.float32(np.nan).tobytes()})}), "non-finite"),
    (lambda u: u.model_copy(update={"payload": u.payload.model_copy(update={"g": b"\0" * 8})}), "pair"),
])
def test_malformed_zo_updates_are_refused_with_a_reason(bad, reason):
    mode = ZoMode(CoordinatorConfig(zo={"num_seeds": 16}))
    with pytest.raises(ProtocolError, match=reason):
        mode.validate_update(bad(_upd({1: 1.0})))


def test_zo_payloads_round_trip_through_msgpack_and_stay_small():
    pool = {i * 20: float(i) / 7 for i in range(200)}
    upd = _upd(pool)
    data = upd.to_msgpack()
    assert m.Update.from_msgpack(data) == upd
    assert len(data) < 200 * 6 + 200  # 6 bytes per seed plus the envelope
    task = m.Task(kind="fit", task_id="t", round=1, device_id="d", global_version=0, deadline_s=5,
                  adapter=m.AdapterSpec(), zo=ZoTask(seed=9, num_seeds=4096))
    assert m.Task.from_msgpack(task.to_msgpack()) == task and len(task.to_msgpack()) < 600


def test_zo_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_seed"):
        CoordinatorConfig(zo={"num_seed": 4})
    with pytest.raises(ValueError, match="direction"):
        CoordinatorConfig(zo={"direction": "uniform"})
    with pytest.raises(ValueError, match="num_seeds"):
        CoordinatorConfig(zo={"num_seeds": 70000})


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_grouped_replay_is_bitwise_one_pass_per_seed_in_index_order(tiny, direction):
    spec = ZoSpec(seed=8, num_seeds=256, eps=1e-3, lr=1e-3, direction=direction)
    pool = {k: (k % 7 - 3) * 0.37 for k in range(0, 256, 9)}  # 29 seeds: several groups
    entry = _ledger_round(1, spec, [pool], [1])
    grouped, sequential = _method(tiny, backend="numba"), _method(tiny, backend="numpy")
    grouped.apply_round(entry)
    seeds = candidate_seeds(spec.seed, spec.num_seeds)
    for k, g in entry.entries():
        sequential.perturb(seeds[k], -spec.lr * g, direction)
    assert grouped.param_digest() == sequential.param_digest()


def test_agents_drawing_with_either_backend_hold_the_same_bits(tiny, tmp_path):
    """A LoRA-sized device (numpy backend) and a large one (numba kernels) replay to the same bits."""
    spec = ZoSpec(seed=4, num_seeds=64, eps=1e-2, lr=1e-3)
    small, large = _method(tiny, backend="numpy"), _method(tiny, backend="numba", workers=2)
    assert (small._perturb.backend, large._perturb.backend) == ("numpy", "numba")
    small.snapshot(tmp_path / "pre.pt")
    small.fit(EXAMPLES, FIT, spec=spec)
    entry = _ledger_round(1, spec, [small.last_pool, {3: -0.5}], [12, 4])
    small.restore(tmp_path / "pre.pt")
    small.apply_round(entry)
    large.apply_round(entry)
    assert small.param_digest() == large.param_digest()
    assert _method(tiny)._perturb.backend == "numpy"  # 90 k elements: below NUMPY_MAX_ELEMENTS
