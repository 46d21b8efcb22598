"""ModelScope (ZhipuAI/chatglm2-6b): manifest with sha256 from its API, files from its repo endpoint.

Always pins a revision (the table in models.py; `--revision` overrides): the server's default revision
depends on the client's release date, which is no way to pick a model version. The pins of the int4 and
32k models are unconfirmed: when the table's pin does not exist, the model's revisions are listed
(`GET /api/v1/models/{id}/revisions` -> Data.RevisionMap.Tags/Branches, as the modelscope SDK reads them)
and the newest whose listing matches glmsetup's checksums (models.py) is used, with a note that says which.
A revision named with `--revision` is never replaced: its absence is an error that lists the ones there are.
"""
from __future__ import annotations

import os
from typing import List, Optional
from urllib.parse import quote

from glmsetup.errors import DownloadError
from glmsetup.fetch.http import Settings, alternatives, get_json, login_hint
from glmsetup.fetch.listing import Listing, UnsafeListing, name_problem, printable, show
from glmsetup.fetch.manifest import Manifest
from glmsetup.fetch.models import MODELSCOPE_ENDPOINT, ModelEntry
from glmsetup.fetch.segments import Origin

NAME = "modelscope"
MAX_CANDIDATES = 12  # revisions tried when the pinned one is gone (one listing each)


def endpoint(flag: Optional[str] = None) -> str:
    """--endpoint, else MODELSCOPE_ENDPOINT (the SDK's current name, a URL), else MODELSCOPE_DOMAIN (its older
    name, a host), else www.modelscope.cn."""
    value = flag or os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or MODELSCOPE_ENDPOINT
    value = value.strip()
    if "://" not in value:
        value = "https://" + value
    return value.rstrip("/")


class ModelScopeSource:
    name = NAME

    def __init__(self, model: ModelEntry, revision: Optional[str] = None, endpoint_url: Optional[str] = None,
                 settings: Optional[Settings] = None, client=None):
        self.model = model
        self.repo = model.modelscope_id
        self.pinned = revision is None  # the table's pin may be replaced when it is gone; --revision never
        self.revision = revision or model.modelscope_revision
        self.endpoint = endpoint(endpoint_url)
        self.settings = settings or Settings.from_env()
        self.client = client
        self.commit = None
        self.notes: List[str] = []

    def _get(self, url: str, what: str, hint: str):
        return get_json(self.client, url, self.settings, what=what, source=NAME, endpoint=self.endpoint,
                        page=f"{self.endpoint}/models/{self.repo}", hint=hint)

    def manifest(self) -> Manifest:
        try:
            return self._listing(self.revision)
        except UnsafeListing:
            raise
        except DownloadError as exc:
            revisions = self._revisions_if_missing(exc)
            if revisions is None:
                raise
            if not self.pinned:
                shown = ", ".join(revisions[:8]) or "none"
                raise DownloadError(f"ModelScope has no revision {self.revision} of {self.repo}",
                                    hint=f"its revisions: {shown}; pick one with --revision") from exc
            return self._newest_matching(revisions, exc)

    def _listing(self, revision: str) -> Manifest:
        url = (f"{self.endpoint}/api/v1/models/{self.repo}/repo/files?Revision={quote(revision, safe='')}"
               "&Recursive=True")
        data, _ = self._get(url, f"file list of {self.repo} at {revision}",
                            hint=f"check --revision {revision} (ModelScope revisions look like v1.0.12) or "
                                 f"{alternatives(NAME)}")
        if not isinstance(data, dict) or data.get("Code") not in (200, "200", None) or "Data" not in data:
            message = data.get("Message") if isinstance(data, dict) else data
            raise DownloadError(f"ModelScope answered an error: {printable(message, 200)}",
                                hint=f"check the model id {self.repo} and --revision {revision}",
                                details={"modelscope_error": True})
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
                                    hint=alternatives(NAME))
        return listing.manifest(NAME, revision)

    def _revisions_if_missing(self, error: DownloadError) -> Optional[List[str]]:
        """The model's revisions, newest first, when `error` came from a revision that is not among them;
        None when the revision exists (the error is another one) or the revisions cannot be listed."""
        details = error.details if isinstance(error.details, dict) else {}
        if details.get("status") not in (400, 404) and not details.get("modelscope_error"):
            return None
        try:
            revisions = self.revisions()
        except UnsafeListing:
            raise
        except DownloadError:
            return None
        return None if self.revision in revisions else revisions

    def revisions(self) -> List[str]:
        """Tags newest first (by CreatedAt), then the branches: the names the revisions API gives."""
        data, _ = self._get(f"{self.endpoint}/api/v1/models/{self.repo}/revisions",
                            f"revisions of {self.repo}", hint=alternatives(NAME))
        revision_map = data.get("Data", {}).get("RevisionMap") if isinstance(data, dict) and \
            isinstance(data.get("Data"), dict) else None
        if not isinstance(revision_map, dict):
            raise DownloadError(f"unexpected revision list from {self.endpoint} ({printable(data, 80)})")
        tags = [t for t in revision_map.get("Tags") or [] if isinstance(t, dict)][:200]
        branches = [b for b in revision_map.get("Branches") or [] if isinstance(b, dict)][:200]

        def created(item):
            value = item.get("CreatedAt")
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

        names = []
        for item in sorted(tags, key=created, reverse=True) + branches:
            name = item.get("Revision")
            if not isinstance(name, str) or name_problem(name) or len(name) > 100:
                raise UnsafeListing(f"the ModelScope revision list from {self.endpoint} names the revision "
                                    f"{show(name)}: refusing it", hint=alternatives(NAME))
            if name not in names:
                names.append(name)
        return names

    def _newest_matching(self, revisions: List[str], error: DownloadError) -> Manifest:
        pinned, tried = self.revision, []
        for revision in revisions[:MAX_CANDIDATES]:
            try:
                manifest = self._listing(revision)
            except UnsafeListing:
                raise
            except DownloadError:
                continue
            tried.append(revision)
            problem = mismatch(self.model, manifest)
            if problem is None:
                self.revision = revision
                unverified = [p for p in self.model.official if self.model.unverified(p)]
                self.notes.append(
                    f"ModelScope has no revision {pinned} of {self.repo}: using {revision}, the newest of its "
                    f"revisions whose files match glmsetup's checksums"
                    + (f" ({', '.join(unverified)} by size only: no published sha256)" if unverified else ""))
                return manifest
        shown = ", ".join(revisions[:8]) or "none"
        raise DownloadError(f"ModelScope has no revision {pinned} of {self.repo}, and none of its revisions "
                            f"({shown}) holds files that match glmsetup's checksums",
                            hint=f"name one with --revision if you trust it, or {alternatives(NAME)}") from error

    def origin(self) -> Origin:
        base = f"{self.endpoint}/api/v1/models/{self.repo}/repo?Revision={quote(self.revision, safe='')}&FilePath="
        return Origin(NAME, lambda path: base + quote(path, safe=""),
                      login_hint=login_hint(NAME, f"{self.endpoint}/models/{self.repo}", alternatives(NAME)))


def mismatch(model: ModelEntry, manifest: Manifest) -> Optional[str]:
    """Why a listing is not the published model (a file of the table missing, another size or sha256), or None."""
    have = manifest.by_path()
    for path, (size, sha) in sorted(model.official.items()):
        spec = have.get(path)
        if spec is None:
            return f"{path} is missing"
        if spec.size != size:
            return f"{path} has {spec.size} bytes, not {size}"
        if sha and spec.sha256 and spec.sha256 != sha:
            return f"{path} has another sha256"
        if sha and not spec.sha256:
            return f"{path} has no sha256 to compare"
    return None
