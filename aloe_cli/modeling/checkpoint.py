"""What loss-token counting reads from a checkpoint, without transformers: tokenizer and chat template.

`load_checkpoint(ref)` takes a local model folder or a Hub id (read from the
Hugging Face cache when tokenizer.json is there, else downloaded) and returns
- `tokenizer.json` loaded with the `tokenizers` library and set up the way
  transformers' fast tokenizer sets it up for `apply_chat_template(tokenize=True)`
  (`tokenizer_config.json`'s added and special tokens, `split_special_tokens`,
  no truncation or padding);
- the named special tokens, which chat templates see as variables;
- the chat template, found where transformers finds it (`chat_template.jinja`,
  else `tokenizer_config.json`'s `chat_template`, else a processor's
  `chat_template.json`).

Importing transformers 5 imports torch (~700 MB of resident memory), which
`aloe mix` must not pay for; the tests hold what is read here equal to
transformers'.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError, first_line

# The named special tokens of transformers 5 tokenizers; chat templates see them as variables.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_TEMPLATE_FILE = "chat_template.jinja"  # wins over tokenizer_config.json's chat_template, as in transformers
_PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # a processor's {"chat_template": ...}, the last resort


@dataclass
class Checkpoint:
    """What loss-token counting needs from a model folder or Hub repository."""

    tokenizer: Any  # tokenizers.Tokenizer, set up like transformers' fast tokenizer
    special_tokens: dict[str, str]  # template variables: bos_token, eos_token, ... (transformers' special_tokens_map)
    chat_template: str | None


def load_checkpoint(ref: str) -> Checkpoint:
    """tokenizer.json, special tokens and chat template of a local folder or a Hub repository (HF cache first)."""
    fetch = _file_fetcher(ref)
    tokenizer_path = fetch(_TOKENIZER_FILE, required=True)
    template_path = fetch(_TEMPLATE_FILE)
    config_path = fetch(_CONFIG_FILE)
    config = _read_json(ref, config_path) if config_path is not None else {}
    if "added_tokens_decoder" not in config:  # transformers reads the legacy special-token file only then
        legacy_path = fetch(_LEGACY_SPECIAL_TOKENS_FILE)
        if legacy_path is not None:
            config = {**config, **_read_json(ref, legacy_path)}  # its entries win, as in transformers
    template = _read_text(ref, template_path) if template_path is not None else _config_template(config)
    if template is None:
        processor_path = fetch(_PROCESSOR_TEMPLATE_FILE)
        if processor_path is not None:
            template = _config_template(_read_json(ref, processor_path))
    tokenizer = _load_tokenizer_json(ref, tokenizer_path, config)
    return Checkpoint(tokenizer, _special_tokens_map(config), template)


def _file_fetcher(ref: str) -> Callable[..., Path | None]:
    """fetch(name, required=False) -> the path of one file of the checkpoint, or None when it has none."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return _folder_fetcher(ref, folder)
    if folder.exists():
        raise AloeError(f"cannot load tokenizer {ref!r}: not a folder (give the model folder that holds "
                        f"{_TOKENIZER_FILE})")
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or not ref.strip():
        raise AloeError(f"cannot load tokenizer {ref!r}: no such folder")
    return _hub_fetcher(ref)


def _folder_fetcher(ref: str, folder: Path) -> Callable[..., Path | None]:
    def fetch_local(name: str, required: bool = False) -> Path | None:
        path = folder / name
        if path.is_file():
            return path
        if required:
            raise AloeError(f"cannot load tokenizer {ref!r}: the folder has no {name} (loss-token counting "
                            "needs a fast tokenizer's tokenizer.json)")
        return None

    return fetch_local


def _hub_fetcher(repo_id: str) -> Callable[..., Path | None]:
    """Files of a Hub repository: from the Hugging Face cache when tokenizer.json is there, else downloaded.

    A cached snapshot holds every tokenizer file the repository has (a full
    download, transformers' or ours), so once tokenizer.json is cached the
    snapshot is read like a local folder and the Hub is never asked: this
    works offline and costs no round trip.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise AloeError(f"cannot load tokenizer {repo_id!r}: no such folder, and reading a Hub id needs "
                        "huggingface_hub (pip install huggingface_hub)") from None
    try:
        cached = try_to_load_from_cache(repo_id, _TOKENIZER_FILE)
    except Exception as exc:  # an invalid repo id
        raise AloeError(f"cannot load tokenizer {repo_id!r}: {first_line(exc)}") from None
    if isinstance(cached, str):
        return _folder_fetcher(repo_id, Path(cached).parent)
    from aloe_cli.modeling.hub import check_hub_model

    try:  # not cached: one quick question to the Hub, not minutes of retries per file when it cannot be reached
        check_hub_model(repo_id, _TOKENIZER_FILE)
    except AloeError as error:
        raise AloeError(f"cannot load tokenizer {repo_id!r}: {error}") from None

    def fetch_hub(name: str, required: bool = False) -> Path | None:
        try:
            with _quiet_hub_logs():
                return Path(hf_hub_download(repo_id, name))
        except LocalEntryNotFoundError:
            if not required:
                return None
            raise AloeError(f"cannot load tokenizer {repo_id!r}: no such folder, and its {name} is neither in the "
                            "Hugging Face cache nor downloadable (offline?)") from None
        except EntryNotFoundError:
            if not required:
                return None
            raise AloeError(f"cannot load tokenizer {repo_id!r}: the Hub repository has no {name} (loss-token "
                            "counting needs a fast tokenizer's tokenizer.json)") from None
        except Exception as exc:  # unknown or gated repository, network errors
            raise AloeError(f"cannot load tokenizer {repo_id!r}: {first_line(exc)}") from None

    return fetch_hub


@contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs its retries on stderr; our error, if any, says it in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_text(ref: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AloeError(f"cannot load tokenizer {ref!r}: cannot read {path}: {first_line(exc)}") from None


def _read_json(ref: str, path: Path) -> dict:
    try:
        value = json.loads(_read_text(ref, path))
    except json.JSONDecodeError as exc:
        raise AloeError(f"cannot load tokenizer {ref!r}: {path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise AloeError(f"cannot load tokenizer {ref!r}: {path} does not hold a JSON object")
    return value


def _config_template(config: dict) -> str | None:
    """`chat_template` of tokenizer_config.json or chat_template.json: a string, or named templates (the default)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((entry.get("template") for entry in template
                         if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or a serialised AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_map(config: dict) -> dict[str, str]:
    """transformers 5's `special_tokens_map`: the named tokens, which apply_chat_template passes to the template.

    The standard names (bos_token, ...), then model-specific ones: other
    `*_token` string entries and a dict-valued `extra_special_tokens`.
    """
    named = {key: content for key in _NAMED_TOKENS if (content := _token_content(config.get(key))) is not None}
    for key, value in config.items():
        if key.endswith("_token") and key not in _NAMED_TOKENS and isinstance(value, str):
            named[key] = value
    extra = _extra_special_tokens(config)
    if isinstance(extra, dict):
        named.update({key: content for key, value in extra.items() if (content := _token_content(value)) is not None})
    return named


def _extra_special_tokens(config: dict) -> list | dict | None:
    extra = config.get("extra_special_tokens")
    if not extra and config.get("additional_special_tokens"):  # the transformers 4 name
        extra = config["additional_special_tokens"]
    return extra if isinstance(extra, (list, dict)) else None


def _load_tokenizer_json(ref: str, path: Path, config: dict):
    """tokenizer.json, set up as transformers' fast tokenizer sets it up for `apply_chat_template(tokenize=True)`.

    - the added tokens of tokenizer_config.json are (re-)added with their
      flags, then every named or extra special token that is not an added
      token yet is added as a special one: the tokenizer splits the text on
      all of them;
    - `split_special_tokens` (read special tokens as plain text) is honoured;
    - no truncation and no padding (apply_chat_template's defaults).
    """
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        raise AloeError("counting loss tokens needs the tokenizers library: pip install 'aloe-cli[mix]'") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # not a tokenizers serialisation, or one from a newer tokenizers
        raise AloeError(f"cannot load tokenizer {ref!r}: {path.name} does not load ({first_line(exc)})") from None

    def added_token(value: Any, special: bool | None = None) -> Any:
        if isinstance(value, str):
            return AddedToken(value, special=True)
        flags = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized", "special")
                 if key in value}
        if special is not None:
            flags["special"] = special or flags.get("special", False)
        return AddedToken(value["content"], **flags)

    to_add = []
    declared = config.get("added_tokens_decoder")
    if isinstance(declared, dict):
        for _, entry in sorted(declared.items(), key=lambda item: int(item[0])):
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                to_add.append(added_token(entry))
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    present.update(token.content for token in to_add)
    named = [config.get(key) for key in _NAMED_TOKENS] + [
        value for key, value in config.items() if key.endswith("_token") and key not in _NAMED_TOKENS
        and isinstance(value, str)]
    extra = _extra_special_tokens(config)
    extra_values = list(extra.values()) if isinstance(extra, dict) else list(extra or [])
    for value, is_named in [(v, True) for v in named] + [(v, False) for v in extra_values]:
        content = _token_content(value)
        if content is None or content in present:
            continue
        to_add.append(added_token(value, special=True if is_named else None))
        present.add(content)
    if to_add:
        tokenizer.add_tokens(to_add)
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


