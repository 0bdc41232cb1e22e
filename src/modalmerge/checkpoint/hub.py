"""Model references as mergekit takes them: a local path, a Hugging Face hub id (`org/name`,
optionally `@revision`), or `model+lora` (a model with a PEFT LoRA adapter applied).

A hub id is resolved with huggingface_hub's snapshot_download, through its local cache
(HF_HOME / HF_HUB_CACHE); with HF_HUB_OFFLINE=1 only the cache is read. Only the files a merge
reads are fetched: weights as safetensors (pickles only with --allow-pickle), JSON configs and
tokenizer files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MergeError, one_line

# a hub repo id: `org/name`, letters, digits, '.', '_' and '-' (a bare `name` is taken for a
# local path, so that a mistyped folder is reported as missing, not looked up on the hub)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_TRUE = ("1", "ON", "YES", "TRUE")
HUB_FILES = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def split_lora(text: str) -> tuple[str, str | None]:
    """`model+lora` -> (model, lora); a reference without '+' -> (text, None). As mergekit
    parses it: at most one '+'. A path that exists as written is never split."""
    if "+" not in text or os.path.lexists(text):
        return text, None
    chunks = text.split("+")
    if len(chunks) != 2 or not all(chunks):
        raise MergeError(f"model reference {one_line(text, 120)!r}: write `model+lora_adapter` (one '+' between a "
                         "model and a LoRA adapter folder), or give a path that exists")
    return chunks[0], chunks[1]


def split_revision(text: str) -> tuple[str, str | None]:
    """`org/name@revision` -> (org/name, revision); at most one '@', as in mergekit."""
    if "@" not in text or os.path.lexists(text):
        return text, None
    path, _, revision = text.partition("@")
    if "@" in revision or not path or not revision:
        raise MergeError(f"model reference {one_line(text, 120)!r}: write `org/name@revision` (one '@'), or give a "
                         "path that exists")
    return path, revision


def is_hub_reference(text: str) -> bool:
    """Whether `text` (a reference that is no local path) would be looked up on the hub."""
    return not os.path.lexists(text) and bool(_HUB_ID.fullmatch(text.partition("@")[0]))


def local_model_path(text: str, label: str, allow_pickle: bool = False) -> Path:
    """The local folder or file that reference `text` (no '+') names: the path itself when it
    exists, else the hub id's snapshot folder; a MergeError when it is neither."""
    p = Path(text)
    if os.path.lexists(p):
        return p
    path, revision = split_revision(text)
    if revision is not None and os.path.lexists(path):
        raise MergeError(f"model {label!r}: {path} is a local path, which has no revision; remove '@{revision}'")
    if _HUB_ID.fullmatch(path):
        return hub_snapshot(path, revision, label, allow_pickle)
    raise MergeError(f"model {label!r}: {p} does not exist; check the path in the recipe")


def hub_cache_dir() -> str:
    """The hub cache as huggingface_hub finds it, read from the environment now (not when
    huggingface_hub was first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def hub_snapshot(repo_id: str, revision: str | None, label: str, allow_pickle: bool = False) -> Path:
    """The local snapshot folder of hub model `repo_id`, downloaded (only the files a merge
    reads) unless it is cached or HF_HUB_OFFLINE is set. A missing huggingface_hub is an
    ImportError, which the CLI reports as the `hf` extra to install."""
    import huggingface_hub
    from huggingface_hub import utils as errors  # where every huggingface_hub version exports them

    # a cached snapshot that lacks files (an interrupted download), where this version tells so
    incomplete = getattr(getattr(huggingface_hub, "errors", None), "IncompleteSnapshotError", ())

    cache = hub_cache_dir()
    offline = hub_offline()
    shown = repo_id + (f"@{revision}" if revision else "")
    patterns = HUB_FILES + (["*.bin", "*.pt", "*.pth"] if allow_pickle else [])
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                                   local_files_only=offline, allow_patterns=patterns)
    except incomplete:
        raise MergeError(f"model {label!r}: the cached snapshot of {shown} at {cache} is incomplete; download it "
                         f"again (hf download {repo_id}){', or unset HF_HUB_OFFLINE' if offline else ''}") from None
    except errors.LocalEntryNotFoundError:
        if offline:
            raise MergeError(f"model {label!r}: {shown} is no local path, and this Hugging Face hub model is not in "
                             f"the cache at {cache} (HF_HUB_OFFLINE is set); download it (hf download {repo_id}), "
                             "or unset HF_HUB_OFFLINE") from None
        raise MergeError(f"model {label!r}: {shown} is no local path, is not in the Hugging Face cache at {cache}, "
                         "and the hub could not be reached; check the connection, or download it "
                         f"(hf download {repo_id})") from None
    except errors.RevisionNotFoundError:
        raise MergeError(f"model {label!r}: the Hugging Face hub model {repo_id} has no revision {revision!r}; "
                         "check the part after '@'") from None
    except errors.RepositoryNotFoundError:  # gated and private repositories included
        raise MergeError(f"model {label!r}: {shown} is no local path, and no Hugging Face hub model you can read "
                         "has that id; check the path or id, or log in (hf auth login) for a gated model") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:  # an incomplete cached snapshot, a bad id, HTTP
        raise MergeError(f"model {label!r}: cannot get {shown} from the Hugging Face hub "
                         f"({type(e).__name__}: {one_line(e, 200)}); check the id, the connection and the cache "
                         f"at {cache}") from None
    return Path(folder)


def reference_folder(text: str, label: str, allow_pickle: bool = False) -> Path:
    """The folder holding the config and tokenizer files of the model a reference names (for
    `model+lora`, the model's: the adapter changes weights only)."""
    model, lora = split_lora(text)
    if lora is None and not is_hub_reference(text):
        return Path(text)  # a path, there or not (an in-memory merge names none)
    p = local_model_path(model, label, allow_pickle)
    return p if p.is_dir() else p.parent
