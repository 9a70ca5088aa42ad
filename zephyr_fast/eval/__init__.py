"""Evaluation: MT-Bench answers, FastChat single-answer / pairwise grading through the AIF judge
client, and the report (``mt_bench.py``: :func:`run_mt_bench`, ``zephyr-fast mt-bench``)."""
