"""``pytest benchmarks/``: set-up of the benchmark suite (independent of tests/conftest.py).

* Benchmarks never run Triton through the CPU interpreter — that would time the interpreter.  On CPU
  the zephyr_fast provider is the chunked ``impl="torch"`` path, on CUDA the Triton kernels.
* CUDA-only benchmarks carry ``@pytest.mark.cuda`` and are skipped without a device.
* Two tiers.  ``pytest benchmarks/`` runs the kernel tier (LM-head kernels, packing, checkpoint
  verification; < 10 minutes on 2 cores).  ``pytest benchmarks/ --e2e`` runs only the tests marked
  ``e2e``: whole training processes of zephyr_fast and TRL (TRL's own runs alone take about
  10 minutes on 2 cores, which is why they are a tier of their own).
* Every run writes pytest-benchmark JSON (``--benchmark-json`` if given, else
  ``benchmarks/results/latest.json`` for a full kernel-tier run, ``e2e.json`` for a full e2e-tier
  run and ``partial.json`` for a filtered one) and turns it into a Markdown report + PNG chart
  (``benchmarks/report.py``).  A full, unfiltered run of either tier (re)writes
  ``benchmarks/RESULTS.md`` from every tier's latest JSON (and ``gpu.json``); a filtered one (``-k``/
  ``-m``/single files) writes only ``benchmarks/results/RESULTS.md``, so a partial run never replaces
  the full figures.  ``ZF_BENCH_NOTES`` adds a note (e.g. the machine's load) to the report.
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


def pytest_addoption(parser):
    parser.addoption("--e2e", action="store_true", default=False,
                     help="run the e2e tier (whole training processes, zephyr_fast vs TRL) instead of the kernel tier")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores")
    config.addinivalue_line("markers", "e2e: whole-process tier, run by `pytest benchmarks/ --e2e` only")
    if getattr(config.option, "benchmark_json", None) is None and hasattr(config.option, "benchmark_json"):
        RESULTS_DIR.mkdir(exist_ok=True)
        # a partial run must not replace the full run's JSON (what `python -m benchmarks.report` reads)
        name = TIER_JSON[_tier(config)] if _is_full_run(config) else "partial.json"
        config.option.benchmark_json = RESULTS_DIR / name


# run before pytest-benchmark's own (trylast) pytest_configure reads the option
pytest_configure = pytest.hookimpl(tryfirst=True)(pytest_configure)


def pytest_collection_modifyitems(config, items):
    # one tier per session: the e2e-marked tests with --e2e, every other test without it
    want_e2e = _tier(config) == "e2e"
    keep = [i for i in items if (i.get_closest_marker("e2e") is not None) == want_e2e]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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
        "tier": _tier(config),
        "notes": os.environ.get("ZF_BENCH_NOTES", ""),
        "threads": torch.get_num_threads(),
    }


TIER_JSON = {"kernel": "latest.json", "e2e": "e2e.json"}


def _tier(config) -> str:
    return "e2e" if config.getoption("--e2e", default=False) else "kernel"


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
    from .report import default_inputs, write_report

    full = _is_full_run(session.config)
    out = BENCH_DIR / "RESULTS.md" if full else RESULTS_DIR / "RESULTS.md"
    # a full run of one tier re-renders with the other tier's (and the GPU's) latest figures, in the
    # report's own order (kernel tier, e2e tier, GPU), this run's JSON in its tier's place
    own = pathlib.Path(path)
    inputs = [own if p.name == TIER_JSON[_tier(session.config)] else p for p in default_inputs()]
    try:
        write_report((inputs if own in inputs else inputs + [own]) if full else own, out)
    except Exception as exc:  # the report must not hide benchmark results; say why it failed
        print(f"\n[benchmarks] report generation failed: {type(exc).__name__}: {exc}")
    else:
        print(f"\n[benchmarks] report written to {out}")
