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


_FULL = {
    "instruction_following": r"Rating:\s*(?P<rating>.+?)\s*\n+\s*Rationale:\s*(?P<rationale>.+)",
    "honesty": r"Rating:\s*(?P<rating>.+?)\s*\n+\s*Rationale:\s*(?P<rationale>.+)",
    "truthfulness": r"Type:\s*(?P<type>.+?)\s*\n+\s*Rationale:\s*.+?\n+\s*Rating:\s*(?P<rating>.+?)\s*\n+"
                    r"\s*Rationale:\s*(?P<rationale>.+)",
    "helpfulness": r"Type:\s*(?P<type>.+?)\s*\n+\s*Rationale:\s*.+?\n+\s*Rating:\s*(?P<rating>.+?)\s*\n+"
                   r"\s*Rationale:\s*(?P<rationale>.+)",
}
NA_ASPECTS = ("instruction_following", "honesty")  # annotate_preference.py accepts "N/A" for these


def _rating_value(field: str, aspect: str) -> Optional[str]:
    field = field.strip()
    if field.upper().startswith("N/A"):
        return "N/A" if aspect in NA_ASPECTS else None
    nums = re.findall(r"\b\d+\b", field)
    return nums[0] if nums and nums[0] in RATINGS else None


def parse_rating(aspect: str, text: str) -> Optional[dict]:
    """Parse one judge answer for one text.

    Returns:
        ``{"Rating": "1".."5" | "N/A", "Rationale": str, "parse": "full"|"lenient"|"constrained",
        "rating_offset": int | None}`` or None when unparseable.  ``full`` is UltraFeedback's
        pattern (markdown bold and header lines tolerated); ``lenient`` is a lone ``Rating: N``;
        ``constrained`` a bare digit (constrained judges).  ``rating_offset`` is the character index
        of the rating digit in ``text`` (for the log-prob weighted score).
    """
    clean = text.replace("**", "")
    m = re.search(_FULL[aspect], clean, re.DOTALL)
    kind = "full"
    if m is None:
        m, kind = re.search(r"Rating:\s*(?P<rating>[^\n]+)", clean), "lenient"
    if m is None:
        m, kind = re.fullmatch(r"\s*(?P<rating>\d)\d*\s*", clean), "constrained"
    if m is None:
        return None
    value = _rating_value(m.group("rating"), aspect)
    if value is None:
        return None
    rationale = m.groupdict().get("rationale") or ""
    offset = None
    if value != "N/A" and clean == text:
        offset = m.start("rating") + m.group("rating").find(value)
    return {"Rating": value, "Rationale": rationale.strip(), "parse": kind, "rating_offset": offset,
            "rating_text": value}
