"""FedKRSO: projections, the client rule against a plain reference, applying rounds bit for bit,
catch-up from a checkpoint, the coordinator's validation, memory plans."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.modes.krso import KrsoMode as CoordKrso
from edge_agent.data import Example
from edge_agent.methods import krso as krso_method
from edge_agent.methods import zo_directions
from edge_agent.methods.base import BatchSampler
from edge_agent.methods.krso import KrsoMethod, apply_terms, projection
from edge_agent.models import resolve_model
from edge_agent.modes import AgentContext
from edge_agent.modes.krso import KrsoMode as AgentKrso
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes import krso as K
from fedmq_protocol.modes.zo import param_seed
from fedmq_protocol.topics import Topics

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [Example(prompt=f"What is {i} plus {i}?", response=f"{2 * i}") for i in range(12)]
FIT = m.FitConfig(local_steps=4, batch_size=3, max_seq_len=32, seed=5, lr=1e-2)
SPEC = K.KrsoSpec(seed=3, num_seeds=4, rank=4, interval=2, checkpoint_every=2)
TOPICS = Topics("fedmq", "test")


@pytest.fixture(scope="module")
def tiny() -> str:
    return resolve_model("tiny-llama")


def _method(path: str, **kw) -> KrsoMethod:
    return KrsoMethod(path, m.AdapterSpec(), device="cpu", **kw)


def _task_payload(round_no: int, spec: K.KrsoSpec = SPEC) -> K.KrsoTask:
    return K.KrsoTask(**spec.model_dump(), round_seed=K.round_seed(spec.seed, round_no))


# -- projections ------------------------------------------------------------------------------------
def test_projection_has_unit_second_moment_and_the_same_bits_on_both_generator_backends():
    r, d_in = 256, 6
    p = projection(12345, 7, r, d_in)
    assert p.shape == (r, d_in) and p.dtype == np.float32
    ptp = p.astype(np.float64).T @ p.astype(np.float64)  # E[P^T P] = I
    assert np.allclose(np.diag(ptp), 1.0, atol=0.25) and np.abs(ptp - np.diag(np.diag(ptp))).max() < 0.3
    z = zo_directions.draw(param_seed(12345, 7), r * d_in, "gaussian", backend="numba")
    assert np.array_equal((z * np.float32(1 / np.sqrt(r))).reshape(r, d_in), p)
    assert not np.array_equal(projection(12345, 8, r, d_in), p)  # another parameter, another P


def test_round_seeds_are_a_fresh_draw_every_round():
    a, b = K.round_seeds(SPEC, 1), K.round_seeds(SPEC, 2)
    assert len(a) == len(set(a)) == SPEC.num_seeds and not set(a) & set(b)
    assert _task_payload(1).seeds() == a


# -- the client rule --------------------------------------------------------------------------------
def _reference_fit(meth: KrsoMethod, examples, cfg: m.FitConfig, spec: K.KrsoSpec, seeds):
    """The rule written out plainly: per interval one seed, B = 0, Adam on B in y = (W + B P) x,
    then W += B P and acc[W][s] += B."""
    model = meth.model
    index: dict[int, int] = {}
    for _, p in model.named_parameters():
        index.setdefault(id(p), len(index))
    head = model.get_output_embeddings()
    linears = [(f"{n}.weight", mod) for n, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and mod is not head]
    encoded = [meth._encode(ex, cfg.max_seq_len) for ex in examples]
    sampler = BatchSampler(len(encoded), cfg.batch_size, cfg.seed)
    rng = random.Random(f"krso-seeds:{cfg.seed}")
    acc: dict[str, np.ndarray] = {}
    model.train()
    torch.manual_seed(cfg.seed)
    steps = 0
    while steps < cfg.local_steps:
        s = seeds[rng.randrange(len(seeds))]
        ps = {n: torch.from_numpy(projection(s, index[id(mod.weight)], spec.rank, mod.in_features))
              for n, mod in linears}
        bs = {n: torch.zeros(mod.out_features, spec.rank, requires_grad=True) for n, mod in linears}
        opt = torch.optim.Adam(list(bs.values()), lr=cfg.lr, weight_decay=0.0)
        for n, mod in linears:
            mod.forward = (lambda x, mod=mod, b=bs[n], p=ps[n]:
                           torch.nn.functional.linear(x, mod.weight + b @ p, mod.bias))
        for _ in range(min(spec.interval, cfg.local_steps - steps)):
            opt.zero_grad()
            loss = model(**meth._collate([encoded[j] for j in sampler.next()])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(bs.values()), cfg.max_grad_norm)
            opt.step()
            steps += 1
        with torch.no_grad():
            for n, mod in linears:
                del mod.forward
                mod.weight += bs[n] @ ps[n]
                key = K.tensor_name(s, n)
                acc[key] = acc.get(key, 0) + bs[n].detach().numpy()
    model.eval()
    return acc


def test_fit_matches_a_straightforward_reference_of_the_rule(tiny):
    task = _task_payload(1)
    cfg = FIT.model_copy(update={"local_steps": 5})  # a short last interval too
    a, ref = _method(tiny), _method(tiny)
    a.fit(EXAMPLES, cfg, spec=task.spec(), seeds=task.seeds())
    expected = _reference_fit(ref, EXAMPLES, cfg, task.spec(), task.seeds())
    assert sorted(a.last_acc) == sorted(expected) and len({k.split("/")[0] for k in expected}) == len(a.last_seeds)
    assert len(a.last_acc) == len(a.target_names()) * len(a.last_seeds)
    for k, v in expected.items():
        np.testing.assert_allclose(a.last_acc[k], v, rtol=1e-4, atol=1e-6, err_msg=k)
        assert np.abs(v).max() > 0
    # Adam divides by sqrt(v): last-bit differences of the two forward formulas grow to ~1e-6 in W
    wa, wr = a.get_state(), ref.get_state()
    for k in wa:
        np.testing.assert_allclose(wa[k], wr[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_targets_follow_target_modules_and_the_head_is_never_trained(tiny):
    qv = _method(tiny, target_modules=("q_proj", "v_proj"))
    assert qv.target_names() and all(n.rsplit(".", 2)[-2] in ("q_proj", "v_proj") for n in qv.target_names())
    every = _method(tiny)
    assert len(every.target_names()) == 7 * len(qv.target_names()) // 2
    assert not any("lm_head" in n or "embed" in n for n in every.target_names())
    with pytest.raises(ValueError, match="match no linear layer"):
        _method(tiny, target_modules=("nonexistent_proj",))


# -- applying rounds --------------------------------------------------------------------------------
def _round_entry(round_no: int, methods: list[KrsoMethod], spec: K.KrsoSpec = SPEC, samples=None) -> K.KrsoLedgerRound:
    task = _task_payload(round_no, spec)
    ups = []
    for i, meth in enumerate(methods):
        meth.fit(EXAMPLES[i::len(methods)] * 2, FIT.model_copy(update={"seed": round_no * 10 + i}),
                 spec=task.spec(), seeds=task.seeds())
        ups.append(((samples or [1] * len(methods))[i], dict(meth.last_acc)))
    return K.aggregate_round(round_no, spec, task.round_seed, ups)


def test_apply_terms_is_W_plus_sum_B_P_whatever_the_backend_and_row_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 29)).astype(np.float32)
    b, p = rng.standard_normal((37, 12)).astype(np.float32), rng.standard_normal((12, 29)).astype(np.float32)
    one = w.copy()
    apply_terms(one, b, p)
    np.testing.assert_allclose(one, w.astype(np.float64) + b.astype(np.float64) @ p.astype(np.float64), rtol=1e-6)
    monkeypatch.setattr(krso_method, "APPLY_BLOCK_BYTES", 8 * 29 * 3)  # 3 rows per block
    other = w.copy()
    apply_terms(other, b, p)
    assert np.array_equal(one, other)
    compiled = w.copy()
    apply_terms(compiled, b, p, backend="numba")  # the kernels' loop: the same bits
    assert np.array_equal(one, compiled)


def test_training_then_applying_the_round_equals_only_applying_it(tiny, tmp_path):
    trained, idle = _method(tiny), _method(tiny)
    assert trained.weights_digest() == idle.weights_digest()
    snap = tmp_path / "start.pt"
    trained.snapshot(snap)
    entry = _round_entry(1, [trained])  # trained merges locally
    assert trained.weights_digest() != idle.weights_digest()
    trained.restore(snap)  # undo the local merges, then the round
    trained.apply_round(entry)
    idle.apply_round(K.KrsoLedgerRound.from_msgpack(entry.to_msgpack()))
    assert trained.weights_digest() == idle.weights_digest()


def test_two_processes_with_different_thread_counts_apply_rounds_to_the_same_bits(tiny, tmp_path):
    meth = _method(tiny)
    snap = tmp_path / "s.pt"
    entries = []
    for r in (1, 2):
        meth.snapshot(snap)
        entries.append(_round_entry(r, [meth], samples=[3]))
        meth.restore(snap)
        meth.apply_round(entries[-1])
    ledger = tmp_path / "ledger.msgpack"
    ledger.write_bytes(msgpack.packb([e.to_obj() for e in entries], use_bin_type=True))
    digests = set()
    for threads in (1, 2):
        out = subprocess.run([sys.executable, "-m", "tests.krso_replay_worker", str(threads), tiny, str(ledger)],
                             cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("DIGEST"))
        assert line.split()[1] == str(threads)
        digests.add(line.split()[2])
    assert digests == {meth.weights_digest()}


# -- a federation in process: the coordinator's and agents' mode objects -----------------------------
class Device:
    def __init__(self, path: str, name: str, tmp: Path) -> None:
        cfg = SimpleNamespace(broker=SimpleNamespace(max_message_bytes=1 << 30))
        (tmp / name).mkdir()
        self.name = name
        self.mode = AgentKrso(AgentContext(cfg, TOPICS, tmp / name, lambda *a, **k: None))  # type: ignore[arg-type]
        self.method = _method(path)
        self.mode.trainer_loaded(self.method)
        self.dirty = False

    def receive(self, retained: dict[str, bytes]) -> None:
        for topic, payload in retained.items():
            self.mode.on_message("checkpoint" if topic.endswith("/checkpoint") else "ledger", topic, payload)

    def reach(self, version: int) -> None:
        assert self.mode.can_reach(version)
        if self.dirty:
            self.mode.return_to_global(self.method)
            self.dirty = False
        self.mode.apply_global(self.method, version, None)  # type: ignore[arg-type]

    def fit(self, coord: CoordKrso, round_no: int, i: int) -> m.Update:
        task = m.Task(kind="fit", task_id=f"r{round_no}", round=round_no, device_id=self.name,
                      global_version=round_no - 1, deadline_s=60, adapter=m.AdapterSpec(),
                      fit=FIT.model_copy(update={"seed": round_no * 7919 + i}),
                      payload=coord.task_payload_for("fit", round_no, self.name))
        task = m.Task.from_msgpack(task.to_msgpack())
        self.mode.accept_task(task)
        self.mode.check_fit(task, self.method)
        self.mode.prepare_fit(task, self.method)
        self.dirty = True
        res = self.method.fit(EXAMPLES[i::3] * 2, task.fit, **self.mode.fit_options(task))
        content = self.mode.update_content(task, self.method, res)
        assert content.arrays is not None
        upd = m.Update(kind="fit", task_id=task.task_id, round=round_no, device_id=self.name,
                       base_version=round_no - 1, num_samples=res.num_samples,
                       tensors=encode(dict(content.arrays), CodecSpec(values="float32")), payload=content.payload)
        return m.Update.from_msgpack(upd.to_msgpack())


def _coordinator(tmp: Path, spec: K.KrsoSpec = SPEC) -> CoordKrso:
    return CoordKrso(CoordinatorConfig(state_dir=tmp / "coordinator", krso=spec.model_dump()))


def _publish(coord: CoordKrso, retained: dict[str, bytes]) -> None:
    for topic, payload in coord.retained_messages(TOPICS.base):
        if payload:
            retained[topic] = payload
        else:
            retained.pop(topic, None)  # an empty retained message clears the topic


def test_a_device_joining_at_round_5_catches_up_from_the_checkpoint_and_ends_equal(tiny, tmp_path):
    coord = _coordinator(tmp_path)
    retained: dict[str, bytes] = {}
    devices = [Device(tiny, f"dev-{i}", tmp_path) for i in range(2)]
    late = None
    for r in range(1, 7):
        if r == 5:  # a new device: it sees only what the broker retains now
            late = Device(tiny, "dev-2", tmp_path)
            late.receive(retained)
            late.reach(4)
            devices.append(late)
            ledger_rounds = sorted(int(t.rsplit("/", 1)[1]) for t in retained if "/ledger/" in t)
            # round 3 carried the checkpoint of round 2 (every 2 rounds): it and rounds 3, 4 are retained
            assert ledger_rounds == [3, 4] and late.mode.checkpoints_loaded == 1
        ups = [d.fit(coord, r, i) for i, d in enumerate(devices)]
        contribs = [coord.validate_update(u) for u in ups]
        coord.aggregate(r, r, ups, contribs)
        _publish(coord, retained)
        for d in devices:
            d.receive(retained)
            d.reach(r)
        assert len({d.method.weights_digest() for d in devices}) == 1, f"round {r}"
    assert late is not None and late.mode.applied_round == 6
    assert coord.checkpoint_round == 4 and [e.round for e in coord.ledger] == [5, 6]  # bounded: compacted
    # the persisted state comes back
    again = _coordinator(tmp_path)
    again.restore(SimpleNamespace(mode_state=coord.state_blob(), round_completed=6))  # type: ignore[arg-type]
    assert again.checkpoint_round == 4 and [e.round for e in again.ledger] == [5, 6]
    assert again.shapes == coord.shapes


def _bad(upd: m.Update, **change) -> m.Update:
    return upd.model_copy(update=change)


def test_bad_updates_are_refused_with_a_reason_and_counted_and_the_accepted_kept(tiny, tmp_path):
    coord = _coordinator(tmp_path)
    dev = Device(tiny, "dev-0", tmp_path)
    dev2 = Device(tiny, "dev-1", tmp_path)
    first = [dev.fit(coord, 1, 0), dev2.fit(coord, 1, 1)]
    coord.aggregate(1, 1, first, [coord.validate_update(u) for u in first])
    retained = dict(coord.retained_messages(TOPICS.base))
    for d in (dev, dev2):
        d.receive(retained)
        d.reach(1)
    good = dev.fit(coord, 2, 0)
    assert isinstance(good.payload, K.KrsoUpdate)
    arrays = good.tensors.decode_dense(max_elements=1 << 24)
    seed = good.payload.seeds[0]
    name = next(k for k in arrays if k.startswith(f"{seed}/"))

    def with_arrays(new: dict, seeds=None) -> m.Update:
        payload = good.payload.model_copy(update={"seeds": tuple(sorted(seeds or good.payload.seeds))})
        return _bad(good, tensors=encode(new, CodecSpec(values="float32")), payload=payload)

    def renamed(to: int) -> dict:
        return {(k.replace(f"{seed}/", f"{to}/", 1) if k.startswith(f"{seed}/") else k): v for k, v in arrays.items()}

    previous = K.round_seeds(SPEC, 1)[0]
    cases = {
        "unknown_seed": with_arrays(renamed(4242), seeds=[4242, *good.payload.seeds[1:]]),
        "seed_not_in_round": with_arrays(renamed(previous), seeds=[previous, *good.payload.seeds[1:]]),
        "shape": with_arrays({**arrays, name: np.zeros((arrays[name].shape[0] + 1, SPEC.rank), np.float32)}),
        "non_finite": with_arrays({**arrays, name: np.full(arrays[name].shape, np.nan, np.float32)}),
        "round_seed": _bad(good, payload=good.payload.model_copy(update={"round_seed": K.round_seed(SPEC.seed, 1)})),
        "weights": with_arrays({k: v for k, v in arrays.items() if k != name}),
        "diverged": _bad(good, payload=good.payload.model_copy(update={"start_digest": "f" * 32})),
    }
    coord.validate_update(good)  # the round's first: fixes the digest the round trained from
    for reason, upd in cases.items():
        with pytest.raises(ProtocolError, match=rf"\({reason}\)") as exc:
            coord.validate_update(upd)
        assert str(exc.value)
    assert dict(coord.refused) == dict.fromkeys(cases, 1)
    other = dev2.fit(coord, 2, 1)
    ups = [good, other]
    contribs = [coord.validate_update(u) for u in ups]
    entry = coord.aggregate(2, 2, ups, contribs) and coord.ledger[-1]
    total = sum(u.num_samples for u in ups)
    want: dict[str, np.ndarray] = {}
    for u in ups:
        for k, v in u.tensors.decode_dense(max_elements=1 << 24).items():
            want[k] = want.get(k, 0) + v.astype(np.float64) * u.num_samples / total
    got = entry.tensors.decode_dense(max_elements=1 << 24)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k].astype(np.float32))
    assert coord.state_blob()["refused"] == dict.fromkeys(cases, 1)


def test_the_coordinator_side_imports_no_torch():
    code = ("import sys; import broker_coordinator.modes.krso, fedmq_protocol.modes.krso; "
            "bad = [m for m in ('torch', 'transformers', 'numba') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_config_section_validates_with_one_line_errors(tmp_path):
    cfg = CoordinatorConfig(krso={"rank": 16, "num_seeds": 8})
    assert cfg.mode == "krso" and cfg.mode_options == K.KrsoSpec(rank=16, num_seeds=8)
    with pytest.raises(ValueError, match="rank"):
        CoordinatorConfig(krso={"rank": 0})
    with pytest.raises(ValueError, match="stands alone"):
        CoordinatorConfig(krso={"target_modules": ["all-linear", "q_proj"]})
    assert all(f.description for f in K.KrsoSpec.model_fields.values())


# -- memory plans -----------------------------------------------------------------------------------
def test_memory_plans_for_krso_keep_a_full_precision_base_and_refuse_small_budgets(tiny):
    from edge_agent.memory import Budget, BudgetTooSmall, ModelShape, candidate_plans, choose_plan, estimate

    shape = ModelShape.from_path(tiny)
    plans = candidate_plans(shape, method="krso", batch_size=4, seq_len=64, lora_r=8, target_modules=("all-linear",))
    assert plans and {p.base for p in plans} == {"float32"} and {p.method for p in plans} == {"krso"}
    assert any(p.gradient_checkpointing for p in plans)
    krso_host, _, b = estimate(shape, method="krso", base="float32", micro_batch=4, seq_len=64, lora_r=8,
                               target_modules=("all-linear",))
    lora_host, _, _ = estimate(shape, method="lora", base="float32", micro_batch=4, seq_len=64, lora_r=8,
                               target_modules=("all-linear",))
    qlora_host, _, _ = estimate(shape, method="qlora", base="nf4", micro_batch=4, seq_len=64, lora_r=8,
                                target_modules=("all-linear",))
    assert qlora_host < lora_host and lora_host < krso_host < lora_host * 1.15
    assert {"projections", "accumulators", "merge"} <= set(b)
    with pytest.raises(ValueError, match="never nf4"):
        estimate(shape, method="krso", base="nf4", micro_batch=1, seq_len=64)
    with pytest.raises(BudgetTooSmall, match="krso") as exc:
        choose_plan(shape, Budget(host_mb=300), method="krso", batch_size=4, seq_len=64)
    assert exc.value.min_host_mb is not None and exc.value.min_host_mb > 300


def test_the_demo_runs_krso_with_a_krso_section_and_krso_agents(tmp_path, synth, tiny):
    import yaml

    from edge_agent.config import AgentConfig
    from fedmq.demo import DemoOptions, write_configs

    opts = DemoOptions(method="krso", agents=2, workdir=tmp_path)
    coord_path, agent_paths = write_configs(opts, "mqtt://127.0.0.1:1883", tiny, synth)
    coord = CoordinatorConfig(**yaml.safe_load(coord_path.read_text()))
    assert coord.mode == "krso" and isinstance(coord.mode_options, K.KrsoSpec) and coord.fit.lr == 3e-4
    agent = AgentConfig(**yaml.safe_load(agent_paths[0].read_text()))
    assert agent.method == "krso" and agent.mode == "krso"
