"""UltraFeedback's protocol: principle system prompts for generation, four-aspect judge templates.

Sources (verbatim string data in ``zephyr_fast/aif/data/``, provenance in ``data/PROVENANCE.md``):
OpenBMB/UltraFeedback ``src/comparison_data_generation/main.py`` (principles, how one is picked per
completion) and ``src/data_annotation/preference_templates.py`` / ``annotate_preference.py`` (the
four aspects, their rubrics, output format and parser).

Two modes.  By default each completion is rated on its own (the same rubric with the ``<text 2..4>``
slots and their output blocks removed), so that a rating depends only on (prompt, completion,
judge, template) -- the cache key -- and not on which other completions happened to share the
request; ``TEMPLATE_VERSION`` names this adaptation.  ``judge --completions-per-request N`` (2-4)
sends UltraFeedback's own multi-text request: a prompt's completions together, ``<text 1..N>``
(the template verbatim for N = 4, the unused slots removed below), ``MULTI_TEMPLATE_VERSION``; the
answer is split into its ``Output for Text k`` sections (or, as ``annotate_preference.py`` does,
its blank-line separated blocks) and each parsed exactly like a single answer.
"""

from __future__ import annotations

import functools
import json
import pathlib
import random
import re
from typing import Optional

from .binarize import ASPECTS  # the four UltraFeedback aspects, one definition

DATA = pathlib.Path(__file__).resolve().parent / "data"
TEMPLATE_VERSION = "ultrafeedback@bf80fd4/single-text-v1"
MULTI_TEMPLATE_VERSION = "ultrafeedback@bf80fd4/multi-text-v1"
MAX_TEXTS = 4  # UltraFeedback's templates have four text slots
RATINGS = ("1", "2", "3", "4", "5")
# Which principle UltraFeedback draws per completion, by prompt source (main.py::instruction_completion).
PRINCIPLE_MIX = {
    "sharegpt": ["helpfulness"] * 3 + ["truthfulness", "honesty"],
    "ultrachat": ["helpfulness"] * 3 + ["truthfulness", "honesty"],
    "flan": ["helpfulness"] * 4 + ["verbalized_calibration"],
    "evol_instruct": ["helpfulness"],
    "truthful_qa": ["honesty", "truthfulness"],
    "false_qa": ["honesty", "truthfulness"],
}
DEFAULT_MIX = ["helpfulness"] * 3 + ["truthfulness", "honesty"]


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
    with open(DATA / name, encoding="utf-8") as f:
        return json.load(f)


def principles() -> dict:
    """``{principle: [system prompt, ...]}`` (helpfulness, harmlessness, honesty, truthfulness,
    verbalized_calibration)."""
    return _load("ultrafeedback_principles.json")["principles"]


def pick_principle(source: Optional[str], rng: random.Random) -> tuple:
    """``(principle, system prompt)`` drawn as UltraFeedback does for one completion."""
    principle = rng.choice(PRINCIPLE_MIX.get(source or "", DEFAULT_MIX))
    if principle == "honesty" and rng.random() >= 0.9:
        principle = "verbalized_calibration"
    return principle, rng.choice(principles()[principle])


def _n_texts(template: str, n: int) -> str:
    """The four-text template reduced to ``n`` texts: the ``<text k>`` lines and ``Output for Text k``
    blocks of k > n removed, every other character kept (``n`` = 4: the template as it is)."""
    drop = "".join(str(k) for k in range(n + 1, MAX_TEXTS + 1))
    if not drop:
        return template
    paras = [p for p in template.split("\n\n") if not re.match(rf"#+ Output for Text [{drop}]\b", p)]
    return "\n".join(line for line in "\n\n".join(paras).split("\n") if not re.match(rf"<text [{drop}]> ", line))


_COUNTS = {2: "two", 3: "three", 4: "four"}


def system_prompt(n: int = 1) -> str:
    """UltraFeedback's judge system prompt for ``n`` texts (verbatim for 4)."""
    sp = _load("ultrafeedback_templates.json")["templates"]["system_prompt"]
    if n == 1:
        sp = sp.replace('four text outputs ("Text")', 'one text output ("Text")')
        return sp.replace("\nThe four texts given are independent, and should be evaluated separately.", "")
    return sp.replace("four text outputs", f"{_COUNTS[n]} text outputs").replace("The four texts",
                                                                               f"The {_COUNTS[n]} texts")


def template(aspect: str, with_world_knowledge: bool = False, n: int = 1) -> str:
    """The ``n``-text rubric of ``aspect`` with ``{instruction}``, ``{text_1..n}`` (and
    ``{world_knowledge}`` for truthfulness/helpfulness when ``with_world_knowledge``)."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
    if not 1 <= n <= MAX_TEXTS:
        raise ValueError(f"UltraFeedback's templates rate 1 to {MAX_TEXTS} texts per request, not {n}")
    name = f"{aspect}_template"
    if aspect in ("truthfulness", "helpfulness"):
        name += "_with_answer" if with_world_knowledge else "_without_answer"
    return _n_texts(_load("ultrafeedback_templates.json")["templates"][name], n)


def judge_messages(aspect: str, instruction: str, completion: str, world_knowledge: Optional[str] = None,
                   constrained: bool = False) -> list:
    """Chat messages asking the judge to rate one completion on one aspect.

    ``constrained``: the answer is forced to a rating token (``logit_bias``), so the output
    section asks for the rating only.
    """
    user = _fill(template(aspect, with_world_knowledge=world_knowledge is not None), instruction, [completion],
                 world_knowledge)
    if constrained:
        user += "Rating for text 1 (one digit, 1 to 5):"
    return [{"role": "system", "content": system_prompt()}, {"role": "user", "content": user}]


def judge_messages_multi(aspect: str, instruction: str, completions: list,
                         world_knowledge: Optional[str] = None) -> list:
    """Chat messages asking the judge to rate 2-4 completions on one aspect in one request (UltraFeedback's)."""
    n = len(completions)
    if not 2 <= n <= MAX_TEXTS:
        raise ValueError(f"a multi-text request rates 2 to {MAX_TEXTS} completions, not {n}")
    user = _fill(template(aspect, world_knowledge is not None, n), instruction, completions, world_knowledge)
    return [{"role": "system", "content": system_prompt(n)}, {"role": "user", "content": user}]


def _fill(tpl: str, instruction: str, completions: list, world_knowledge: Optional[str]) -> str:
    """``tpl`` with its fields filled in one pass (a completion containing ``{text_2}`` stays as it is)."""
    fields = {"instruction": instruction, "world_knowledge": world_knowledge or "",
              **{f"text_{k + 1}": c for k, c in enumerate(completions)}}
    return re.sub(r"\{(instruction|text_[1-4]|world_knowledge)\}", lambda m: fields[m.group(1)], tpl)


NA_ASPECTS = ("instruction_following", "honesty")  # annotate_preference.py accepts "N/A" for these
TYPED_ASPECTS = ("truthfulness", "helpfulness")  # their answer starts with "Type: ..." and its rationale
_LEADING = re.compile(r"(?i:n/a)|\d+")
_SCALE = re.compile(r"\s*(?:/|out of)\s*5\b")


def _rating_value(field: str, aspect: str) -> Optional[str]:
    """The rating a ``Rating:`` field states, or None: a value off the 1-5 scale, signed, fractional,
    or followed by another number (``4.5``, ``-3``, ``10``, ``4 or 5``) is not read as some rating."""
    field = field.strip()
    m = _LEADING.match(field)
    if m is None:
        return None
    rest = field[m.end():]
    rest = rest[_SCALE.match(rest).end():] if _SCALE.match(rest) else rest  # "4/5", "4 out of 5"
    if any(ch.isdigit() for ch in rest):
        return None
    value = m.group(0)
    if value.upper() == "N/A":
        return "N/A" if aspect in NA_ASPECTS else None
    return value if value in RATINGS else None


def _lines(text: str) -> list:
    """``[(start offset, line)]`` of ``text``."""
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, line))
        pos += len(line) + 1
    return out


def _label(line: str, name: str) -> Optional[int]:
    """Index just past ``name:`` when the line starts with it (after markdown ``#`` / spaces), else None."""
    body = line.lstrip(" \t#>")
    if not body.startswith(name + ":"):
        return None
    return len(line) - len(body) + len(name) + 1


def _next_filled(lines: list) -> list:
    """``nxt[i]``: the index of the first non-blank line after line ``i`` (None at the end); one pass."""
    nxt, j = [None] * len(lines), None
    for i in range(len(lines) - 1, -1, -1):
        nxt[i] = j
        if lines[i][1].strip():
            j = i
    return nxt


def _rating_fields(lines: list, nxt: list) -> list:
    """``[(line index, field start offset, field text)]`` of every ``Rating:`` (anywhere in a line; an
    empty field is read from the next non-blank line)."""
    found = []
    for i, (start, line) in enumerate(lines):
        at = line.find("Rating:")
        while at >= 0:
            begin = at + len("Rating:")
            after = line.find("Rating:", begin)
            field, offset = line[begin:after if after >= 0 else len(line)], start + begin
            j = nxt[i] if not field.strip() else None
            if j is not None:
                field, offset = lines[j][1], lines[j][0]
            found.append((i, offset, field))
            at = after
    return found


def _full_rationale(lines: list, nxt: list, aspect: str, i: int) -> Optional[str]:
    """UltraFeedback's layout around the rating on line ``i`` (``Rationale:`` next, and for the typed
    aspects ``Type:`` then ``Rationale:`` before): the rationale to the end of the answer, else None."""
    j = nxt[i]
    at = _label(lines[j][1], "Rationale") if j is not None else None
    if at is None:
        return None
    if aspect in TYPED_ASPECTS:
        types = [k for k in range(i) if _label(lines[k][1], "Type") is not None]
        if not types or not any(_label(lines[k][1], "Rationale") is not None for k in range(types[0] + 1, i)):
            return None
    return "\n".join([lines[j][1][at:]] + [line for _, line in lines[j + 1:]]).strip()


def parse_rating(aspect: str, text: str) -> Optional[dict]:
    """Parse one judge answer for one text, in one pass over its lines (linear time).

    Returns:
        ``{"Rating": "1".."5" | "N/A", "Rationale": str, "parse": "full"|"lenient"|"constrained",
        "rating_offset": int | None, "rating_text": str}`` or None when unparseable.  ``full`` is
        UltraFeedback's layout (markdown bold and header lines tolerated); ``lenient`` a ``Rating: N``
        anywhere; ``constrained`` a bare rating (constrained judges).  Every ``Rating:`` in the answer
        must state the same valid rating: a value off the scale, a fraction, a sign or two different
        ratings make the answer unparseable (re-asked), never a truncated number.  ``rating_offset``
        is the character index of the rating in ``text`` (for the log-prob weighted score).
    """
    clean = text.replace("**", "")
    lines = _lines(clean)
    nxt = _next_filled(lines)
    fields = _rating_fields(lines, nxt)
    if not fields:
        bare = clean.strip()
        if bare not in RATINGS:
            return None
        return {"Rating": bare, "Rationale": "", "parse": "constrained",
                "rating_offset": clean.index(bare) if clean == text else None, "rating_text": bare}
    values = {_rating_value(field, aspect) for _, _, field in fields}
    if len(values) != 1 or None in values:
        return None
    value = values.pop()
    i, offset, field = fields[0]
    rationale = _full_rationale(lines, nxt, aspect, i)
    at = None
    if value != "N/A" and clean == text:
        at = offset + (len(field) - len(field.lstrip()))
    return {"Rating": value, "Rationale": rationale or "", "parse": "lenient" if rationale is None else "full",
            "rating_offset": at, "rating_text": value}


_HEADER = re.compile(r"^[\s#>*]*Output for Text (\d+)\b")


def _sections(text: str, n: int) -> Optional[list]:
    """``[(offset, section)]`` of a multi-text answer: its ``Output for Text 1..n`` sections (exactly
    those, in order), else -- no headers at all -- exactly ``n`` blank-line separated blocks."""
    lines = _lines(text)
    heads = [(start, int(m.group(1))) for start, line in lines for m in [_HEADER.match(line)] if m]
    if heads:
        if [k for _, k in heads] != list(range(1, n + 1)):
            return None
        ends = [start for start, _ in heads[1:]] + [len(text)]
        return [(start, text[start:end]) for (start, _), end in zip(heads, ends)]
    blocks, pos = [], 0
    for block in text.split("\n\n"):
        if block.strip():
            blocks.append((pos, block))
        pos += len(block) + 2
    return blocks if len(blocks) == n else None


def parse_ratings(aspect: str, text: str, n: int) -> Optional[dict]:
    """Parse a multi-text answer for ``n`` texts: ``{"texts": [parse_rating of each section, its
    ``rating_offset`` into ``text``]}``, or None when a section is missing, extra or unparseable."""
    sections = _sections(text, n)
    if sections is None:
        return None
    out = []
    for offset, section in sections:
        parsed = parse_rating(aspect, section)
        if parsed is None:
            return None
        at = parsed["rating_offset"]
        out.append({**parsed, "rating_offset": None if at is None else offset + at})
    return {"texts": out}
