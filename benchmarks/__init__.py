"""zephyr_fast benchmark suite: ``pytest benchmarks/`` (pytest-benchmark) and ``python -m benchmarks.report``.

Layout (one file per job):

* ``harness.py``  — shape registry, provider availability, timing with warm-up + sync, peak memory,
  ``extra_info`` recording.
* ``inputs.py``   — realistic inputs: peaked ("trained-like") or random-normal LM-head inputs, real
  sequence lengths from the bundled samples.
* ``lm_head.py``  — the LM-head cases (fused log-probs / CE / DPO) for every provider.
* ``model_cases.py`` — packed vs padded forward+backward and DPO steps of a Mistral model.
* ``e2e.py``      — one-epoch zephyr_fast trainer runs vs TRL's DPOTrainer / SFTTrainer.
* ``memprobe.py`` — CPU peak-RSS growth of one case, measured in a fresh subprocess.
* ``test_*.py``   — the suites; ``report.py`` — JSON → ``RESULTS.md`` + PNG chart.
* ``gpu_check.sh`` / ``gpu_check.py`` — the one prepared script for a lent GPU.
"""
