"""Issue 12: a hub dataset is read at one resolved commit, never "whatever is newest in the cache".

``datasets`` offline picks the most recently modified cached copy of a hub id, whatever revision was
asked for. These tests build a ``datasets`` cache holding two commits of a hub dataset (the layout
``datasets`` writes: ``<cache>/<org>___<name>/<config>/<version>/<commit sha>``), make the wrong one
the newest, and check that the loader reads the commit the recipe names (or the one ``main`` was
last resolved to, as recorded by huggingface_hub).
"""

import glob
import json
import os
import shutil

import pytest

from zephyr_fast.data import loading
from zephyr_fast.data.loading import DataConfig, load_rows, rows_digest
from zephyr_fast.data.validate import DataValidationError

REPO, NAME = "HuggingFaceH4/ultrachat_200k", "ultrachat_200k"
OLD, NEW = "a" * 40, "b" * 40


def _commit(tmp_path, cache, sha, texts, when):
    """Write the cached Arrow copy of commit ``sha`` as ``datasets`` lays it out, modified at ``when``."""
    from datasets.packaged_modules.json.json import Json

    src = tmp_path / f"{sha[:4]}.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant",
                                                                                    "content": t}]}) + "\n"
                           for t in texts))
    build = tmp_path / "build"
    Json(cache_dir=str(build), dataset_name=NAME, config_name="default", hash=sha,
         data_files={"train_sft": str(src)}).download_and_prepare()
    dest = cache / f"HuggingFaceH4___{NAME}" / "default" / "0.0.0" / sha
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(glob.glob(str(build / NAME / "*" / "*" / sha))[0], dest)
    info = json.loads((dest / "dataset_info.json").read_text())
    (dest / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    os.utime(dest, (when, when))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A datasets cache with commits OLD (rows a, b) and NEW (row c, the newest), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "datasets"
    _commit(tmp_path, cache, OLD, ["a", "b"], 1_000_000)
    _commit(tmp_path, cache, NEW, ["c"], 2_000_000)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return cache


def _ref(tmp_path, revision, sha):
    """What huggingface_hub records when it resolves ``revision`` online."""
    ref = tmp_path / "hub" / f"datasets--{REPO.replace('/', '--')}" / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(sha)


def _texts(cache, **spec):
    cfg = DataConfig(dataset_mixture={"datasets": [{"id": REPO, "split": "train_sft", **spec}]}, shuffle=False,
                     cache_dir=str(cache))
    rows = load_rows(cfg)["train"]
    return [m[0]["content"] for m in rows["messages"]], rows


def test_offline_pinned_commit_is_read_not_the_newest(offline_cache):
    assert _texts(offline_cache, revision=OLD)[0] == ["a", "b"]
    assert _texts(offline_cache, revision=NEW)[0] == ["c"]
    assert rows_digest(_texts(offline_cache, revision=OLD)[1]) != rows_digest(_texts(offline_cache, revision=NEW)[1])


def test_offline_branch_is_the_commit_it_was_last_resolved_to(offline_cache, tmp_path):
    _ref(tmp_path, "main", OLD)
    assert _texts(offline_cache)[0] == ["a", "b"]  # main -> OLD, although NEW is newer in the cache
    _ref(tmp_path, "v2", NEW)
    assert _texts(offline_cache, revision="v2")[0] == ["c"]


def test_offline_unresolvable_revision_is_one_line(offline_cache, tmp_path):
    with pytest.raises(DataValidationError) as info:
        _texts(offline_cache)
    msg = str(info.value)
    assert msg.startswith(f"{REPO}[train_sft]: offline, and no commit is recorded for revision 'main'") and "\n" not in msg
    assert f"cached commits: {OLD}, {NEW})" in msg
    _ref(tmp_path, "main", "c" * 40)
    with pytest.raises(DataValidationError, match=f"commit {'c' * 40} of revision 'main' is not in the datasets cache"):
        _texts(offline_cache)


def test_online_revision_is_resolved_once_and_passed_as_the_commit(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    asked, loaded = [], []

    class Info:
        sha = OLD

    def dataset_info(self, repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return Info()

    def load_dataset(path, name=None, split=None, revision=None, cache_dir=None, **kw):
        loaded.append((path, split, revision))
        return datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "ensure_hub_reachable", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    _texts(tmp_path)
    assert asked == [(REPO, "main")] and loaded == [(REPO, "train_sft", OLD)]
    _texts(tmp_path, revision=NEW)  # a commit sha is used as given
    assert asked == [(REPO, "main")] and loaded[-1] == (REPO, "train_sft", NEW)
