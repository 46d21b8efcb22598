"""The hubs that give a manifest with checksums: Hugging Face, its mirror, ModelScope, asked side by side.

The Tsinghua share and `--source auto` need a manifest from somewhere (the share has no checksums, no
config, no code). Every hub is asked at once, each with the metadata timeout, so a blocked one costs its
timeout once, not in turn; the answers come back in the order of preference (HF_ENDPOINT or huggingface.co,
then the mirror, then ModelScope). The mirror (https://hf-mirror.com, `GLMSETUP_HF_MIRROR` to change it,
empty to leave it out) is asked only when HF_ENDPOINT names no endpoint of its own.
"""
from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from glmsetup.errors import DownloadError
from glmsetup.fetch.http import Settings, make_client
from glmsetup.fetch.listing import UnsafeListing, clip
from glmsetup.fetch.manifest import Manifest
from glmsetup.fetch.models import ModelEntry

HF_MIRROR = "https://hf-mirror.com"


@dataclass
class Hub:
    label: str  # hf, hf-mirror, modelscope
    source: object  # an HFSource or ModelScopeSource, listed
    manifest: Manifest

    def origin(self):
        origin = self.source.origin()
        origin.name = self.label
        return origin


def mirror_endpoint() -> Optional[str]:
    """The HF mirror to ask besides the hub, or None (HF_ENDPOINT set, or GLMSETUP_HF_MIRROR empty)."""
    if os.environ.get("HF_ENDPOINT"):
        return None
    value = os.environ.get("GLMSETUP_HF_MIRROR", HF_MIRROR).strip()
    return value.rstrip("/") or None


def candidates(model: ModelEntry, settings: Settings, revision: Optional[str] = None) -> List[Tuple[str, object]]:
    """(label, unlisted source) of every hub to ask, in the order of preference."""
    from glmsetup.fetch.hf import HFSource
    from glmsetup.fetch.modelscope import ModelScopeSource

    out: List[Tuple[str, object]] = [("hf", HFSource(model, revision, None, settings))]
    mirror = mirror_endpoint()
    if mirror and mirror != out[0][1].endpoint:
        out.append(("hf-mirror", HFSource(model, revision, mirror, settings)))
    out.append(("modelscope", ModelScopeSource(model, None, None, settings)))
    return out


def ask_hubs(model: ModelEntry, settings: Settings, revision: Optional[str] = None) -> Tuple[List[Hub], List[str]]:
    """The hubs that answered with a listing (preferred first) and one line per hub that did not.

    A hub that sends something unsafe stops the run (UnsafeListing): it is reported, never left out."""
    todo = candidates(model, settings, revision)

    def ask(item):
        label, src = item
        client = make_client(settings)
        src.client = client
        try:
            return label, src, src.manifest(), None
        except UnsafeListing:
            raise
        except DownloadError as exc:
            return label, src, None, clip(exc.message, 160)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(len(todo)) as pool:
        found = list(pool.map(ask, todo))
    hubs = [Hub(label, src, manifest) for label, src, manifest, _err in found if manifest is not None]
    failures = [f"{label}: {err}" for label, _src, manifest, err in found if manifest is None]
    return hubs, failures
