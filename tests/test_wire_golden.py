"""Wire compatibility: protocol v1 bytes are pinned by golden files.

The files in tests/golden/ were written by the code before federation modes became plugins. Today's
code must decode every one of them and encode the same messages to exactly the same bytes, so a
device or coordinator of either side of that change federates with the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from build import build  # noqa: E402

NAMES = sorted(p.stem for p in GOLDEN.glob("*.msgpack"))


def _decoder(name: str):
    from fedmq_protocol import messages as m
    from fedmq_protocol.modes.zo import ZoLedgerRound

    prefix = name.split("_", 1)[0]
    return {"task": m.Task, "update": m.Update, "global": m.GlobalModel, "zo": ZoLedgerRound}[prefix]


def test_every_pinned_message_is_still_built():
    assert sorted(build()) == NAMES
    assert len(NAMES) == 13


@pytest.mark.parametrize("name", NAMES)
def test_todays_code_encodes_the_same_bytes(name):
    assert build()[name] == (GOLDEN / f"{name}.msgpack").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_golden_bytes_decode_and_reencode_unchanged(name):
    data = (GOLDEN / f"{name}.msgpack").read_bytes()
    msg = _decoder(name).from_msgpack(data)
    assert msg.to_msgpack() == data
