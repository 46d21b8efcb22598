"""Hugging Face (and its mirrors such as hf-mirror.com): manifest from the API, files from /resolve/.

The manifest joins two listings: `/api/models/{repo}/revision/{rev}?blobs=true` (the commit and, per file,
size, git blob id and LFS sha256) and `/api/models/{repo}/tree/{commit}?recursive=true` followed through its
`Link: rel="next"` pages, because some mirrors truncate the sibling list. Files are then fetched from
`/{repo}/resolve/{commit}/{path}`, pinned to the commit so a resumed run gets the same bytes.
"""
from __future__ import annotations

import os
from typing import Dict, Optional
from urllib.parse import quote

from glmsetup.errors import DownloadError
from glmsetup.fetch.downloader import Origin
from glmsetup.fetch.http import Settings, get_json, host_of
from glmsetup.fetch.manifest import FileSpec, Manifest
from glmsetup.fetch.models import HF_ENDPOINT, ModelEntry

NAME = "hf"


def endpoint(flag: Optional[str] = None) -> str:
    return (flag or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def _auth() -> Dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


class HFSource:
    name = NAME

    def __init__(self, model: ModelEntry, revision: Optional[str] = None, endpoint_url: Optional[str] = None,
                 settings: Optional[Settings] = None, client=None):
        self.model = model
        self.repo = model.hf_repo
        self.revision = revision or model.hf_revision
        self.endpoint = endpoint(endpoint_url)
        self.settings = settings or Settings.from_env()
        self.client = client
        self.commit: Optional[str] = None

    def _get(self, url: str, what: str):
        return get_json(self.client, url, self.settings, headers=_auth(), auth_host=host_of(self.endpoint),
                        what=f"{what} from {self.endpoint}",
                        hint=f"check the model and --revision {self.revision}, or try --endpoint https://hf-mirror.com "
                             "or --source modelscope")

    def manifest(self) -> Manifest:
        info, _ = self._get(f"{self.endpoint}/api/models/{self.repo}/revision/{quote(self.revision, safe='')}"
                            "?blobs=true", "revision info")
        self.commit = info.get("sha") or self.revision
        files: Dict[str, FileSpec] = {}
        for sib in info.get("siblings") or []:
            spec = _spec(sib.get("rfilename"), sib.get("size"), sib.get("blobId"), sib.get("lfs") or {})
            if spec:
                files[spec.path] = spec
        try:
            for entry in self._tree():
                if entry.get("type") != "file":
                    continue
                spec = _spec(entry.get("path"), entry.get("size"), entry.get("oid"), entry.get("lfs") or {})
                if spec and (spec.path not in files or not files[spec.path].checkable):
                    files[spec.path] = spec
        except DownloadError as exc:
            if not files:
                raise
            if (exc.details or {}).get("status") not in (404, 403, 400, 501, None):
                raise
        missing = [f.path for f in files.values() if f.size is None]
        if missing:
            raise DownloadError(f"the listing from {self.endpoint} gives no size for {', '.join(missing[:3])}",
                                hint="try another --endpoint or --source modelscope")
        return Manifest(model=self.model.name, source=NAME, revision=self.revision, commit=self.commit,
                        files=sorted(files.values(), key=lambda f: f.path))

    def _tree(self):
        url = f"{self.endpoint}/api/models/{self.repo}/tree/{quote(self.commit, safe='')}?recursive=true"
        pages = 0
        while url and pages < 1000:
            data, response = self._get(url, "file tree")
            pages += 1
            if not isinstance(data, list):
                raise DownloadError(f"unexpected file tree from {self.endpoint}")
            yield from data
            url = response.links.get("next", {}).get("url")
            if url and url.startswith("/"):
                url = self.endpoint + url

    def origin(self) -> Origin:
        rev = quote(self.commit or self.revision, safe="")
        base = f"{self.endpoint}/{self.repo}/resolve/{rev}/"
        return Origin(NAME, lambda path: base + quote(path), headers=_auth(), auth_host=host_of(self.endpoint))


def _spec(path, size, oid, lfs: dict) -> Optional[FileSpec]:
    if not path:
        return None
    if lfs:
        sha = lfs.get("sha256") or lfs.get("oid")
        return FileSpec(path=path, size=lfs.get("size", size), sha256=sha, lfs=True)
    return FileSpec(path=path, size=size, git_sha1=oid if oid and len(oid) == 40 else None)
