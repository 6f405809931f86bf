"""A healthy agent's log holds no warning: model names compared as checkpoints, bitsandbytes'
missing-``kernels`` notice dropped, no progress bars in files; the demo names why a device died."""

from __future__ import annotations

import io
import logging

from edge_agent.logs import BNB_CPU_LOGGER, quiet_libraries
from edge_agent.models import model_location, same_model
from fedmq.demo import exit_message, last_error


def test_a_name_and_its_cache_path_are_the_same_model(tmp_path):
    cache = tmp_path / "cache"
    held = cache / "models" / "smollm2-135m"
    held.mkdir(parents=True)
    assert same_model("smollm2-135m", str(held), cache_dir=cache)
    assert same_model("SmolLM2-135M-Instruct", "smollm2-135m", cache_dir=cache)
    assert same_model("tiny-llama", str(cache / "models" / "tiny-llama"), cache_dir=cache)
    assert not same_model("tiny-llama", str(held), cache_dir=cache)
    assert not same_model("org/other", str(held), cache_dir=cache)
    assert same_model("org/name", "org/name")
    # a task's model field is untrusted input: a name no file system takes is simply another model
    assert not same_model("x" * 5000, str(held), cache_dir=cache)
    assert not same_model("a\0b/c", str(held), cache_dir=cache)
    assert model_location("nothing-like-a-model", cache_dir=cache) is None


def test_bitsandbytes_missing_kernels_warning_is_dropped_and_nothing_else():
    quiet_libraries(io.StringIO())
    quiet_libraries(io.StringIO())  # idempotent
    logger = logging.getLogger(BNB_CPU_LOGGER)
    assert len(logger.filters) == 1
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels` and the kernels >= 0.11.1", ModuleNotFoundError(
                           "No module named 'kernels'"))
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", RuntimeError("boom"))
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Failed to load CPU gemm_4bit_forward from kernels-community: boom.", "something else"]


def test_no_progress_bars_when_stderr_is_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # restored after the test
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet_libraries(Tty())
    import os

    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    quiet_libraries(io.StringIO())
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


def test_last_error_of_a_device_log(tmp_path):
    log = tmp_path / "device-1.log"
    log.write_text(
        "2026-01-01 10:00:00,000 INFO fedmq.agent: loading x\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "ModuleNotFoundError: No module named 'peft'\n\n")
    assert last_error(log) == "ModuleNotFoundError: No module named 'peft'"
    assert exit_message("device-1", 1, log).startswith(
        "device device-1 exited (code 1): ModuleNotFoundError: No module named 'peft'")
    log.write_text("fedmq: error: agent.yaml: data.train: file not found\n")
    assert last_error(log) == "agent.yaml: data.train: file not found"
    log.write_text("2026-01-01 10:00:00,000 ERROR fedmq.agent: task failed: out of memory\nbye\n")
    assert last_error(log) == "task failed: out of memory"
    log.write_text("")
    assert last_error(log) is None
    assert last_error(tmp_path / "absent.log") is None
    assert exit_message("device-0", -9, tmp_path / "absent.log").startswith("device device-0 exited (code -9); see")
