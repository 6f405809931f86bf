"""The wire messages pinned by tests/test_wire_golden.py, built from fixed fields.

``python tests/golden/build.py --write`` wrote the ``*.msgpack`` files beside it with the code of
protocol v1 before federation modes became plugins; the test builds the same messages with today's
code and requires the same bytes, and decodes every file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal((4, 16)).astype(np.float32),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": rng.standard_normal((16, 4)).astype(np.float32),
    }


def build() -> dict[str, bytes]:
    """name -> msgpack bytes (today's code: the message classes of fedmq_protocol)."""
    from fedmq_protocol import messages as m
    from fedmq_protocol.codec import CodecSpec, encode
    from fedmq_protocol.modes.zo import ZoLedgerRound, ZoSpec, ZoTask, ZoUpdate, aggregate_round, pack_pool

    adapter = m.AdapterSpec(r=4, alpha=8.0, target_modules=("q_proj",))
    fit = m.FitConfig(local_steps=5, lr=1e-3, batch_size=2, max_seq_len=64, seed=7919)
    nonce = bytes(range(16))
    arrays = _arrays()
    out: dict[str, bytes] = {}
    common = {"task_id": "r1-fit-v0-a0", "round": 1, "device_id": "dev-1", "global_version": 0, "deadline_s": 600.0,
              "adapter": adapter, "fit": fit, "model": "tiny-llama", "nonce": nonce}
    out["task_fit_adapter"] = m.Task(kind="fit", **common).to_msgpack()
    out["task_init"] = m.Task(kind="init", task_id="r0-init-v-1-a0", round=0, device_id="dev-1",
                              global_version=-1, deadline_s=600.0, adapter=adapter).to_msgpack()
    out["task_evaluate"] = m.Task(kind="evaluate", **{**common, "task_id": "r1-evaluate-v1-a0",
                                                      "global_version": 1}).to_msgpack()
    probs = np.full(8, 1 / 8, dtype="<f4").tobytes()
    zo_spec = ZoSpec(seed=11, num_seeds=8, eps=1e-3, lr=1e-6, direction="rademacher", target="lora",
                     base_fingerprint="ab" * 8)
    zo_task = ZoTask(**zo_spec.model_dump(), probabilities=probs)
    out["task_fit_zo"] = m.Task(kind="fit", **common, payload=zo_task).to_msgpack()

    delta = {k: v * np.float32(0.01) for k, v in arrays.items()}
    up = {"task_id": "r1-fit-v0-a0", "round": 1, "device_id": "dev-1", "base_version": 0, "num_samples": 12}
    out["update_fit_adapter"] = m.Update(
        kind="fit", **up, metrics={"train_loss": 1.25, "steps": 5.0},
        tensors=encode(delta, CodecSpec(values="int2", zstd=True)), nonce=nonce, signature=bytes(range(64)),
    ).to_msgpack()
    out["update_fit_adapter_sparse"] = m.Update(
        kind="fit", **up, tensors=encode(delta, CodecSpec(values="int8", density=0.25))).to_msgpack()
    out["update_init"] = m.Update(kind="init", **{**up, "task_id": "r0-init-v-1-a0", "round": 0,
                                                  "base_version": -1, "num_samples": 0},
                                  tensors=encode(arrays)).to_msgpack()
    out["update_evaluate"] = m.Update(kind="evaluate", **{**up, "task_id": "r1-evaluate-v1-a0", "base_version": 1},
                                      metrics={"eval_loss": 2.5}).to_msgpack()
    indices, g = pack_pool({0: 0.5, 3: -1.25, 7: 2.0})
    zo_update = ZoUpdate(base_fingerprint="ab" * 8, indices=indices, g=g)
    out["update_fit_zo"] = m.Update(kind="fit", **up, metrics={"train_loss": 1.5}, payload=zo_update).to_msgpack()

    out["global_snapshot"] = m.GlobalModel(version=0, round=0, adapter=adapter, model="tiny-llama",
                                           tensors=encode(arrays), created_at=1700000000.0).to_msgpack()
    out["global_diff"] = m.GlobalModel(version=2, round=2, adapter=adapter, base_version=1,
                                       tensors=encode(delta, CodecSpec(values="int8", zstd=True)),
                                       created_at=1700000001.5).to_msgpack()
    out["global_zo"] = m.GlobalModel(version=1, round=1, adapter=adapter, tensors=encode({}),
                                     created_at=1700000002.0).to_msgpack()
    entry = aggregate_round(1, zo_spec, adapter.model_dump(mode="json"), [(12, zo_update), (4, zo_update)])
    out["zo_ledger_round"] = entry.to_msgpack()
    assert isinstance(ZoLedgerRound.from_msgpack(out["zo_ledger_round"]), ZoLedgerRound)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    if "--write" in sys.argv:
        for name, data in build().items():
            (HERE / f"{name}.msgpack").write_bytes(data)
            print(f"{name}.msgpack {len(data)} bytes")
