"""Load train/test rows from hub ids or local files, in both alignment-handbook mixture schemas.

Old schema (handbook <= 0.1): ``dataset_mixer: {id: fraction}`` + ``dataset_splits`` (a fraction
subsamples the *train* splits; test splits are used whole). New schema (handbook >= 0.2):
``dataset_mixture: {datasets: [{id, config, split, columns, weight, revision}], seed, test_split_size}``
(``weight`` subsamples or repeats a dataset after a seeded shuffle; ``test_split_size`` rows or
fraction are held out after mixing). docs/DATA.md has examples.

``id``: a ``.json``/``.jsonl``/``.parquet``/``.arrow`` file, a directory of ``<split>.<ext>`` files or
of ``save_to_disk`` output, or a hub id. Every row gets ``_source`` / ``_source_row`` columns so that
errors name the original file and row even after mixing and shuffling.

Never stale: JSON is parsed here (no cache; an unreadable line is a row error naming file and line,
which ``skip_invalid_rows`` can skip), Parquet / Arrow are cached by content digest (``datasets``
keys its own cache by path and mtime), and a hub dataset is read at one resolved commit, offline
too (:func:`resolve_hub_revision`). :func:`rows_digest` is the identity of the rows actually used.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from typing import Optional

from ..fileio import first_line
from ..config import ConfigError
from ..config.data import DataConfig, DatasetMixture, DatasetSpec, check_test_split_value  # noqa: F401 - re-exported
from .chat import DATA_EXTS, ensure_hub_reachable, hub_offline, is_local_path
from .identity import content_cache_dir, file_digest, rows_digest  # noqa: F401 - re-exported
from .validate import (
    LOAD_ERROR_COL,
    SOURCE_COL,
    SOURCE_ROW_COL,
    DataError,
    DataValidationError,
    JsonLinesReader,
    column_names,
    file_error,
    iter_chunks,
    load_errors,
    read_json_rows,
)

log = logging.getLogger(__name__)

LOCAL_EXTS = {e: e[1:].replace("jsonl", "json") for e in DATA_EXTS}  # extension -> datasets builder
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub revision that is already a commit sha
# a JSON Lines file is parsed and converted to Arrow this many rows / bytes of lines at a time (memory, not results)
JSON_CHUNK_ROWS, JSON_CHUNK_BYTES = 4096, 4 << 20


# --- a hub dataset is read at one commit ----------------------------------------------------------


def resolve_hub_revision(repo_id: str, revision: Optional[str] = None, *, split: str = "train",
                         cache_dir: Optional[str] = None) -> str:
    """The commit sha that ``revision`` (a branch, tag or sha; None: ``main``) of a hub dataset names.

    Online: asked of the Hub once, and the load is pinned to it (``datasets`` keys its cache by it).
    Offline: the commit huggingface_hub recorded when it last resolved ``revision`` -- never "the
    newest copy in the cache", which ``datasets`` reads offline whatever revision is asked for.
    """
    rev, where = revision or "main", f"{repo_id}[{split}]"
    if _COMMIT.fullmatch(rev):
        return rev
    if hub_offline():
        from huggingface_hub import constants

        ref = os.path.join(constants.HF_HUB_CACHE, f"datasets--{repo_id.replace('/', '--')}", "refs", rev)
        if os.path.isfile(ref):
            with open(ref) as f:
                return f.read().strip()
        raise file_error(where, f"offline, and no commit is recorded for revision {rev!r} (huggingface_hub's "
                         f"refs/{rev}): pin `revision:` to a commit (cached commits: {_cached_commits(repo_id, cache_dir)}) "
                         "or load it once online", "missing")
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id, revision=rev).sha
    except Exception as exc:  # noqa: BLE001 - not found, gated, no such revision, network: one line each
        raise file_error(where, f"revision {rev!r} could not be resolved on the Hugging Face Hub "
                         f"({type(exc).__name__}: {first_line(exc)})", "missing") from None


def _hub_cache_root(repo_id: str, cache_dir: Optional[str]) -> str:
    """``datasets``' cache folder of a hub id: ``<cache>/<org>___<name>/<config>/<version>/<commit>``."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    org, _, name = repo_id.rpartition("/")
    folder = f"{org}___{camelcase_to_snakecase(name)}" if org else camelcase_to_snakecase(name)
    return os.path.join(os.path.expanduser(cache_dir or str(datasets.config.HF_DATASETS_CACHE)), folder)


def _cached_commits(repo_id: str, cache_dir: Optional[str] = None) -> str:
    paths = glob.glob(os.path.join(_hub_cache_root(repo_id, cache_dir), "*", "*", "*"))
    found = sorted({os.path.basename(p) for p in paths if os.path.isdir(p)})
    return ", ".join(found) or "none"


def _load_cached_commit(repo_id: str, config: Optional[str], split: str, commit: str, revision: str,
                        cache_dir: Optional[str]):
    """Offline: split ``split`` of ``repo_id`` exactly as cached for ``commit`` (``datasets``' Cache builder)."""
    from datasets.packaged_modules.cache.cache import Cache

    root, where = _hub_cache_root(repo_id, cache_dir), f"{repo_id}[{split}]"
    found = sorted(glob.glob(os.path.join(root, glob.escape(config) if config else "*", "*", commit)))
    if len(found) > 1:  # several configs cached for this commit: the recipe must say which
        found = [p for p in found if p.split(os.sep)[-3] == "default"] or found[:0]
    if not found:
        raise file_error(where, f"offline, and commit {commit} of revision {revision!r} is not in the datasets cache "
                         f"{'for config ' + repr(config) + ' ' if config else ''}(cached commits: "
                         f"{_cached_commits(repo_id, cache_dir)}); load it once online", "missing")
    config_name, version = found[0].split(os.sep)[-3:-1]
    builder = Cache(cache_dir=cache_dir, dataset_name=os.path.basename(root).split("___")[-1], repo_id=repo_id,
                    config_name=config_name, version=version, hash=commit)
    try:
        return builder.as_dataset(split=split)
    except (KeyError, ValueError) as exc:
        raise file_error(where, f"no split {split!r} in the cached commit {commit} ({exc})", "missing") from None


# --- loading one split ---------------------------------------------------------------------------


def _find_split_file(directory: str, split: str) -> Optional[str]:
    for ext in LOCAL_EXTS:
        p = os.path.join(directory, split + ext)
        if os.path.isfile(p):
            return p
    return None


def load_split(ds_id: str, split: str, *, config: Optional[str] = None, revision: Optional[str] = None,
               cache_dir: Optional[str] = None, file_is_split: bool = True):
    """One split of one dataset as a ``datasets.Dataset`` (None when a local file has no such split).

    ``file_is_split``: a single local file stands for whatever split is asked (new schema); with
    ``False`` (old schema) a file serves only ``train*`` splits.
    """
    import datasets

    path = os.path.expanduser(ds_id)
    if is_local_path(ds_id):
        if os.path.isfile(path):
            if not file_is_split and "train" not in split:
                log.warning("%s is a single file: used for train splits only, not for split %r", ds_id, split)
                return None
            return _load_file(path, cache_dir)
        if os.path.isdir(path):
            f = _find_split_file(path, split)
            if f is not None:
                return _load_file(f, cache_dir)
            if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
                d = datasets.load_from_disk(path)
                if isinstance(d, datasets.DatasetDict):
                    if split not in d:
                        raise file_error(ds_id, f"no split {split!r} (has {sorted(d)})", "missing_split")
                    return d[split]
                return d
            # datasets keys its cache of a folder by path and mtimes: key it by the folder's content instead
            return datasets.load_dataset(path, config, split=split, cache_dir=content_cache_dir(path, cache_dir))
        raise file_error(ds_id, "no such file or directory", "missing_file")
    try:
        ensure_hub_reachable(ds_id)
    except FileNotFoundError as exc:
        raise file_error(f"{ds_id}[{split}]", first_line(exc).replace(f"dataset '{ds_id}' ", "", 1),
                         "missing_file") from None
    commit = resolve_hub_revision(ds_id, revision, split=split, cache_dir=cache_dir)
    log.info("dataset %s[%s]: revision %s = commit %s", ds_id, split, revision or "main", commit)
    if hub_offline():
        return _load_cached_commit(ds_id, config, split, commit, revision or "main", cache_dir)
    try:
        return datasets.load_dataset(ds_id, config, split=split, revision=commit, cache_dir=cache_dir)
    except (ConnectionError, OSError, ValueError) as exc:  # not found, no such split, network
        raise file_error(f"{ds_id}[{split}]", f"could not be loaded from the Hugging Face Hub or its cache "
                         f"({first_line(exc)}); pass a local path instead (a .json/.jsonl/.parquet/.arrow file "
                         "or a directory)", "missing_file") from None


def _load_file(path: str, cache_dir: Optional[str]):
    import datasets

    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_EXTS:
        raise file_error(path, f"unsupported extension {ext!r} (use one of {sorted(LOCAL_EXTS)})", "unsupported")
    if os.path.getsize(path) == 0:
        raise file_error(path, "the file is empty (0 bytes)", "empty_file")
    if LOCAL_EXTS[ext] == "json":
        ds = _read_json(path)
    else:
        try:  # cache keyed by content: an edited file (even with its old mtime) gets a fresh Arrow copy
            ds = datasets.load_dataset(LOCAL_EXTS[ext], data_files=path, split="train",
                                       cache_dir=content_cache_dir(path, cache_dir))
        except Exception as exc:  # noqa: BLE001 - datasets wraps parser errors in several exception types
            raise file_error(path, f"could not be parsed as {LOCAL_EXTS[ext]} ({first_line(exc)})", "unparsable") from None
    if len(ds) == 0:
        raise file_error(path, "the file has no rows", "empty_file")
    return ds


def _read_json(path: str):
    """The rows of a JSON / JSON Lines file (:func:`read_json_rows`' rows) as a ``datasets.Dataset``.

    JSON Lines are streamed (:func:`_json_lines_dataset`): never the whole file or all its rows in
    memory. A JSON document, or rows whose types only the whole file decides (see there), are read
    whole (:func:`_read_json_whole`). No cache either way: the Arrow copy lives for this process only.
    """
    reader = JsonLinesReader.open(path)
    if reader is not None:
        ds = _json_lines_dataset(reader)
        if ds is not None:
            return ds
    return _read_json_whole(path)


def _read_json_whole(path: str):
    """:func:`read_json_rows` as an in-memory ``datasets.Dataset``."""
    import datasets

    rows = read_json_rows(path)
    names = list(dict.fromkeys(k for r in rows for k in r))
    try:
        return datasets.Dataset.from_dict({n: [r.get(n) for r in rows] for n in names})
    except Exception as exc:  # pyarrow type inference: one field with different types in different rows
        raise file_error(path, f"could not be parsed as json: its rows do not share one schema "
                         f"({exc.__class__.__name__}: {first_line(exc)})", "unparsable") from None


def _json_lines_dataset(reader: JsonLinesReader):
    """The reader's rows as a memory-mapped ``datasets.Dataset`` (an Arrow file in ``datasets``' temporary
    folder, deleted when the process ends), the same dataset :func:`_read_json_whole` builds in memory.

    Each chunk of rows becomes a record batch typed exactly as ``Dataset.from_dict`` types a column
    (``OptimizedTypedSequence``). When the chunks' types differ, the whole file's type is their join
    -- pyarrow's inference of the whole column: null fits anything, int64 and double give double,
    structs take the union of their fields in order of first appearance, lists join their items -- and
    the rows are read again and converted to it. Anything else (a real type clash, an overflow) returns
    None: the whole read then gives the same dataset, or the same error.
    """
    import uuid

    import datasets
    from datasets.fingerprint import get_temporary_cache_files_directory

    names = reader.names
    if not names:
        return None
    path = os.path.join(get_temporary_cache_files_directory(), f"zephyr_fast-rows-{uuid.uuid4().hex}.arrow")
    try:
        joined = _write_chunks(reader, names, path)
        if joined is not None:  # the chunks' types differ: once more, each converted to their join
            _write_chunks(reader, names, path, schema=joined)
    except DataValidationError:
        _remove(path)
        raise
    except _TypesDiffer:
        _remove(path)
        return None
    except Exception:  # noqa: BLE001 - a conversion the whole read must judge (it raises the one-line error)
        _remove(path)
        return None
    return datasets.Dataset.from_file(path)


class _TypesDiffer(Exception):
    """The chunks' types have no join (a type clash the whole read reports)."""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_chunks(reader: JsonLinesReader, names: list, path: str, schema=None):
    """Writes the reader's rows to the Arrow stream file ``path``, a record batch per chunk: typed as
    ``Dataset.from_dict`` types them, or converted to ``schema``. Returns None when every chunk had one
    schema, else the join of their schemas (nothing usable written then); :class:`_TypesDiffer` when
    there is none."""
    import pyarrow as pa
    from datasets.arrow_writer import OptimizedTypedSequence

    first, joined, writer = None, None, None
    with pa.OSFile(path, "wb") as sink:
        try:
            for chunk in reader.chunks(max_rows=JSON_CHUNK_ROWS, max_bytes=JSON_CHUNK_BYTES):
                if schema is None:
                    table = pa.Table.from_pydict({n: OptimizedTypedSequence([r.get(n) for r in chunk], col=n)
                                                  for n in names})
                else:
                    table = pa.Table.from_arrays([pa.array([r.get(n) for r in chunk], type=schema.field(n).type)
                                                  for n in names], schema=schema)
                if first is None:
                    first = joined = table.schema
                    writer = pa.ipc.new_stream(sink, first)
                if table.schema == first:
                    if joined is first:
                        writer.write_table(table)
                    continue
                joined = _join_schemas(joined, table.schema)
        finally:
            if writer is not None:
                writer.close()
    return None if joined is first else joined


def _join_schemas(a, b):
    import pyarrow as pa

    fields = []
    for fa, fb in zip(a, b):
        t = _join_types(fa.type, fb.type)
        if t is None:
            raise _TypesDiffer(fa.name)
        fields.append(pa.field(fa.name, t))
    return pa.schema(fields)


def _join_types(a, b):
    """The type pyarrow infers for the values of a type-``a`` and a type-``b`` array together (None: none)."""
    import pyarrow as pa

    if a == b:
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if {a, b} == {pa.int64(), pa.float64()}:
        return pa.float64()
    if pa.types.is_list(a) and pa.types.is_list(b):
        item = _join_types(a.value_type, b.value_type)
        return None if item is None else pa.list_(item)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {f.name: f.type for f in a}
        for f in b:
            t = _join_types(fields[f.name], f.type) if f.name in fields else f.type
            if t is None:
                return None
            fields[f.name] = t
        return pa.struct(list(fields.items()))
    return None


def _tag(ds, name: str):
    n = len(ds)
    for col in (SOURCE_COL, SOURCE_ROW_COL):
        if col in ds.column_names:
            ds = ds.remove_columns(col)
    return ds.add_column(SOURCE_COL, [name] * n).add_column(SOURCE_ROW_COL, list(range(n)))


def _keep_columns(ds, columns, name):
    if not columns:
        return ds
    have = [c for c in ds.column_names if c not in (SOURCE_COL, SOURCE_ROW_COL, LOAD_ERROR_COL)]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataValidationError([DataError(name, -1, c, f"column not found (has {have})", "missing_column")
                                   for c in missing])
    bookkeeping = [c for c in (SOURCE_COL, SOURCE_ROW_COL, LOAD_ERROR_COL) if c in ds.column_names]
    return ds.select_columns(list(columns) + bookkeeping)


def _reweight(ds, weight: Optional[float], seed: int, name: str):
    if weight is None or weight == 1.0:
        return ds
    import datasets

    whole, frac = int(weight), weight - int(weight)
    parts = [ds] * whole
    if frac > 0:
        parts.append(ds.shuffle(seed=seed).select(range(int(frac * len(ds)))))
    return datasets.concatenate_datasets(parts)


def load_rows(data_cfg: DataConfig) -> dict:
    """Rows for training: ``{"train": datasets.Dataset, "test": datasets.Dataset | None}``.

    Raises (one line each; the launcher ends with status 2):
        DataValidationError: a missing, empty or unreadable file or hub dataset, a missing column, rows
            that cannot be mixed, unreadable lines (unless ``skip_invalid_rows``).
        ConfigError: a recipe value the data contradicts (``test_split_size`` >= the rows).
    """
    import datasets

    if isinstance(data_cfg, dict):
        data_cfg = DataConfig(**data_cfg)
    train_parts, test_parts = [], []
    if data_cfg.dataset_mixer is not None:
        configs = data_cfg.dataset_configs or [None] * len(data_cfg.dataset_mixer)
        for (ds_id, frac), config in zip(data_cfg.dataset_mixer.items(), configs):
            for split in data_cfg.dataset_splits:
                ds = load_split(ds_id, split, config=config, cache_dir=data_cfg.cache_dir, file_is_split=False)
                if ds is None:
                    continue
                name = ds_id if os.path.isfile(os.path.expanduser(ds_id)) else f"{ds_id}[{split}]"
                ds = _keep_columns(_tag(ds, name), data_cfg.columns_to_keep, name)
                if "train" in split:
                    train_parts.append(ds.select(range(int(frac * len(ds)))) if frac < 1 else _reweight(ds, frac, data_cfg.seed, name))
                else:  # a "test*" split (DataConfig checks every split is one or the other)
                    test_parts.append(ds)
        seed = data_cfg.seed
    else:
        mix = data_cfg.dataset_mixture
        for spec in mix.datasets:
            ds = load_split(spec.id, spec.split, config=spec.config, revision=spec.revision, cache_dir=data_cfg.cache_dir)
            name = spec.id if os.path.isfile(os.path.expanduser(spec.id)) else f"{spec.id}[{spec.split}]"
            ds = _keep_columns(_tag(ds, name), spec.columns or data_cfg.columns_to_keep, name)
            train_parts.append(_reweight(ds, spec.weight, mix.seed, name))
        seed = mix.seed
    if not train_parts:
        raise ConfigError("dataset_splits: no train split was loaded (check dataset_splits / dataset_mixture)")
    if not data_cfg.skip_invalid_rows:
        _raise_load_errors(train_parts + test_parts)
    train = _concat(train_parts, "train")
    test = _concat(test_parts, "test") if test_parts else None
    if data_cfg.dataset_mixture is not None and data_cfg.dataset_mixture.test_split_size is not None:
        size = data_cfg.dataset_mixture.test_split_size
        _check_test_split_size(size, len(train))
        split = train.train_test_split(test_size=size, seed=seed)
        train, test = split["train"], split["test"]
    if data_cfg.shuffle:
        train = train.shuffle(seed=seed)
        test = test.shuffle(seed=seed) if test is not None else None
    return {"train": train, "test": test}


def _check_test_split_size(size, n: int) -> None:
    """``test_split_size`` must leave at least one row on each side of the split."""
    check_test_split_value(size)
    n_test = size if isinstance(size, int) else math.ceil(size * n)
    if n_test >= n:
        raise ConfigError(f"dataset_mixture.test_split_size: {size!r} ({n_test} rows) leaves no training rows: the mixed "
                         f"train data has only {n} rows; use fewer than {n} rows or a smaller fraction")


def _raise_load_errors(parts) -> None:
    """Unreadable lines (bad UTF-8, invalid JSON) stop the run here unless ``skip_invalid_rows``."""
    errors = []
    for ds in parts:
        if LOAD_ERROR_COL not in ds.column_names:
            continue
        for _, cols, origins in iter_chunks(ds, [LOAD_ERROR_COL], 4096, "dataset"):
            for v, (name, row) in zip(cols[LOAD_ERROR_COL], origins):
                errors += load_errors(v, dataset=name, row=row)
    if errors:
        raise DataValidationError(errors, sum(len(ds) for ds in parts))


def _concat(parts, what):
    import datasets

    if any(LOAD_ERROR_COL in p.column_names for p in parts):  # every part needs the column to mix
        parts = [p if LOAD_ERROR_COL in p.column_names else p.add_column(LOAD_ERROR_COL, [None] * len(p)) for p in parts]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        raise file_error(f"the {what} datasets", f"cannot be mixed: their columns/types differ ({first_line(exc)}); "
                         "select common columns with `columns` / `columns_to_keep`", "schema") from None
