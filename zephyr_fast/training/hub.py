"""Pushing to the Hugging Face Hub (``push_to_hub``): checked at start, pushed per ``hub_strategy``.

:func:`check` runs before any data work: it resolves the token (``hub_token``, else ``$HF_TOKEN`` /
the cached login), asks the Hub who that is, creates the repo (``hub_model_id``, default the
output_dir's name under the token's user; ``hub_private_repo``) and the branch
(``hub_model_revision``). A missing token or an unreachable / refusing Hub is one
:class:`~zephyr_fast.config.ConfigError` line saying how to run without pushing -- never a
failure at the end of training.

``hub_strategy`` follows HF Trainer's names. The checkpoints here are resumable training states
(not loadable models), so the model itself is uploaded by :func:`push_final` after the export:

* ``end``: only :func:`push_final` (the exported model, tokenizer, card, logs);
* ``every_save``: at every checkpoint the output_dir's logs / config (``metrics.jsonl``, ``runs/``,
  ``config.yaml``), then the model at the end;
* ``checkpoint``: as ``every_save`` plus the newest checkpoint as ``last-checkpoint/`` (resume from
  the Hub with ``resume_from_checkpoint: last-checkpoint`` after downloading it);
* ``all_checkpoints``: as ``every_save`` plus every checkpoint under its own ``checkpoint-N/``.

Uploads run on rank 0 only (the caller's business) and block until committed, so a checkpoint
rotated away by ``save_total_limit`` is never half uploaded. A file that contains the token (a
resolved config written with ``hub_token`` in it) is never uploaded; :func:`redact_secrets` gives the
config with the secrets masked, for anything that publishes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError

from zephyr_fast.config import ConfigError, TrainingConfig
from zephyr_fast.config.values import HUB_STRATEGIES
from zephyr_fast.fileio import first_line

logger = logging.getLogger(__name__)

NO_PUSH = "or run without pushing: --push_to_hub=false"
# never uploaded with the output_dir: checkpoints (per strategy), half-written ones, local caches
IGNORE = ["_*", "checkpoint-*", ".checkpoint-*", "ref_logps/*", "wandb/*", "wandb_run_id", ".zephyr_fingerprint.json",
          ".zephyr_fast.lock"]
SECRET_KEYS = ("hub_token",)
_SCAN_BYTES = 16 << 20  # files up to this size are searched for the token before an upload


def redact_secrets(config: dict) -> dict:
    """A copy of a (sectioned or flat) config dict with every :data:`SECRET_KEYS` value masked."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out[k] = redact_secrets(v)
        else:
            out[k] = "<redacted>" if k in SECRET_KEYS and v else v
    return out


@dataclass
class HubTarget:
    """Where pushes go: a repo that exists (created by :func:`check`), the branch and the token."""

    repo_id: str
    token: str
    strategy: str
    endpoint: str
    revision: Optional[str] = None

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)


def endpoint() -> str:
    """``$HF_ENDPOINT`` (read now, so a test or launcher can point elsewhere) or huggingface_hub's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check(t: TrainingConfig, output_dir: str) -> Optional[HubTarget]:
    """The push target when ``push_to_hub`` is on (None otherwise), with the repo created; one-line
    ``ConfigError`` when the strategy is unknown, there is no token, or the Hub is unreachable or refuses."""
    if not t.push_to_hub:
        return None
    if t.hub_strategy not in HUB_STRATEGIES:
        raise ConfigError(f"hub_strategy: must be one of {' | '.join(HUB_STRATEGIES)}, got {t.hub_strategy!r}")
    token = t.hub_token or get_token()
    if not token:
        raise ConfigError(f"push_to_hub: no Hugging Face token (set hub_token, $HF_TOKEN or run `hf auth login`), "
                          f"{NO_PUSH}")
    url = endpoint()
    api = HfApi(endpoint=url, token=token)
    user = _call("whoami", url, api.whoami)["name"]
    repo_id = repo_id_for(t.hub_model_id, user, output_dir)
    _call(f"creating {repo_id}", url, api.create_repo, repo_id, private=t.hub_private_repo, exist_ok=True)
    if t.hub_model_revision:
        _call(f"creating branch {t.hub_model_revision}", url, api.create_branch, repo_id,
              branch=t.hub_model_revision, exist_ok=True)
    return HubTarget(repo_id, token, t.hub_strategy, url, t.hub_model_revision)


def repo_id_for(hub_model_id: Optional[str], user: str, output_dir: str) -> str:
    """HF's rule: ``hub_model_id`` as given when it has an owner, else under the token's user; default
    the output_dir's name."""
    name = hub_model_id or os.path.basename(os.path.abspath(output_dir))
    return name if "/" in name else f"{user}/{name}"


def _call(what: str, url: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a Hub refusal or an unreachable Hub becomes one ConfigError line."""
    try:
        return fn(*args, **kwargs)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status == 401:
            raise ConfigError(f"push_to_hub: the Hub at {url} rejected the token (401 on {what}); set a valid "
                              f"hub_token / $HF_TOKEN, {NO_PUSH}") from None
        raise ConfigError(f"push_to_hub: {what} failed at {url}: {first_line(e)}; {NO_PUSH}") from None
    except Exception as e:  # noqa: BLE001 - the HTTP client's (httpx) connect / timeout errors share no base but this
        raise ConfigError(f"push_to_hub: cannot reach the Hugging Face Hub at {url} ({first_line(e)}); check the "
                          f"network or $HF_ENDPOINT, {NO_PUSH}") from None


def push_checkpoint(target: Optional[HubTarget], output_dir: str, checkpoint_dir: str) -> list:
    """After a checkpoint is written (rank 0): what ``hub_strategy`` uploads; returns the commits. A failed
    upload is a warning, not the end of training (the checkpoint is safe on disk; the final push retries)."""
    if target is None or target.strategy == "end":
        return []
    api, name = target.api(), os.path.basename(os.path.normpath(checkpoint_dir))
    commits = []
    try:
        commits.append(_upload(api, target, output_dir, None, f"Training in progress, {name}", IGNORE))
        if target.strategy in ("checkpoint", "all_checkpoints"):
            dest = "last-checkpoint" if target.strategy == "checkpoint" else name
            commits.append(_upload(api, target, checkpoint_dir, dest, f"{name} as {dest}", None))
    except Exception as e:  # noqa: BLE001 - any HTTP / Hub failure: keep training, say so
        logger.warning("push_to_hub: pushing %s to %s failed (%s); training continues", name, target.repo_id,
                       first_line(e))
    return commits


def push_final(target: Optional[HubTarget], output_dir: str) -> Optional[object]:
    """After the final export (rank 0): the model, tokenizer, card and logs in ``output_dir``."""
    if target is None:
        return None
    return _upload(target.api(), target, output_dir, None, "End of training", IGNORE)


def _upload(api: HfApi, target: HubTarget, folder: str, path_in_repo, message: str, ignore):
    secret = files_containing(folder, target.token)
    if secret:
        logger.warning("push_to_hub: not uploading %s: it contains the Hub token", ", ".join(secret))
    ignore = list(ignore or []) + secret
    return api.upload_folder(repo_id=target.repo_id, folder_path=folder, path_in_repo=path_in_repo,
                             commit_message=message, revision=target.revision, ignore_patterns=ignore)


def files_containing(folder: str, secret: str) -> list:
    """Paths (relative, ``/``-separated) of the files under ``folder`` up to 16 MiB that contain ``secret``."""
    found, needle = [], secret.encode()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.getsize(path) <= _SCAN_BYTES:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return found
