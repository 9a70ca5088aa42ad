"""``yaml.safe_load`` with a bound on what aliases expand to.

``safe_load`` builds an alias as a second reference to the anchored object, so ``a: &a [*b, *b, ...]``
nested ten deep is a few hundred bytes of YAML and a small object graph -- until something walks it
as a tree (``dataclasses.asdict``, ``copy.deepcopy``, writing ``config.yaml``), which expands it to
billions of nodes and exhausts memory.  :func:`load` counts the nodes the document has *as a tree*
(shared objects counted every time they are reached; linear in the distinct objects, memoised) and
refuses more than :data:`MAX_NODES`, and a self-referencing alias, in one line naming the source.
A recipe has hundreds of nodes; the budget leaves three orders of magnitude.
"""

from __future__ import annotations

import yaml

MAX_NODES = 100_000


class YamlBudgetError(ValueError):
    """A document whose aliases expand beyond the budget, or refer to themselves."""


def load(stream, source: str):
    """``yaml.safe_load(stream)``, refused when its aliases expand beyond :data:`MAX_NODES` nodes."""
    try:
        data = yaml.safe_load(stream)
        total = _tree_size(data, {}, set(), source)
    except RecursionError:
        raise YamlBudgetError(f"{source}: YAML nested too deeply") from None
    if total > MAX_NODES:
        raise YamlBudgetError(f"{source}: YAML aliases expand to {total} values, over the limit of {MAX_NODES} "
                              "(an alias bomb?); write the values out")
    return data


def _tree_size(node, memo: dict, active: set, source: str) -> int:
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YamlBudgetError(f"{source}: a YAML alias refers to itself (an endless value)")
    active.add(key)
    children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
    total = 1
    for child in children:
        total += _tree_size(child, memo, active, source)
        if total > MAX_NODES:
            break  # already over: no need to size the rest
    active.discard(key)
    memo[key] = total
    return total
