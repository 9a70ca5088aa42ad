"""8xA100 on paper: an explicit analytical model of a Zephyr-7B dSFT and dDPO step (issue 13).

    python -m benchmarks.scaling             # inputs JSON -> docs/SCALING.md
    python -m benchmarks.scaling --measure   # re-measure the 'measured' inputs first (tokenizer, gpu.json)
    python -m benchmarks.scaling --check     # exit 1 if docs/SCALING.md is not what the inputs give

Every figure in docs/SCALING.md is computed from ``benchmarks/scaling/inputs.json`` (each input
carries its source); the document is never edited by hand. The package:
``model.py`` (the analytical model), ``measure.py`` (the ``--measure`` step), ``doc.py`` (the markdown and
the command line), ``inputs.json`` (every input with its source).
"""

from benchmarks.scaling.doc import DOC, main, render

__all__ = ["DOC", "main", "render"]
