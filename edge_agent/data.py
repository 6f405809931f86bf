"""Local training data: JSONL loading, the prompt template, and synthetic checkable tasks.

Pure Python (no torch): the coordinator may use ``synthesize`` and ``check_answer`` too.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n### Response:\n"
"""The plain prompt template (``data.template: plain``), used for training and evaluation alike.
The response follows directly after it and is terminated by the tokenizer's eos token."""

TEMPLATE_NAMES = ("auto", "chat", "plain")
"""``data.template``: ``auto`` (the default: ``chat`` when the tokenizer has a chat template, else
``plain``), ``chat`` (the model's own chat template: the prompt is the user turn, the response the
assistant turn), ``plain`` (``PROMPT_TEMPLATE``), or any other string: a custom format string with
``{prompt}``, the response following it (terminated by the eos token, as with ``plain``)."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    family: str | None = None
    # the conversation before the response, (role, content) turns, for a record given as chat
    # messages (``prompt`` is then its flattened text); the chat template uses these turns
    turns: tuple[tuple[str, str], ...] = field(default=(), compare=False)


def format_prompt(prompt: str, template: str = PROMPT_TEMPLATE) -> str:
    """``"### Instruction:\\n{prompt}\\n### Response:\\n"`` (or ``template``, a format string with
    ``{prompt}``)."""
    return template.format(prompt=prompt)


def check_template(value: str) -> str:
    """``value`` if it is a valid ``data.template`` (a name of ``TEMPLATE_NAMES`` or a format
    string using ``{prompt}`` and no other field); ValueError otherwise."""
    if value in TEMPLATE_NAMES:
        return value
    if "{prompt}" not in value:
        raise ValueError(f"template {value!r} is neither one of {', '.join(TEMPLATE_NAMES)} "
                         "nor a format string with {prompt}")
    try:
        value.format(prompt="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"template {value!r}: only the field {{prompt}} may appear "
                         f"(write {{{{ and }}}} for braces): {exc!r}") from None
    return value


def template_kind(value: str) -> str:
    """``auto`` / ``chat`` / ``plain`` / ``custom`` (a format string)."""
    return value if value in TEMPLATE_NAMES else "custom"


def chat_messages(ex: Example) -> list[dict[str, str]]:
    """The conversation before the response, for a chat template: the record's own turns (system
    turn included) when it came as messages, else one user turn with the prompt."""
    if ex.turns:
        return [{"role": r, "content": c} for r, c in ex.turns]
    return [{"role": "user", "content": ex.prompt}]


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def _str_field(obj: dict, key: str, where: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return ""
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _from_messages(msgs: Any, where: str) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{j}] must be an object")
        role = _str_field(m, "role", f"{where}: messages[{j}]")
        content = _str_field(m, "content", f"{where}: messages[{j}]", allow_empty=True)
        turns.append((role, content))
    last = max((j for j, (r, _) in enumerate(turns) if r == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: 'messages' has no assistant turn")
    response = turns[last][1]
    if not response.strip():
        raise DataError(f"{where}: the last assistant turn is empty")
    before = turns[:last]
    if not any(r == "user" for r, _ in before):
        raise DataError(f"{where}: no user turn before the last assistant turn")
    system = [c for r, c in before if r == "system" and c.strip()]
    dialog = [(r, c) for r, c in before if r != "system"]
    parts: list[str] = []
    if system:
        parts.append("\n".join(system))
    if len(dialog) == 1:
        parts.append(dialog[0][1])
    else:  # multi-turn: earlier turns as "Role: text" lines, then the final user text
        lines = [f"{r.capitalize()}: {c}" for r, c in dialog[:-1]]
        lines.append(dialog[-1][1])
        parts.append("\n".join(lines))
    turns_before = tuple((r, c) for r, c in before if r != "system" or c.strip())
    return "\n\n".join(parts), response, turns_before


def parse_record(obj: Any, where: str) -> Example:
    """One JSON object -> Example. Accepts prompt/response, alpaca, or chat messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    family = obj.get("family")
    if family is not None and not isinstance(family, str):
        raise DataError(f"{where}: field 'family' must be a string")
    turns: tuple[tuple[str, str], ...] = ()
    if "messages" in obj:
        prompt, response, turns = _from_messages(obj["messages"], where)
    elif "prompt" in obj or "response" in obj:
        prompt = _str_field(obj, "prompt", where)
        response = _str_field(obj, "response", where)
    elif "instruction" in obj or "output" in obj:
        instruction = _str_field(obj, "instruction", where)
        inp = _str_field(obj, "input", where, required=False, allow_empty=True)
        response = _str_field(obj, "output", where)
        prompt = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise DataError(
            f"{where}: unrecognised record (keys: {keys}); expected prompt/response, "
            "instruction/input/output, or messages"
        )
    return Example(prompt=prompt, response=response, family=family, turns=turns)


def load_jsonl(path: str | Path) -> list[Example]:
    """Load examples from a JSONL file (blank lines skipped). Raises DataError naming file:line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise DataError(f"data path {str(p)!r} is not a file")
    out: list[Example] = []
    with open(p, encoding="utf-8") as f:
        lineno = 0
        while True:
            where = f"{p}:{lineno + 1}"
            try:
                line = f.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: not valid UTF-8 ({exc.reason})") from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            out.append(parse_record(obj, where))
    return out


def write_jsonl(path: str | Path, examples: Iterable[Example]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            rec: dict[str, Any] = {"prompt": ex.prompt, "response": ex.response}
            if ex.family is not None:
                rec["family"] = ex.family
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# synthetic task families (answers checkable by code, a few tokens long)
# ---------------------------------------------------------------------------------------------

WORDS = [
    "apple", "bread", "chair", "dance", "eagle", "flame", "grape", "house", "index", "juice", "knife",
    "lemon", "mouse", "night", "ocean", "piano", "queen", "river", "stone", "tiger", "uncle", "voice",
    "water", "yacht", "zebra", "cloud", "plant", "smile", "train", "brick", "candy", "dream", "fruit",
    "ghost", "heart", "light", "money", "north", "paper", "radio", "sugar", "table", "watch", "green",
    "black", "white", "sweet", "storm", "frost", "beach", "field", "glass", "metal", "sheep", "horse",
    "snake", "whale", "robot", "pizza", "salad", "tooth", "wheel", "shelf", "spoon", "towel", "crown",
]

_LETTERS = string.ascii_lowercase


def _ints(rng: random.Random, n: int, lo: int = 0, hi: int = 9) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _gen_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word: {w}", w[::-1]


def _gen_upper(rng: random.Random) -> tuple[str, str]:
    phrase = " ".join(rng.sample(WORDS, 2))
    return f"Uppercase: {phrase}", phrase.upper()


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    xs = _ints(rng, rng.randint(3, 5))
    return f"Sort ascending: {' '.join(map(str, xs))}", " ".join(map(str, sorted(xs)))


def _gen_count(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice(_LETTERS)
    return f"How many times does '{letter}' appear in '{w}'?", str(w.count(letter))


def _gen_max(rng: random.Random) -> tuple[str, str]:
    xs = _ints(rng, rng.randint(3, 5), 0, 99)
    return f"Largest number in: {' '.join(map(str, xs))}", str(max(xs))


def _gen_next_letter(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(25)
    return f"Which letter comes after '{_LETTERS[i]}'?", _LETTERS[i + 1]


def _gen_first_letter(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"First letter of: {w}", w[0]


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _gen_add,
    "reverse": _gen_reverse,
    "upper": _gen_upper,
    "sort": _gen_sort,
    "count": _gen_count,
    "max": _gen_max,
    "next_letter": _gen_next_letter,
    "first_letter": _gen_first_letter,
}
DEFAULT_FAMILIES = ("add", "reverse", "upper", "sort", "count", "max", "next_letter")


def make_examples(family: str, n: int, rng: random.Random, avoid: set[str] | None = None) -> list[Example]:
    """``n`` examples of ``family``; prompts in ``avoid`` are re-drawn (up to 20 times each)."""
    gen = FAMILIES[family]
    out = []
    for _ in range(n):
        for _attempt in range(20):
            prompt, response = gen(rng)
            if not avoid or prompt not in avoid:
                break
        out.append(Example(prompt, response, family))
    return out


def assign_families(families: Sequence[str], num_devices: int) -> list[list[str]]:
    """Round robin, non-IID: family j goes to device j % num_devices; with more devices than
    families, device i gets family i % len(families) (families are then shared)."""
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    if not families:
        raise ValueError("at least one family is needed")
    if num_devices <= len(families):
        return [[f for j, f in enumerate(families) if j % num_devices == i] for i in range(num_devices)]
    return [[families[i % len(families)]] for i in range(num_devices)]


def synthesize(
    out_dir: str | Path,
    *,
    num_devices: int = 3,
    samples_per_device: int = 200,
    eval_samples: int = 100,
    seed: int = 0,
    families: Sequence[str] | None = None,
) -> dict:
    """Write ``device_{i}.jsonl`` (non-IID by family), ``eval.jsonl`` (all families, held out:
    train prompts avoid eval prompts where the family has room) and ``manifest.json``.
    Deterministic for a seed. Returns the manifest."""
    fams = list(families) if families is not None else list(DEFAULT_FAMILIES)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    if len(set(fams)) != len(fams):
        raise ValueError("families must be distinct")
    if samples_per_device < 0 or eval_samples < 0:
        raise ValueError("sample counts must be >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # eval first: all families round robin, then shuffled
    eval_rng = random.Random(f"fedmq-synth-eval-{seed}")
    per_fam = {f: eval_samples // len(fams) + (1 if k < eval_samples % len(fams) else 0) for k, f in enumerate(fams)}
    eval_set: list[Example] = []
    for f in fams:
        eval_set += make_examples(f, per_fam[f], eval_rng)
    eval_rng.shuffle(eval_set)
    avoid = {e.prompt for e in eval_set}

    assignment = assign_families(fams, num_devices)
    devices = []
    for i, dev_fams in enumerate(assignment):
        rng = random.Random(f"fedmq-synth-device-{seed}-{i}")
        counts = {f: samples_per_device // len(dev_fams) + (1 if k < samples_per_device % len(dev_fams) else 0)
                  for k, f in enumerate(dev_fams)}
        exs: list[Example] = []
        for f in dev_fams:
            exs += make_examples(f, counts[f], rng, avoid)
        rng.shuffle(exs)
        name = f"device_{i}.jsonl"
        write_jsonl(out / name, exs)
        devices.append({"device": i, "file": name, "families": dev_fams, "num_samples": len(exs),
                        "per_family": counts})
    write_jsonl(out / "eval.jsonl", eval_set)
    manifest = {
        "seed": seed,
        "families": fams,
        "num_devices": num_devices,
        "samples_per_device": samples_per_device,
        "template": PROMPT_TEMPLATE,
        "devices": devices,
        "eval": {"file": "eval.jsonl", "num_samples": len(eval_set), "per_family": per_fam},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------------
# answer checking
# ---------------------------------------------------------------------------------------------

_NUMERIC = {"add", "count", "max"}


def _first_line(text: str) -> str:
    text = text.replace("</s>", "\n").replace("<|im_end|>", "\n").replace("<|endoftext|>", "\n")
    text = text.strip()
    return text.splitlines()[0].strip() if text else ""


def check_answer(example: Example, generated: str) -> bool:
    """Is ``generated`` (the model's continuation after the prompt) a correct answer?

    Only the first non-empty line counts, surrounding whitespace and a trailing period ignored.
    Numeric families compare integers; ``sort`` compares the number sequence (commas allowed);
    letter/word families compare exactly (case-sensitive for ``upper``). Unknown families
    (or none) fall back to an exact comparison with the reference response.
    """
    got = _first_line(generated).rstrip(".").strip()
    want = example.response.strip()
    fam = example.family
    if fam in _NUMERIC:
        m = re.fullmatch(r"[-+]?\d+", got)
        return bool(m) and int(got) == int(want)
    if fam == "sort":
        toks = [t for t in re.split(r"[\s,]+", got) if t]
        return all(re.fullmatch(r"-?\d+", t) for t in toks) and [int(t) for t in toks] == [int(t) for t in want.split()]
    if fam in ("next_letter", "first_letter"):
        return got.strip("'\"") == want
    if fam == "reverse":
        return got.strip("'\"").lower() == want.lower()
    if fam == "upper":
        return " ".join(got.split()) == want
    return got == _first_line(want)
