"""fedmq model shrink: a student of some of a model's blocks, healed by distillation from it,
cached with a manifest and named by configs as '<model>:shrunk=N' (tiny random models, no hub)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import shrink
from edge_agent.models import resolve_model, shrink_model, tokenizer_fingerprint
from edge_agent.shrink import Recipe, checkpoint_sha256, read_manifest, select_blocks

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda _msg: None  # noqa: E731
QUICK = Recipe(blocks=1, steps=3, texts=6, held_out=2, new_tokens=16)  # the cheapest student: for the cache paths


def sharp_teacher(out: Path, layers: int = 3) -> Path:
    """A tiny random Llama whose next-token distributions are far from uniform (large init), so a
    cut of it is measurably off the teacher; the byte-level tokenizer of tiny-llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_agent.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(7)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_block_layouts_keep_the_first_n_or_spread_them_with_both_ends():
    assert select_blocks(30, 10, "first") == list(range(10))
    spread = select_blocks(30, 15, "spread")
    assert len(spread) == 15 and spread[0] == 0 and spread[-1] == 29 and spread == sorted(set(spread))
    assert select_blocks(4, 1, "spread") == [3]
    with pytest.raises(ValueError, match="layout"):
        select_blocks(4, 2, "middle")


def test_a_cut_named_by_config_keeps_the_first_or_spread_blocks_with_the_teachers_weights(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    teacher_dir = sharp_teacher(tmp_path / "teacher", layers=5)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    for name, kept in (("spread=3", [0, 2, 4]), ("blocks=2", [0, 1])):
        path = Path(resolve_model(f"{teacher_dir}:{name}", cache_dir=tmp_path / "cache", log=QUIET))
        assert path.name == f"teacher-{name.replace('=', '')}"
        model = AutoModelForCausalLM.from_pretrained(str(path))
        assert model.config.num_hidden_layers == len(kept)
        for j, i in enumerate(kept):  # block j of the cut is block i of the teacher, unchanged
            assert torch.equal(model.model.layers[j].mlp.down_proj.weight, teacher.model.layers[i].mlp.down_proj.weight)
        # the cached cut is reused, not rebuilt
        assert Path(resolve_model(f"{teacher_dir}:{name}", cache_dir=tmp_path / "cache", log=QUIET)) == path
    with pytest.raises(ValueError, match=r"cannot keep 6"):
        resolve_model(f"{teacher_dir}:spread=6", cache_dir=tmp_path / "cache", log=QUIET)
    with pytest.raises(ValueError, match=r"expected '<model>:spread=N'"):
        resolve_model(f"{teacher_dir}:spread=x", cache_dir=tmp_path / "cache", log=QUIET)


def test_healing_a_few_steps_lowers_the_students_kl_to_the_teacher(tmp_path):
    base = sharp_teacher(tmp_path / "models" / "teacher")
    recipe = Recipe(blocks=1, steps=20, lr=3e-3, warmup=2, texts=12, held_out=4, new_tokens=20)
    path = shrink_model(base, recipe, log=QUIET)
    made = read_manifest(path)
    assert made is not None and path == tmp_path / "models" / "teacher-shrunk1"
    # the KL on texts the student never trained on, before and after healing
    assert made["held_out_kl_after"] < 0.85 * made["held_out_kl_before"], made
    assert made["final_loss"] < made["first_loss"]
    assert made["kept_blocks"] == [2] and made["teacher_blocks"] == 3
    # measured again from the saved checkpoint: the manifest is what the student is
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    teacher = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert student.config.num_hidden_layers == 1
    held = shrink.teacher_corpus(teacher, tok, recipe)[:recipe.held_out]
    assert shrink.mean_kl(student, teacher, held, tok.pad_token_id) == pytest.approx(made["held_out_kl_after"],
                                                                                       rel=1e-3)


def test_the_student_is_built_once_and_reused_with_a_manifest_of_how_it_was_made(tmp_path, monkeypatch):
    teacher = Path(resolve_model("tiny-llama", cache_dir=tmp_path, log=QUIET))
    path = shrink_model(teacher, QUICK, log=QUIET)
    assert path == tmp_path / "models" / "tiny-llama-shrunk1"
    made = json.loads((path / "shrink.json").read_text())
    assert made["teacher_sha256"] == checkpoint_sha256(teacher)
    assert made["recipe"]["steps"] == 3 and made["recipe"]["seed"] == 0
    assert made["kept_blocks"] == [1] and isinstance(made["final_loss"], float)

    def no_rebuild(*_a, **_k):
        raise AssertionError("the cached student was rebuilt")

    monkeypatch.setattr(shrink, "build_student", no_rebuild)
    # the name configs use finds it (whatever recipe made it), and so does the same recipe
    assert Path(resolve_model("tiny-llama:shrunk=1", cache_dir=tmp_path, log=QUIET)) == path
    assert shrink_model(teacher, QUICK, log=QUIET) == path
    # another recipe is refused, naming the cached one, unless asked to rebuild
    with pytest.raises(ValueError, match=r"another recipe.*--force"):
        shrink_model(teacher, Recipe(blocks=1, steps=2, texts=6, held_out=2, new_tokens=16), log=QUIET)
    monkeypatch.undo()
    rebuilt = shrink_model(teacher, Recipe(blocks=1, steps=2, texts=6, held_out=2, new_tokens=16), log=QUIET,
                           force=True)
    assert rebuilt == path and read_manifest(rebuilt)["recipe"]["steps"] == 2
    with pytest.raises(ValueError, match=r"blocks must be in 1\.\.1"):
        shrink_model(teacher, Recipe(blocks=2), log=QUIET)


def test_an_agent_config_naming_the_student_loads_it(tmp_path):
    from edge_agent.config import AgentConfig
    from edge_agent.methods.kd import KdMethod
    from fedmq.configfile import load_config
    from fedmq_protocol import messages as m

    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "a?", "response": "b"}) + "\n")
    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(f"device_id: small-1\nbroker: {{url: 'mqtt://127.0.0.1:1'}}\nmodel: 'tiny-llama:shrunk=1'\n"
                        f"method: kd\nmodel_cache: {tmp_path / 'cache'}\n"
                        f"data: {{train: {tmp_path / 't.jsonl'}}}\nstate_dir: {tmp_path / 'state'}\n")
    cfg = load_config(cfg_file, AgentConfig)
    teacher = Path(resolve_model("tiny-llama", cache_dir=cfg.model_cache, log=QUIET))
    shrink_model(teacher, QUICK, log=QUIET)  # built once (fedmq model shrink), here the cheapest recipe
    path = resolve_model(cfg.model, cache_dir=cfg.model_cache, log=QUIET)  # what the agent does on start
    adapter = m.AdapterSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    small = KdMethod(path, adapter, device="cpu", template="plain")
    big = KdMethod(str(teacher), adapter, device="cpu", template="plain")
    assert small.model.config.num_hidden_layers == 1 and big.model.config.num_hidden_layers == 2
    # one tokenizer: the student can join the teacher's distillation federation
    assert tokenizer_fingerprint(small.tokenizer) == tokenizer_fingerprint(big.tokenizer)


def test_fedmq_model_shrink_builds_and_prints_the_student(tmp_path):
    env = {"FEDMQ_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-m", "fedmq", "model", "shrink", "tiny-llama", "--blocks", "1", "--steps", "2",
            "--texts", "6", "--threads", "1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, path = proc.stdout.strip().splitlines()[-2:]
    assert Path(path) == tmp_path / "models" / "tiny-llama-shrunk1" and (Path(path) / "config.json").is_file()
    assert json.loads(summary)["kept_blocks"] == [1]
    assert read_manifest(path)["recipe"]["steps"] == 2
