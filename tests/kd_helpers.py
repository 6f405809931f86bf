"""Helpers of the KD tests: a public probe set from the synthetic families, and the wire messages
pinned by tests/golden/kd/ (built from fixed fields)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from edge_agent.data import DEFAULT_FAMILIES, make_examples

GOLDEN_KD = Path(__file__).resolve().parent / "golden" / "kd"
TOKENIZER = "f0" * 32


def write_probe_set(path: Path, per_family: int = 2, seed: int = 99) -> Path:
    """Public probes: ``per_family`` prompts with their answers from every synthetic family."""
    rng = random.Random(f"kd-probes-{seed}")
    with open(path, "w") as fh:
        for fam in DEFAULT_FAMILIES:
            for ex in make_examples(fam, per_family, rng):
                fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response, "family": fam}) + "\n")
    return path


def build_golden() -> dict[str, bytes]:
    """name -> msgpack bytes of the kd wire messages."""
    from fedmq_protocol import messages as m
    from fedmq_protocol.modes.kd import (
        KdConsensus,
        KdManifest,
        KdProbeSet,
        KdTask,
        KdUpdate,
        Probe,
        encode_consensus,
        encode_topk,
        probe_sha256,
    )

    probes = (Probe(prompt="Add 2 and 3.", response="5"), Probe(prompt="Reverse: abc", response="cba"))
    manifest = KdManifest(sha256=probe_sha256(probes), count=2, tokenizer=TOKENIZER)
    adapter = m.AdapterSpec(r=4, alpha=8.0, target_modules=("q_proj",))
    task = KdTask(manifest=manifest, top_k=4, lam=0.5, temperature=2.0, max_response_tokens=8, probe_batch_size=2,
                  logprob_values="float16", consensus_round=1)
    ids = np.array([[5, 9, 1, 0], [7, 3, 2, 1], [4, 8, 6, 5], [9, 1, 0, 2]], dtype=np.int64)
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05]] * 4))
    id_map, lp_map = encode_topk(ids, lp, "float16")
    upd = KdUpdate(probe_sha256=manifest.sha256, tokenizer=TOKENIZER, vocab_size=10, positions=(1, 3),
                   ids=id_map, logprobs=lp_map, confidence=np.array([0.5, 0.25], dtype="<f4").tobytes())
    c_ids, c_p = encode_consensus(ids[:, :2], np.array([[0.75, 0.25]] * 4))
    return {
        "task_fit_kd": m.Task(kind="fit", task_id="r2-fit-v1-a0", round=2, device_id="dev-1", global_version=1,
                              deadline_s=600.0, adapter=adapter, payload=task).to_msgpack(),
        "update_fit_kd": m.Update(kind="fit", task_id="r2-fit-v1-a0", round=2, device_id="dev-1", base_version=1,
                                  num_samples=12, metrics={"train_loss": 1.5, "kd_kl": 0.25},
                                  payload=upd).to_msgpack(),
        "kd_probes": KdProbeSet(manifest=manifest, probes=probes).to_msgpack(),
        "kd_consensus": KdConsensus(round=1, probe_sha256=manifest.sha256, tokenizer=TOKENIZER, vocab_size=10,
                                    positions=(1, 3), weighting="samples", num_devices=2, ids=c_ids,
                                    probs=c_p).to_msgpack(),
    }


if __name__ == "__main__":
    for name, data in build_golden().items():
        (GOLDEN_KD / f"{name}.msgpack").write_bytes(data)
        print(f"{name}.msgpack {len(data)} bytes")
