"""KD-FedLLM on a real Mosquitto: coordinator and 3 agents as processes, models of two sizes."""

from __future__ import annotations

import json

import msgpack
import numpy as np

from edge_agent.data import synthesize
from fedmq_protocol.modes.kd import KdConsensus, KdUpdate
from fedmq_protocol.topics import Topics
from tests.federation import Capture, agent_config, coordinator_config, spawn, stop_all
from tests.kd_helpers import write_probe_set
from tests.tiny_model import ALL_LINEAR

MODELS = ["tiny-llama", "tiny-llama:blocks=1", "tiny-llama"]  # 2 blocks, 1 block: one byte-level tokenizer


def test_three_devices_of_two_sizes_distil_and_their_probe_kl_to_the_consensus_falls(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=64 * 1024)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=24, eval_samples=6, seed=5)
    probes = write_probe_set(tmp_path / "probes.jsonl", per_family=1)
    chunked = {"chunk_size": 8192}
    capture = Capture(broker.url, Topics("fedmq", "test"), chunk_size=8192).start()
    kd = {"probe_path": str(probes), "top_k": 8, "lambda": 2.0, "max_response_tokens": 8, "probe_batch_size": 4}
    coord_cfg = coordinator_config(
        tmp_path, broker.url, rounds=3, min_clients=3, broker=chunked, kd=kd, evaluate=False,
        adapter={"r": 4, "alpha": 8, "target_modules": list(ALL_LINEAR)},
        fit={"local_steps": 10, "lr": 1e-2, "batch_size": 4, "max_seq_len": 64})
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, model=model, method="kd",
                                                          broker=chunked))],
                   tmp_path / f"a{i}.log") for i, model in enumerate(MODELS)]
    try:
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        procs.append(coord)
        assert coord.wait(timeout=400) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        stop_all(procs)
        capture.close()

    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    assert [h["round"] for h in state["history"]] == [1, 2, 3]
    assert all(sorted(h["participants"]) == ["dev-0", "dev-1", "dev-2"] for h in state["history"])
    blob = msgpack.unpackb((tmp_path / "coordinator" / state["mode_state_file"]).read_bytes(), raw=False)
    assert blob["refused"] == {}
    cons = KdConsensus.model_validate(blob["consensus"])
    assert cons.round == 3 and cons.num_devices == 3 and sum(cons.positions) == sum(blob["positions"])

    # Updates are top-k log-probs on the probe set, no adapter tensors: the two sizes never mix weights
    fits = [u for u in capture.updates if u.kind == "fit"]
    assert len(fits) == 9 and all(u.tensors.empty and isinstance(u.payload, KdUpdate) for u in fits)
    assert len({u.payload.tokenizer for u in fits}) == 1
    # each device's status named that tokenizer before it was tasked (the coordinator records it)
    assert {d["tokenizer"] for d in state["devices"].values()} == {fits[0].payload.tokenizer}

    # Distillation: each device's KL to the last consensus falls while it trains (rounds 2, 3) and
    # the federation's KL to its consensus is lower in round 3 than at the start of round 2
    kl = blob["kl"]
    assert "kd_kl" not in kl["1"]["dev-0"]  # no consensus to distil from in round 1
    for r in ("2", "3"):
        for dev, metrics in kl[r].items():
            assert metrics["kd_kl"] < metrics["kd_kl_before"], (r, dev, metrics)
    start = np.mean([kl["2"][d]["kd_kl_before"] for d in kl["2"]])
    end = np.mean([kl["3"][d]["kd_kl"] for d in kl["3"]])
    assert end < start, (start, end)

    # every device kept its own adapter; the 1-block model's has half the tensors of the 2-block one
    adapters = [np.load(tmp_path / f"agent-{i}" / "kd-adapter.npz") for i in range(3)]
    assert len(adapters[1].files) * 2 == len(adapters[0].files) == len(adapters[2].files)


def test_kd_demo_runs_two_model_sizes(tmp_path, mosquitto):
    import subprocess
    import sys

    import yaml

    from tests.federation import REPO

    summary, work = tmp_path / "summary.json", tmp_path / "work"
    args = [sys.executable, "-m", "fedmq", "demo", "--model", "tiny-llama", "--method", "kd", "--agents", "2",
            "--rounds", "2", "--local-steps", "4", "--lr", "0.01", "--workdir", str(work), "--summary", str(summary),
            "--broker", mosquitto().url]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads(summary.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(len(r["participants"]) == 2 and r["eval_devices"] == 2 for r in rounds[1:])
    models = [yaml.safe_load((work / f"agent-{i}.yaml").read_text())["model"] for i in range(2)]
    assert models[1] == f"{models[0]}:spread=1"  # tiny-llama has 2 blocks: the second device runs 1
    coord = yaml.safe_load((work / "coordinator.yaml").read_text())
    assert coord["kd"]["probe_path"].endswith("probes.jsonl") and coord["model"] is None
