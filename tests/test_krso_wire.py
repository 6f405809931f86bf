"""FedKRSO on the wire: its task, update, ledger round and checkpoint bytes are pinned by golden files.

``python -m tests.test_krso_wire --write`` wrote tests/golden/krso/*.msgpack; today's code must build
the same bytes from the same fields and decode every file back to them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden" / "krso"


def build() -> dict[str, bytes]:
    from fedmq_protocol import messages as m
    from fedmq_protocol.codec import CodecSpec, encode
    from fedmq_protocol.modes import krso as K

    plain = CodecSpec(values="float32", auto_sparse=False)
    spec = K.KrsoSpec(seed=11, num_seeds=4, rank=2, interval=3, target_modules=("q_proj", "v_proj"),
                      checkpoint_every=5, base_fingerprint="ab" * 8)
    root = K.round_seed(spec.seed, 2)
    seeds = K.candidate_seeds(root, spec.num_seeds)
    rng = np.random.default_rng(5)
    acc = {K.tensor_name(s, w): rng.standard_normal((3, 2)).astype(np.float32)
           for s in sorted(seeds[:2]) for w in ("model.layers.0.self_attn.q_proj.weight",
                                                "model.layers.0.self_attn.v_proj.weight")}
    weights = {"model.layers.0.self_attn.q_proj.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    task = K.KrsoTask(**spec.model_dump(), round_seed=root, checkpoint=True)
    out = {
        "task": m.Task(kind="fit", task_id="r2-fit-v1-a0", round=2, device_id="dev-1", global_version=1,
                       deadline_s=600.0, adapter=m.AdapterSpec(), payload=task).to_msgpack(),
        "update": m.Update(kind="fit", task_id="r2-fit-v1-a0", round=2, device_id="dev-1", base_version=1,
                           num_samples=12, metrics={"train_loss": 1.5}, tensors=encode(acc, plain),
                           payload=K.KrsoUpdate(base_fingerprint="ab" * 8, round_seed=root,
                                                seeds=tuple(sorted(seeds[:2])), start_digest="cd" * 16,
                                                checkpoint=None)).to_msgpack(),
        "ledger_round": K.KrsoLedgerRound(round=2, spec=spec, round_seed=root, tensors=encode(acc, plain),
                                          num_clients=2, num_samples=24, start_digest="cd" * 16).to_msgpack(),
        "checkpoint": K.KrsoCheckpoint(round=1, spec=spec, digest=K.weights_digest(weights.items()),
                                       tensors=encode(weights, plain)).to_msgpack(),
    }
    return out


def _decoder(name: str):
    from fedmq_protocol import messages as m
    from fedmq_protocol.modes import krso as K

    return {"task": m.Task, "update": m.Update, "ledger_round": K.KrsoLedgerRound, "checkpoint": K.KrsoCheckpoint}[name]


NAMES = ["checkpoint", "ledger_round", "task", "update"]


def test_every_pinned_message_is_built():
    assert sorted(build()) == NAMES == sorted(p.stem for p in GOLDEN.glob("*.msgpack"))


@pytest.mark.parametrize("name", NAMES)
def test_todays_code_encodes_the_same_bytes_and_decodes_them_back(name):
    data = (GOLDEN / f"{name}.msgpack").read_bytes()
    assert build()[name] == data
    msg = _decoder(name).from_msgpack(data)
    assert msg.to_msgpack() == data


def test_decoded_payloads_carry_what_was_sent():
    from fedmq_protocol import messages as m
    from fedmq_protocol.modes import krso as K

    task = m.Task.from_msgpack((GOLDEN / "task.msgpack").read_bytes())
    assert isinstance(task.payload, K.KrsoTask) and task.payload.checkpoint and task.payload.rank == 2
    upd = m.Update.from_msgpack((GOLDEN / "update.msgpack").read_bytes())
    assert isinstance(upd.payload, K.KrsoUpdate) and set(upd.payload.seeds) <= set(task.payload.seeds())
    entry = K.KrsoLedgerRound.from_msgpack((GOLDEN / "ledger_round.msgpack").read_bytes())
    assert sum(len(ws) for ws in entry.entries(max_elements=1 << 10).values()) == 4
    ck = K.KrsoCheckpoint.from_msgpack((GOLDEN / "checkpoint.msgpack").read_bytes())
    assert list(ck.arrays(max_elements=12)) == ["model.layers.0.self_attn.q_proj.weight"]


if __name__ == "__main__" and "--write" in sys.argv:
    for name, data in build().items():
        (GOLDEN / f"{name}.msgpack").write_bytes(data)
