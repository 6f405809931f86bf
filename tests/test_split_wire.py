"""The split mode's wire: task payload, split-step request and response, pinned by golden bytes
(tests/golden_split/; rewritten with FEDMQ_WRITE_GOLDEN=1 only when the format changes on purpose)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.split import (
    SplitRequest,
    SplitResponse,
    SplitSpec,
    SplitTask,
    decode_hidden,
    encode_hidden,
    pack_mask,
)

GOLDEN = Path(__file__).resolve().parent / "golden_split"


def build() -> dict[str, bytes]:
    spec = SplitTask(l_head=2, l_tail=2, activations="int8", gradients="bfloat16", zstd=False)
    task = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id="dev-0", global_version=0,
                  deadline_s=600, adapter=m.AdapterSpec(), fit=m.FitConfig(), payload=spec, nonce=b"\x01" * 16,
                  model="smollm2-135m")
    hidden = (np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 10) / 7
    shape, bits = pack_mask(np.array([[1, 1, 1], [1, 1, 0]]))
    forward = SplitRequest(device_id="dev-0", task_id="r1-fit-v0-a0", step=3, phase="forward", correlation=b"\x02" * 16,
                           tensors=encode_hidden(hidden, spec.codec("activations")), attempt=0,
                           response_topic="fedmq/default/split/dev-0/response", mask_shape=shape, mask=bits)
    backward = SplitRequest(device_id="dev-0", task_id="r1-fit-v0-a0", step=3, phase="backward",
                            correlation=b"\x03" * 16, tensors=encode_hidden(hidden / 100, spec.codec("gradients")),
                            attempt=1, response_topic="fedmq/default/split/dev-0/response")
    answer = SplitResponse(device_id="dev-0", task_id="r1-fit-v0-a0", step=3, phase="backward",
                           correlation=b"\x03" * 16, ok=True, tensors=encode_hidden(hidden, spec.codec("gradients")),
                           server_s=0.25, server_step=17)
    refused = SplitResponse(device_id="dev-0", task_id="r1-fit-v0-a0", step=4, phase="backward",
                            correlation=b"\x04" * 16, ok=False, reason="no forward state for this step",
                            redo_forward=True, server_step=17)
    return {"task_fit_split": task.to_msgpack(), "split_request_forward": forward.to_msgpack(),
            "split_request_backward": backward.to_msgpack(), "split_response_backward": answer.to_msgpack(),
            "split_response_refused": refused.to_msgpack()}


DECODERS = {"task": m.Task, "split_request": SplitRequest, "split_response": SplitResponse}


def _decoder(name: str):
    return next(cls for prefix, cls in DECODERS.items() if name.startswith(prefix))


if os.environ.get("FEDMQ_WRITE_GOLDEN"):
    GOLDEN.mkdir(exist_ok=True)
    for _name, _data in build().items():
        (GOLDEN / f"{_name}.msgpack").write_bytes(_data)


@pytest.mark.parametrize("name", sorted(build()))
def test_split_messages_encode_to_the_pinned_bytes_and_decode_back(name):
    data = (GOLDEN / f"{name}.msgpack").read_bytes()
    assert build()[name] == data
    msg = _decoder(name).from_msgpack(data)
    assert msg.to_msgpack() == data


def test_the_task_carries_the_cut_under_the_mode_key():
    import msgpack

    obj = msgpack.unpackb((GOLDEN / "task_fit_split.msgpack").read_bytes(), raw=False)
    assert obj["split"]["l_head"] == 2 and obj["split"]["activations"] == "int8" and "zo" not in obj
    task = m.Task.from_msgpack((GOLDEN / "task_fit_split.msgpack").read_bytes())
    assert isinstance(task.payload, SplitTask) and task.payload.l_tail == 2


def test_the_request_round_trips_hidden_state_and_mask():
    req = SplitRequest.from_msgpack((GOLDEN / "split_request_forward.msgpack").read_bytes())
    assert req.mask_array().tolist() == [[1, 1, 1], [1, 1, 0]] and req.key == ("r1-fit-v0-a0", 3, "forward")
    want = (np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 10) / 7
    got = decode_hidden(req.tensors, expected=(2, 3, 4), max_elements=24, where="h")
    assert np.abs(got - want).max() <= np.abs(want).max() / 254 + 1e-7  # int8: one scale per 64 values


@pytest.mark.parametrize("change, match", [
    ({"mask": None}, "needs mask"),
    ({"mask": b"\x00" * 5}, "mask is 5 bytes"),
    ({"mask_shape": (0, 3)}, "outside"),
    ({"device_id": "dev/0"}, "not a valid topic level"),
    ({"phase": "sideways"}, "phase"),
    ({"step": -1}, "step"),
])
def test_malformed_requests_are_refused_naming_the_field(change, match):
    obj = SplitRequest.from_msgpack((GOLDEN / "split_request_forward.msgpack").read_bytes()).to_obj()
    obj.update(change)
    with pytest.raises(ProtocolError, match=match):
        SplitRequest.from_obj(obj)


def test_hidden_states_with_non_finite_values_or_a_wrong_shape_are_refused():
    spec = SplitSpec(activations="float32")
    bad = np.ones((1, 2, 4), dtype=np.float32)
    bad[0, 1, 2] = np.inf
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_hidden(encode_hidden(bad, spec.codec("activations")), expected=(1, 2, 4), max_elements=8, where="h")
    with pytest.raises(ProtocolError, match="shape"):
        decode_hidden(encode_hidden(np.ones((1, 2, 4)), spec.codec("activations")), expected=(1, 2, 5),
                      max_elements=10, where="h")
