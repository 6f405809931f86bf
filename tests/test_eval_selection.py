"""Which devices evaluate a global (eval_devices, eval_max_devices), and the round's time in parts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.rounds import RoundRunner
from fedmq_protocol import messages as m


def _selection(**cfg) -> list[str]:
    ready = [SimpleNamespace(device_id=d, eval_samples=n) for d, n in
             (("dev-2", 10), ("dev-0", 10), ("dev-1", 0), ("dev-3", 5))]
    runner = SimpleNamespace(cfg=CoordinatorConfig(**cfg), registry=SimpleNamespace(ready=lambda: ready))
    return RoundRunner.eval_selection(runner)  # type: ignore[arg-type]


def test_every_device_with_eval_data_by_default():
    assert _selection() == ["dev-0", "dev-2", "dev-3"]


def test_chosen_devices_and_at_most_n():
    assert _selection(eval_devices=["dev-3", "dev-1", "dev-9"]) == ["dev-3"]  # dev-1: no eval data
    assert _selection(eval_max_devices=1) == ["dev-0"]
    assert _selection(eval_devices=["dev-2", "dev-3"], eval_max_devices=1) == ["dev-2"]


def test_bad_eval_settings_are_refused():
    with pytest.raises(ValidationError, match="eval_devices is empty"):
        CoordinatorConfig(eval_devices=[])
    with pytest.raises(ValidationError, match="eval_max_devices"):
        CoordinatorConfig(eval_max_devices=0)
    with pytest.raises(ValidationError):
        CoordinatorConfig(eval_devices=["a/b"])


def test_round_summary_reports_fit_and_eval_apart_and_reads_older_summaries():
    s = m.RoundSummary(round=1, global_version=1, duration_s=3.0, fit_s=2.5, eval_s=0.5, eval_devices=1)
    back = m.RoundSummary.from_json(s.to_json())
    assert (back.fit_s, back.eval_s, back.eval_devices) == (2.5, 0.5, 1)
    old = m.RoundSummary.from_json(b'{"round":1,"global_version":1,"duration_s":3.0}')
    assert old.fit_s is None and old.eval_s is None
    assert b"fit_s" not in m.RoundSummary(round=1, global_version=1).to_json()
