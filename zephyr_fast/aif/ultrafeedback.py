"""UltraFeedback's protocol: principle system prompts for generation, four-aspect judge templates.

Sources (verbatim string data in ``zephyr_fast/aif/data/``, provenance in ``data/PROVENANCE.md``):
OpenBMB/UltraFeedback ``src/comparison_data_generation/main.py`` (principles, how one is picked per
completion) and ``src/data_annotation/preference_templates.py`` / ``annotate_preference.py`` (the
four aspects, their rubrics, output format and parser).

One deliberate change: UltraFeedback rates four texts in one request; here each completion is rated
on its own (the same rubric with the ``<text 2..4>`` slots and their output blocks removed), so that
a rating depends only on (prompt, completion, judge, template) — the cache key — and not on which
other completions happened to share the request.  ``TEMPLATE_VERSION`` names this adaptation.
"""

from __future__ import annotations

import functools
import json
import pathlib
import random
import re
from typing import Optional

from ..data.binarize import ASPECTS  # the four UltraFeedback aspects, one definition

DATA = pathlib.Path(__file__).resolve().parent / "data"
TEMPLATE_VERSION = "ultrafeedback@bf80fd4/single-text-v1"
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


def _single_text(template: str) -> str:
    """The four-text template reduced to one text: ``<text 2..4>`` lines and the ``Output for Text
    2..4`` blocks removed, every other character kept."""
    paras = template.split("\n\n")
    paras = [p for p in paras if not re.match(r"#+ Output for Text [234]\b", p)]
    text = "\n\n".join(paras)
    return "\n".join(line for line in text.split("\n") if not re.match(r"<text [234]> ", line))


def system_prompt() -> str:
    sp = _load("ultrafeedback_templates.json")["templates"]["system_prompt"]
    sp = sp.replace('four text outputs ("Text")', 'one text output ("Text")')
    return sp.replace("\nThe four texts given are independent, and should be evaluated separately.", "")


def template(aspect: str, with_world_knowledge: bool = False) -> str:
    """The single-text rubric of ``aspect`` with ``{instruction}``, ``{text_1}`` (and
    ``{world_knowledge}`` for truthfulness/helpfulness when ``with_world_knowledge``)."""
    if aspect not in ASPECTS:
        raise ValueError(f"unknown aspect {aspect!r}; expected one of {ASPECTS}")
    name = f"{aspect}_template"
    if aspect in ("truthfulness", "helpfulness"):
        name += "_with_answer" if with_world_knowledge else "_without_answer"
    return _single_text(_load("ultrafeedback_templates.json")["templates"][name])


def judge_messages(aspect: str, instruction: str, completion: str, world_knowledge: Optional[str] = None,
                   constrained: bool = False) -> list:
    """Chat messages asking the judge to rate one completion on one aspect.

    ``constrained``: the answer is forced to a rating token (``logit_bias``), so the output
    section asks for the rating only.
    """
    tpl = template(aspect, with_world_knowledge=world_knowledge is not None)
    fields = {"instruction": instruction, "text_1": completion, "world_knowledge": world_knowledge or ""}
    user = re.sub(r"\{(instruction|text_1|world_knowledge)\}", lambda m: fields[m.group(1)], tpl)
    if constrained:
        user += "Rating for text 1 (one digit, 1 to 5):"
    return [{"role": "system", "content": system_prompt()}, {"role": "user", "content": user}]


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
