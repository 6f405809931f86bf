"""Site partial aggregates on the wire: a signed ``PartialAggregate`` is pinned by a golden file.

``python -m tests.test_partial_wire --write`` wrote tests/golden/partial/partial.msgpack; today's
code must build the same bytes from the same fields (Ed25519 signatures are deterministic), decode
them back, and verify the signature with the site's public key.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden" / "partial"
SEED = bytes(range(32))  # the site's fixed private key (test only)


def _signer():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmq_protocol.signing import Signer

    return Signer(Ed25519PrivateKey.from_private_bytes(SEED))


def build() -> bytes:
    from fedmq_protocol.partials import PartialAggregate, PartialMember, encode_sums, sign_partial

    rng = np.random.default_rng(3)
    sums = {"layers.0.q_proj.lora_A.weight": rng.standard_normal(6), "layers.0.q_proj.lora_B.weight": np.zeros(4)}
    shapes = {"layers.0.q_proj.lora_A.weight": (2, 3), "layers.0.q_proj.lora_B.weight": (4, 1)}
    partial = PartialAggregate(
        site_id="site-a", seq=1, task_id="r3-fit-v2-a0", round=3, base_version=2, nonce=bytes(range(16)),
        clip_norm=None, total_weight=30.0, sums=encode_sums(sums, shapes), created_at=1_700_000_000.0,
        members=(PartialMember(device_id="dev-0", num_samples=10, metrics={"train_loss": 1.25}),
                 PartialMember(device_id="dev-1", num_samples=20, metrics={})))
    return sign_partial(partial, "test", _signer())


def test_todays_code_builds_the_pinned_bytes_decodes_and_verifies_them():
    from fedmq_protocol.partials import PartialAggregate, verify_partial
    from fedmq_protocol.signing import load_public_key

    data = (GOLDEN / "partial.msgpack").read_bytes()
    assert build() == data
    p = PartialAggregate.from_msgpack(data)
    assert p.to_msgpack() == data
    assert p.key == "partial~r3-fit-v2-a0~site-a~1" and p.device_ids == ("dev-0", "dev-1")
    verify_partial(p, "test", {"site-a": load_public_key(_signer().public_key_b64)}, bytes(range(16)))
    sums = p.decode_sums({"layers.0.q_proj.lora_A.weight": (2, 3), "layers.0.q_proj.lora_B.weight": (4, 1)})
    assert np.array_equal(sums["layers.0.q_proj.lora_A.weight"], np.random.default_rng(3).standard_normal(6))


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / "partial.msgpack").write_bytes(build())
