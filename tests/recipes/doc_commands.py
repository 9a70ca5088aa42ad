"""The commands the project's documents tell a user to run, as written: extraction and parsing.

Sources: the README, ``docs/*.md``, ``recipes/README.md``, ``benchmarks/README.md``,
``benchmarks/RESULTS.md``, ``kernels/README.md`` (fenced and indented code blocks, and inline code
that is a whole command) and the header comments of every recipe (``Launch:`` / ``or:`` lines) and of
``recipes/multinode/*``. A command with a placeholder (``RECIPE``, ``MODEL_DIR``, ``...``, ``[--x]``) is
a template, not a command, and is left out.
"""

from __future__ import annotations

import pathlib
import re
import shlex
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = ["README.md", "recipes/README.md", "benchmarks/README.md", "benchmarks/RESULTS.md", "kernels/README.md",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
PROGRAMS = ("python", "python3", "deepspeed", "torchrun", "accelerate", "zephyr-fast", "bash", "pytest", "sbatch")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
PLACEHOLDER = re.compile(r"\.\.\.|\[|\]|\||<|>|\b[A-Z][A-Z0-9_]{2,}\b(?!=)")
HEADER = re.compile(r"^#\s*(?:Launch:|or:|\(one GPU:|[^:]*:)?\s*((?:[A-Z_]+=\S+\s+)*(?:%s)\s.*?)\)?\s*$"
                    % "|".join(map(re.escape, PROGRAMS)))


@dataclass(frozen=True)
class Command:
    source: str  # file (and line) it was read from
    text: str  # the command as written (continuations joined)

    @property
    def env(self) -> dict:
        return dict(w.split("=", 1) for w in self.words_with_env if ENV.match(w))

    @property
    def words_with_env(self) -> list:
        return shlex.split(self.text, comments=True)

    @property
    def argv(self) -> list:
        words = self.words_with_env
        while words and ENV.match(words[0]):
            words = words[1:]
        return words


def _is_command(text: str) -> bool:
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return False
    while words and ENV.match(words[0]):
        words = words[1:]
    if len(words) < 2 or words[0] not in PROGRAMS:
        return False
    args = " ".join(words[1:])
    return not PLACEHOLDER.search(args.replace("HF_HUB_OFFLINE", ""))


def _blocks(lines: list) -> list:
    """``(line number, text)`` of the code lines of a Markdown file, continuations joined."""
    out, fenced, pending, start = [], False, "", 0
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        code = fenced or line.startswith("    ")
        if not code:
            continue
        text = line.strip()
        if pending:
            pending += " " + text
        else:
            pending, start = text, n
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append((start, pending))
        pending = ""
    return out


def from_markdown(rel: str) -> list:
    lines = (REPO / rel).read_text().splitlines()
    found = [Command(f"{rel}:{n}", t) for n, t in _blocks(lines) if _is_command(t)]
    for n, line in enumerate(lines, 1):
        for span in re.findall(r"`([^`\n]+)`", line):
            if _is_command(span):
                found.append(Command(f"{rel}:{n}", span.strip()))
    return found


def from_headers() -> list:
    found = []
    paths = sorted((REPO / "recipes").rglob("*.yaml")) + sorted((REPO / "recipes" / "multinode").iterdir())
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                if path.suffix == ".yaml":
                    break  # the header ends at the first key
                continue
            m = HEADER.match(line)
            if m and _is_command(m.group(1)):
                found.append(Command(f"{path.relative_to(REPO)}:{n}", m.group(1).strip()))
    return found


def documented_commands() -> list:
    seen, out = set(), []
    for c in [cmd for rel in DOCS for cmd in from_markdown(rel)] + from_headers():
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out
