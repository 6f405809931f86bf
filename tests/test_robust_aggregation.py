"""Robust aggregation (update-norm clipping, coordinate-wise trimmed mean / median): unit tests over
decoded tensors, and end to end over Mosquitto with one agent process sending a sign-flipped x100
update (fault injection: the agent runs through tests/faulty_agent.py)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from broker_coordinator import robust
from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.robust import AggregationConfig, clip_scales, robust_delta
from broker_coordinator.strategy import FedAvg
from fedmq.configfile import ConfigError, validate_config
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode

SHAPES = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (64, 8), "b.lora_A.weight": (3, 5)}


def _updates(n_honest: int, attack: float | None, seed: int = 0, sparse: bool = False):
    rng = np.random.default_rng(seed)
    mean = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    honest = [{k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in mean.items()}
              for _ in range(n_honest)]
    deltas = honest + ([{k: v * np.float32(attack) for k, v in honest[0].items()}] if attack is not None else [])
    spec = CodecSpec(density=0.5 if sparse else 1.0)
    ups = [m.Update(kind="fit", task_id="t", round=1, device_id=f"d{i}", base_version=0, num_samples=10 + i,
                    tensors=encode(d, spec)) for i, d in enumerate(deltas)]
    decoded = [u.tensors.decode(max_elements=10_000, expected=SHAPES) for u in ups]
    honest_dense = [{k: d[k].dense() for k in SHAPES} for d in decoded[:n_honest]]
    honest_mean = {k: np.mean([h[k] for h in honest_dense], axis=0) for k in SHAPES}
    return ups, decoded, honest_dense, honest_mean


def _dist(a, b) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in SHAPES)))


GLOBAL = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("attack", [100.0, -1.0, -100.0])
@pytest.mark.parametrize("rule", ["trimmed_mean", "median"])
def test_one_bad_device_moves_robust_rules_less_than_the_honest_spread(rule, attack):
    ups, decoded, honest, honest_mean = _updates(4, attack)
    cfg = AggregationConfig(rule=rule, trim_fraction=0.2)
    got = FedAvg(aggregation=cfg).aggregate_deltas(GLOBAL, ups, decoded)
    spread = max(_dist(h, honest_mean) for h in honest)
    fedavg = FedAvg().aggregate_deltas(GLOBAL, ups, decoded)
    assert _dist(got, honest_mean) < spread, (rule, attack)
    if abs(attack) >= 100:
        assert _dist(fedavg, honest_mean) > 10 * spread  # what the plain mean suffers


def test_trimmed_mean_and_median_values_exactly():
    vals = [1.0, 2.0, 3.0, 4.0, 1000.0]
    ups, decoded = [], []
    for i, v in enumerate(vals):
        u = m.Update(kind="fit", task_id="t", round=1, device_id=f"d{i}", base_version=0, num_samples=1,
                     tensors=encode({"x": np.full((2, 3), v, np.float32)}))
        ups.append(u)
        decoded.append(u.tensors.decode(max_elements=6, expected={"x": (2, 3)}))
    g = {"x": np.zeros((2, 3), np.float32)}
    tm = robust_delta(g, [1] * 5, decoded, AggregationConfig(rule="trimmed_mean", trim_fraction=0.2))
    np.testing.assert_allclose(tm["x"], 3.0)  # mean of 2, 3, 4
    md = robust_delta(g, [1] * 5, decoded, AggregationConfig(rule="median"))
    np.testing.assert_allclose(md["x"], 3.0)
    # trim 0 is the unweighted mean
    t0 = robust_delta(g, [1] * 5, decoded, AggregationConfig(rule="trimmed_mean", trim_fraction=0.0))
    np.testing.assert_allclose(t0["x"], np.mean(vals))


def test_clipping_bounds_each_update_norm():
    ups, decoded, honest, honest_mean = _updates(4, 100.0)
    norms = [robust.update_norm(d) for d in decoded]
    # absolute bound
    s = clip_scales(norms, AggregationConfig(clip_norm=1.0))
    assert all(abs(n * f - 1.0) < 1e-9 or n <= 1.0 for n, f in zip(norms, s, strict=True))
    # relative to the median: the x100 update is cut to 2x the median norm, the others untouched
    s = clip_scales(norms, AggregationConfig(clip_median_factor=2.0))
    med = float(np.median(norms))
    assert s[:4] == [1.0] * 4 and abs(norms[4] * s[4] - 2 * med) < 1e-6 * med
    # fedavg with clipping: the bad update's pull is bounded by 2x a typical norm
    got = FedAvg(aggregation=AggregationConfig(clip_median_factor=2.0)).aggregate_deltas(GLOBAL, ups, decoded)
    weight = ups[4].num_samples / sum(u.num_samples for u in ups)
    assert _dist(got, honest_mean) < max(_dist(h, honest_mean) for h in honest) + weight * 3 * med


def test_sparse_updates_and_chunking_give_the_same_result(monkeypatch):
    ups, decoded, _, _ = _updates(5, -100.0, seed=3, sparse=True)
    dense = [{k: type(t)(t.shape, t.dense().reshape(-1)) for k, t in d.items()} for d in decoded]
    cfg = AggregationConfig(rule="trimmed_mean", trim_fraction=0.2, clip_median_factor=3.0)
    a = robust_delta(GLOBAL, [u.num_samples for u in ups], decoded, cfg)
    monkeypatch.setattr(robust, "CHUNK_ELEMENTS", 7)
    b = robust_delta(GLOBAL, [u.num_samples for u in ups], dense, cfg)
    for k in SHAPES:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)


def test_aggregation_config_keys():
    cfg = validate_config({"aggregation": {"rule": "median", "clip_norm": 5}}, CoordinatorConfig)
    assert cfg.aggregation.rule == "median" and cfg.aggregation.clip_norm == 5
    assert validate_config({}, CoordinatorConfig).aggregation.is_plain
    with pytest.raises(ConfigError, match=r"aggregation\.trim_fraction"):
        validate_config({"aggregation": {"rule": "trimmed_mean", "trim_fraction": 0.5}}, CoordinatorConfig)
    with pytest.raises(ConfigError, match=r"aggregation\.rule"):
        validate_config({"aggregation": {"rule": "krum"}}, CoordinatorConfig)
    with pytest.raises(ConfigError, match="zo"):
        validate_config({"aggregation": {"rule": "median"}, "zo": {}}, CoordinatorConfig)


# ------------------------------------------------------------------------------ end to end

def test_sign_flipped_x100_agent_does_not_move_the_global(mosquitto, tmp_path):
    """Four agent processes (tiny model, LoRA) train one round; dev-3 sends -100 x its real update.
    With trimmed_mean (trim 0.25) + clipping at 3x the median norm the new global stays within the
    honest devices' spread around their average; plain FedAvg of the same updates would not."""
    from edge_agent.data import synthesize
    from fedmq_protocol.topics import Topics
    from tests.federation import Capture, agent_config, coordinator_config, spawn, stop_all

    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=4, samples_per_device=30, eval_samples=10, seed=2)
    capture = Capture(broker.url, Topics("fedmq", "test")).start()
    coord_cfg = coordinator_config(
        tmp_path, broker.url, rounds=1, min_clients=4, evaluate=False,
        fit={"local_steps": 4, "lr": 3e-3, "batch_size": 2, "max_seq_len": 32},
        aggregation={"rule": "trimmed_mean", "trim_fraction": 0.25, "clip_median_factor": 3.0},
    )
    procs = [spawn([*(["--update-scale=-100"] if i == 3 else []), "agent", "--config",
                    str(agent_config(tmp_path, i, broker.url, data))], tmp_path / f"a{i}.log",
                   module="tests.faulty_agent" if i == 3 else "fedmq")
             for i in range(4)]
    try:
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=400)
        assert rc == 0, (tmp_path / "coord.log").read_text()[-3000:]
        time.sleep(0.5)
    finally:
        stop_all(procs)
        capture.close()
    assert "FAULT INJECTION" in (tmp_path / "a3.log").read_text()
    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    assert state["global_version"] == 1
    fits = {u.device_id: u for u in capture.updates if u.kind == "fit"}
    assert sorted(fits) == ["dev-0", "dev-1", "dev-2", "dev-3"]
    names = list(capture.weights[0])
    shapes = {k: capture.weights[0][k].shape for k in names}
    dec = {d: {k: t.dense() for k, t in u.tensors.decode(max_elements=1 << 24, expected=shapes).items()}
           for d, u in fits.items()}
    honest = [dec[d] for d in ("dev-0", "dev-1", "dev-2")]
    honest_mean = {k: np.mean([h[k].astype(np.float64) for h in honest], axis=0) for k in names}

    def dist(a, b) -> float:
        return float(np.sqrt(sum(np.sum((np.asarray(a[k], np.float64) - b[k]) ** 2) for k in names)))

    got = {k: capture.weights[1][k].astype(np.float64) - capture.weights[0][k] for k in names}
    spread = max(dist(h, honest_mean) for h in honest)
    total = sum(u.num_samples for u in fits.values())
    fedavg = {k: sum(fits[d].num_samples / total * dec[d][k].astype(np.float64) for d in fits) for k in names}
    err, fedavg_err = dist(got, honest_mean), dist(fedavg, honest_mean)
    norm = dist(honest_mean, dict.fromkeys(names, 0))
    print(f"robust error {err:.3g}, plain fedavg error {fedavg_err:.3g}, honest spread {spread:.3g}, "
          f"honest mean norm {norm:.3g}")
    assert err <= spread
    assert fedavg_err > 10 * spread
