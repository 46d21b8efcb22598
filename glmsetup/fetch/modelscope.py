"""ModelScope (ZhipuAI/chatglm2-6b): manifest with sha256 from its API, files from its repo endpoint.

Always pins a revision (the table in models.py; `--revision` overrides): the server's default revision
depends on the client's release date, which is no way to pick a model version.
"""
from __future__ import annotations

import os
from typing import Optional
from urllib.parse import quote

from glmsetup.errors import DownloadError
from glmsetup.fetch.downloader import Origin
from glmsetup.fetch.http import Settings, get_json
from glmsetup.fetch.listing import Listing, printable
from glmsetup.fetch.manifest import Manifest
from glmsetup.fetch.models import MODELSCOPE_ENDPOINT, ModelEntry

NAME = "modelscope"


def endpoint(flag: Optional[str] = None) -> str:
    value = flag or os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_ENDPOINT
    if "://" not in value:
        value = "https://" + value
    return value.rstrip("/")


class ModelScopeSource:
    name = NAME

    def __init__(self, model: ModelEntry, revision: Optional[str] = None, endpoint_url: Optional[str] = None,
                 settings: Optional[Settings] = None, client=None):
        self.model = model
        self.repo = model.modelscope_id
        self.revision = revision or model.modelscope_revision
        self.endpoint = endpoint(endpoint_url)
        self.settings = settings or Settings.from_env()
        self.client = client
        self.commit = None

    def manifest(self) -> Manifest:
        url = (f"{self.endpoint}/api/v1/models/{self.repo}/repo/files?Revision={quote(self.revision, safe='')}"
               "&Recursive=True")
        data, _ = get_json(self.client, url, self.settings, what=f"file list from {self.endpoint}",
                           hint=f"check --revision {self.revision} (ModelScope revisions look like v1.0.12) "
                                "or try --source hf")
        if not isinstance(data, dict) or data.get("Code") not in (200, "200", None) or "Data" not in data:
            message = data.get("Message") if isinstance(data, dict) else data
            raise DownloadError(f"ModelScope answered an error: {printable(message, 200)}",
                                hint=f"check the model id {self.repo} and --revision {self.revision}")
        listing = Listing(self.model, f"the ModelScope listing from {self.endpoint}")
        found = (data["Data"] or {}).get("Files") if isinstance(data["Data"], dict) else None
        for entry in found if isinstance(found, list) else []:
            if not isinstance(entry, dict) or entry.get("Type") != "blob":
                listing.count()
                continue
            path = entry.get("Path") or entry.get("Name")
            size = entry.get("Size")
            big = isinstance(size, int) and size > (1 << 20)
            spec = listing.add(path, size, sha256=entry.get("Sha256"), lfs=entry.get("IsLFS") is True or big)
            if spec is not None and spec.size is None:
                raise DownloadError(f"the ModelScope listing from {self.endpoint} gives no size for {spec.path}",
                                    hint="try --source hf")
        return listing.manifest(NAME, self.revision)

    def origin(self) -> Origin:
        base = f"{self.endpoint}/api/v1/models/{self.repo}/repo?Revision={quote(self.revision, safe='')}&FilePath="
        return Origin(NAME, lambda path: base + quote(path, safe=""))
