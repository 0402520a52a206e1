"""A Hugging Face Hub id, asked about once and quickly, before any work.

Without this, a Hub id on a machine without network is found out by transformers after minutes of
retries on every file. `check_hub_model` asks the Hub one question (the model's info, one request, a
short timeout) and then:
- the Hub answers: the load goes on as usual;
- the Hub says there is no such model, and none is cached: a one-line error;
- the Hub cannot be reached (no network, DNS, a refused connection, a timeout, a server error): a model
  in the local cache is loaded from it, offline (`HF_HUB_OFFLINE` is set for the rest of the run, so no
  file is asked for again); one that is not cached is a one-line error saying so.
With `HF_HUB_OFFLINE` set by the user the Hub is never asked: the model is in the cache or it is an error.
This module imports huggingface_hub only when a Hub id is checked.
"""

from __future__ import annotations

import os

from aloe_cli.errors import AloeError, first_line

PROBE_TIMEOUT = 10.0  # seconds for the one question to the Hub
_checked: set[tuple[str, str]] = set()
_unreachable: str | None = None  # why the Hub could not be reached, once it could not


def check_hub_model(repo_id: str, filename: str = "config.json") -> None:
    """AloeError now, in one line, unless `repo_id` can be loaded: from the Hub, or (offline) from the cache
    when its `filename` is there."""
    global _unreachable
    if (repo_id, filename) in _checked:
        return
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise AloeError(f"model {repo_id}: no such local folder, and reading a Hub id needs huggingface_hub "
                        "(pip install huggingface_hub)") from None
    try:
        cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception as exc:  # an id the Hub cannot have
        raise AloeError(f"model {repo_id}: no such local folder, and not a Hub id: {first_line(exc)}") from None
    cure = f"download it where there is a network (hf download {repo_id}) or give a local folder"
    if constants.HF_HUB_OFFLINE and _unreachable is None:
        if not cached:
            raise AloeError(f"model {repo_id}: no such local folder, and HF_HUB_OFFLINE is set but it is not in "
                            f"the Hugging Face cache ({constants.HF_HUB_CACHE}): {cure}")
    elif _unreachable is not None:
        if not cached:
            raise AloeError(f"model {repo_id}: no such local folder, not in the Hugging Face cache, and the Hub "
                            f"cannot be reached ({_unreachable}): {cure}")
    else:
        try:
            HfApi().model_info(repo_id, timeout=PROBE_TIMEOUT)
        except GatedRepoError:
            pass  # it exists; the load says what access it needs
        except RepositoryNotFoundError:
            if not cached:
                raise AloeError(f"model {repo_id}: no such local folder, and no such model on the Hugging Face Hub "
                                f"({constants.ENDPOINT}); a private or gated one needs a token (HF_TOKEN, or "
                                "hf auth login)") from None
        except Exception as exc:  # no network, DNS, refused, timed out, a proxy or server error
            _unreachable = f"{constants.ENDPOINT}: {first_line(exc)}"
            if not cached:
                raise AloeError(f"model {repo_id}: no such local folder, not in the Hugging Face cache, and the "
                                f"Hub cannot be reached ({_unreachable}): {cure}") from None
            _go_offline(constants)
    _checked.add((repo_id, filename))


def _go_offline(constants) -> None:
    """Every later Hub call in this run (transformers', ours) reads the cache without asking the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


__all__ = ["PROBE_TIMEOUT", "check_hub_model"]
