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
from glmsetup.fetch.http import Settings, alternatives, get_json, host_of, login_hint
from glmsetup.fetch.listing import Listing, UnsafeListing, name_problem, printable, show
from glmsetup.fetch.manifest import Manifest
from glmsetup.fetch.models import HF_ENDPOINT, ModelEntry
from glmsetup.fetch.segments import Origin

NAME = "hf"
MAX_PAGES = 100  # of the paginated tree (the hub pages by 1,000 entries; a ChatGLM2 repo has about 20)


def endpoint(flag: Optional[str] = None) -> str:
    return (flag or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def token() -> Optional[str]:
    """The user's Hugging Face token: HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else the one
    `hf auth login` saved, found the way huggingface_hub finds it (HF_TOKEN_PATH, HF_HOME). None when there
    is none, or when HF_HUB_DISABLE_IMPLICIT_TOKEN asks not to use a saved one."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    if os.environ.get("HF_HUB_DISABLE_IMPLICIT_TOKEN", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    try:
        from huggingface_hub import get_token  # imported only here: it costs a few hundred ms
    except ImportError:
        return None
    try:
        found = get_token()
    except Exception:  # a broken token file or login state must not stop a public download
        return None
    return found.strip() if isinstance(found, str) and found.strip() else None


def _auth() -> Dict[str, str]:
    value = token()
    return {"Authorization": f"Bearer {value}"} if value else {}


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
        self.notes: list = []
        self._headers: Optional[Dict[str, str]] = None

    @property
    def headers(self) -> Dict[str, str]:
        if self._headers is None:
            self._headers = _auth()
        return self._headers

    def _get(self, url: str, what: str):
        return get_json(self.client, url, self.settings, headers=self.headers, auth_host=host_of(self.endpoint),
                        what=f"{what} of {self.repo} at {self.revision}", source=NAME, endpoint=self.endpoint,
                        page=f"{self.endpoint}/{self.repo}",
                        hint=f"check the model and --revision {self.revision}, or "
                             f"{alternatives(NAME, self.endpoint)}")

    def manifest(self) -> Manifest:
        info, _ = self._get(f"{self.endpoint}/api/models/{self.repo}/revision/{quote(self.revision, safe='')}"
                            "?blobs=true", "revision info")
        if not isinstance(info, dict):
            raise DownloadError(f"unexpected revision info from {self.endpoint} ({printable(info, 80)})",
                                hint="try another --endpoint or --source modelscope")
        commit = info.get("sha") or self.revision
        if not isinstance(commit, str) or name_problem(commit):
            raise UnsafeListing(f"the Hugging Face listing from {self.endpoint} gives the commit {show(commit)}",
                                hint="try another --endpoint or --source modelscope")
        self.commit = commit
        listing = Listing(self.model, f"the Hugging Face listing from {self.endpoint}")
        for sib in _entries(info.get("siblings"), listing):
            _add(listing, sib.get("rfilename"), sib.get("size"), sib.get("blobId"), sib.get("lfs"))
        try:
            for page in self._tree():
                for entry in _entries(page, listing):
                    if entry.get("type") == "file":
                        _add(listing, entry.get("path"), entry.get("size"), entry.get("oid"), entry.get("lfs"))
                    else:
                        listing.count()  # folders count too: an endless tree of them is refused all the same
        except UnsafeListing:  # a refused name or an endless tree is never papered over by the sibling list
            raise
        except DownloadError as exc:
            if not listing.files:
                raise
            if (exc.details or {}).get("status") not in (404, 403, 400, 501, None):
                raise
        missing = [f.path for f in listing.files.values() if f.size is None]
        if missing:
            raise DownloadError(f"the listing from {self.endpoint} gives no size for {', '.join(missing[:3])}",
                                hint="try another --endpoint or --source modelscope")
        return listing.manifest(NAME, self.revision, self.commit)

    def _tree(self):
        """The pages of the recursive file tree, following Link: rel="next"."""
        url = f"{self.endpoint}/api/models/{self.repo}/tree/{quote(self.commit, safe='')}?recursive=true"
        pages = 0
        while url:
            if pages >= MAX_PAGES:
                raise UnsafeListing(f"the file tree from {self.endpoint} runs past {MAX_PAGES} pages: refusing it",
                                    hint="try another --endpoint or --source modelscope")
            data, response = self._get(url, "file tree")
            pages += 1
            if not isinstance(data, list):
                raise DownloadError(f"unexpected file tree from {self.endpoint}")
            yield data
            url = response.links.get("next", {}).get("url")
            if url and url.startswith("/"):
                url = self.endpoint + url

    def origin(self) -> Origin:
        rev = quote(self.commit or self.revision, safe="")
        base = f"{self.endpoint}/{self.repo}/resolve/{rev}/"
        return Origin(NAME, lambda path: base + quote(path), headers=self.headers, auth_host=host_of(self.endpoint),
                      login_hint=login_hint(NAME, f"{self.endpoint}/{self.repo}"))


def _entries(items, listing: Listing):
    """The dict entries of a JSON list (anything else in it is counted and ignored)."""
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict):
            yield item
        else:
            listing.count()


def _add(listing: Listing, path, size, oid, lfs) -> None:
    if isinstance(lfs, dict) and lfs:
        listing.add(path, lfs.get("size", size), sha256=lfs.get("sha256") or lfs.get("oid"), lfs=True)
    else:
        sha1 = oid if isinstance(oid, str) and len(oid) == 40 else None
        listing.add(path, size, git_sha1=sha1)
