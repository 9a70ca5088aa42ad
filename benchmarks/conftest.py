"""``pytest benchmarks/``: set-up of the benchmark suite (independent of tests/conftest.py).

* Benchmarks never run Triton through the CPU interpreter — that would time the interpreter.  On CPU
  the zephyr_fast provider is the chunked ``impl="torch"`` path, on CUDA the Triton kernels.
* CUDA-only benchmarks carry ``@pytest.mark.cuda`` and are skipped without a device.
* Every run writes pytest-benchmark JSON (``--benchmark-json`` if given, else
  ``benchmarks/results/latest.json`` for a full run and ``partial.json`` for a filtered one) and
  turns it into a Markdown report + PNG chart (``benchmarks/report.py``).  A full, unfiltered
  ``pytest benchmarks/`` run (re)writes ``benchmarks/RESULTS.md``; a filtered one (``-k``/``-m``/
  single files) writes only ``benchmarks/results/RESULTS.md``, so a partial run never replaces the
  full figures.  ``ZF_BENCH_NOTES`` adds a note (e.g. the machine's load) to the report.
"""

import os

# Must happen before anything imports triton (see the module docstring).
os.environ.pop("TRITON_INTERPRET", None)

import pathlib  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

_T0 = time.time()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        RESULTS_DIR.mkdir(exist_ok=True)
        # a partial run must not replace the full run's JSON (what `python -m benchmarks.report` reads)
        name = "latest.json" if _is_full_run(config) else "partial.json"
        config.option.benchmark_json = RESULTS_DIR / name


# run before pytest-benchmark's own (trylast) pytest_configure reads the option
pytest_configure = pytest.hookimpl(tryfirst=True)(pytest_configure)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


_SKIPPED: list = []


def pytest_runtest_logreport(report):
    # anchors that cannot run are skipped with a reason; the report lists them (never silently absent)
    if report.skipped and isinstance(report.longrepr, tuple):
        _SKIPPED.append({"test": report.nodeid.split("::")[-1], "reason": str(report.longrepr[2])})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from .harness import device_name, versions

    output_json["zephyr_fast"] = {
        "suite_wall_s": time.time() - _T0,
        "skipped": _SKIPPED,
        "device_name": device_name(),
        "versions": versions(),
        "full_run": _is_full_run(config),
        "notes": os.environ.get("ZF_BENCH_NOTES", ""),
        "threads": torch.get_num_threads(),
    }


def _is_full_run(config) -> bool:
    if config.option.keyword or config.option.markexpr:
        return False
    args = [pathlib.Path(a.split("::")[0]).resolve() for a in config.args]
    return args == [BENCH_DIR]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    # pytest-benchmark's hookwrapper has written the JSON before this runs.
    path = session.config.option.benchmark_json if hasattr(session.config.option, "benchmark_json") else None
    bench_session = getattr(session.config, "_benchmarksession", None)
    if path is None or not pathlib.Path(path).exists() or not getattr(bench_session, "benchmarks", None):
        return  # nothing was measured in this session (e.g. --collect-only, all skipped)
    from .report import write_report

    out = BENCH_DIR / "RESULTS.md" if _is_full_run(session.config) else RESULTS_DIR / "RESULTS.md"
    try:
        write_report(pathlib.Path(path), out)
    except Exception as exc:  # the report must not hide benchmark results; say why it failed
        print(f"\n[benchmarks] report generation failed: {type(exc).__name__}: {exc}")
    else:
        print(f"\n[benchmarks] report written to {out}")
