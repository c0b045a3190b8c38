"""Encoder weights from the Hugging Face Hub, the way users get them: gated repositories and a personal token.

``huggingface_hub`` does the work: the token (``HF_TOKEN``, else the one ``hf auth login`` stored), the progress
bar, the hub's cache (a second pack from the same repository reuses the download), ``HF_HUB_OFFLINE``. This
module finds which file of which repository holds a registered encoder's weights (its ``weights_source``) and
turns the hub's errors into what to do about them.
"""

from __future__ import annotations

import re
from pathlib import Path

from hepatoquant.encoders import encoder_config, list_encoders
from hepatoquant.errors import HepatoQuantError, InvalidParameterError, WeightsNotFoundError

__all__ = ["download_encoder_weights", "download_from_hub", "hub_source", "encoder_for_repository"]

_SOURCE = re.compile(r"^hf_hub:\s*(?P<repo>[\w.-]+/[\w.-]+)\s*\((?P<file>[^)]+)\)")


def hub_source(encoder: str) -> tuple[str, str] | None:
    """(repository, file) that holds ``encoder``'s published weights, or None if it has none on the hub."""
    match = _SOURCE.match(encoder_config(encoder).weights_source)
    return (match["repo"], match["file"].strip()) if match else None


def encoder_for_repository(repository: str) -> str:
    """The registered encoder whose weights ``repository`` publishes (InvalidParameterError if none does)."""
    known = {source[0].lower(): name for name in list_encoders() if (source := hub_source(name)) is not None}
    if repository.lower() not in known:
        raise InvalidParameterError(
            f"no registered encoder has its weights in {repository!r} (known: {', '.join(sorted(known))}); "
            "name the architecture with --encoder and the file with --hub-file"
        )
    return known[repository.lower()]


def download_encoder_weights(repository: str, filename: str, *, revision: str | None = None) -> Path:
    """The file from the hub (or the hub's cache), as a local path; errors say what the user can do."""
    return download_from_hub(repository, filename, revision=revision, error=WeightsNotFoundError,
                             wrong_file_hint="give the right one with --hub-file")


def download_from_hub(
    repository: str,
    filename: str,
    *,
    revision: str | None = None,
    repo_type: str = "model",
    error: type[HepatoQuantError] = WeightsNotFoundError,
    wrong_file_hint: str = "",
) -> Path:
    """``filename`` of a model or dataset repository from the hub (or the hub's cache), as a local path; the hub's
    errors become ``error`` saying what the user can do."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repository}"
    try:
        return Path(hf_hub_download(repo_id=repository, filename=filename, revision=revision, repo_type=repo_type))
    except GatedRepoError as exc:
        raise error(
            f"{repository} is gated and this account has not been given access yet: request it on {page}, wait for "
            "the approval, then run this again with the same token (HF_TOKEN, or `hf auth login`)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise error(
            f"{repository} was not found on the hub, or it is gated and no token was sent: check the name, and set "
            "HF_TOKEN to a read token (https://huggingface.co/settings/tokens) or run `hf auth login`"
        ) from exc
    except RevisionNotFoundError as exc:
        raise error(f"{repository} has no revision {revision!r}: see {page}/tree/main") from exc
    except LocalEntryNotFoundError as exc:
        raise error(
            f"{repository}/{filename} is not in the hub cache ({constants.HF_HUB_CACHE}) and the hub cannot be "
            "reached (no network, or HF_HUB_OFFLINE=1): download it once where there is network (the same "
            "command), or copy that cache folder here"
        ) from exc
    except EntryNotFoundError as exc:
        raise error(
            f"{repository} has no file {filename!r}: see {page}/tree/main" + (f" and {wrong_file_hint}" if wrong_file_hint else "")
        ) from exc
    except HfHubHTTPError as exc:
        raise error(f"the hub refused {repository}/{filename} ({exc}); try again later") from exc
