"""The Tsinghua cloud share (Seafile): a listing without checksums, files behind expiring redirects.

The share's folders are listed one level at a time with `/api/v2.1/share-links/{token}/dirents/?path=`;
a file is `/d/{token}/files/?p=/folder/file&dl=1`, which redirects to a file-server address valid for an
hour or two (asked again when it expires). The share holds the weights and tokenizer.model only, and is
reported to hold an older version of the 6B weights that produces garbage with the current code: the route
(fetch/share.py) takes the other files and every checksum from a hub, and a share file only when its sha256
matches.
"""
from __future__ import annotations

from typing import List, Optional
from urllib.parse import quote

from glmsetup.errors import DownloadError, UsageError
from glmsetup.fetch.http import Settings, alternatives, get_json
from glmsetup.fetch.listing import HINT, Listing, UnsafeListing, check_name, printable, show
from glmsetup.fetch.manifest import Manifest
from glmsetup.fetch.models import TSINGHUA_ENDPOINT, TSINGHUA_SHARE, ModelEntry
from glmsetup.fetch.segments import Origin

NAME = "tsinghua"
OLDER_VERSION = ("the Tsinghua cloud share holds an older, incompatible version of {path} (sha256 {got}, expected "
                 "{want}): it produces garbage with the current model code")


def endpoint(flag: Optional[str] = None) -> str:
    return (flag or TSINGHUA_ENDPOINT).rstrip("/")


class TsinghuaSource:
    name = NAME

    def __init__(self, model: ModelEntry, revision: Optional[str] = None, endpoint_url: Optional[str] = None,
                 settings: Optional[Settings] = None, client=None, share: str = TSINGHUA_SHARE):
        if not model.tsinghua_folder:
            raise UsageError(f"the Tsinghua cloud share has no {model.name}", hint="use --source hf or --source modelscope")
        self.model = model
        self.folder = model.tsinghua_folder
        self.share = share
        self.endpoint = endpoint(endpoint_url)
        self.settings = settings or Settings.from_env()
        self.client = client
        self.revision = None
        self.commit = None

    def _list(self, folder: str) -> List[dict]:
        url = f"{self.endpoint}/api/v2.1/share-links/{self.share}/dirents/?path={quote(folder)}"
        data, _ = get_json(self.client, url, self.settings, what=f"share listing of {folder}", source=NAME,
                           endpoint=self.endpoint, hint=f"the Tsinghua share may be unreachable: {alternatives(NAME)}")
        if not isinstance(data, dict) or not isinstance(data.get("dirent_list"), list):
            raise DownloadError(f"unexpected listing from the Tsinghua share ({printable(data)})")
        return data["dirent_list"]

    def manifest(self) -> Manifest:
        """Sizes only: the share publishes no checksums (see reference_checked).

        Folders are listed one level at a time; only folders below the model's own are followed, each once,
        and every path the share gives must lie inside the model's folder."""
        listing = Listing(self.model, f"the Tsinghua share at {self.endpoint}")
        root = f"/{self.folder}/"
        todo, seen = [root], {root}
        while todo:
            folder = todo.pop()
            for d in self._list(folder):
                if not isinstance(d, dict):
                    listing.count()
                    continue
                if d.get("is_dir"):
                    listing.count()
                    sub = d.get("folder_path")
                    sub = sub if isinstance(sub, str) else folder + str(d.get("folder_name"))
                    rel = self._inside(root, sub.rstrip("/"), listing)
                    sub = root + rel + "/"
                    if sub not in seen:
                        seen.add(sub)
                        todo.append(sub)
                else:
                    full = d.get("file_path")
                    full = full if isinstance(full, str) else folder + str(d.get("file_name"))
                    spec = listing.add(self._inside(root, full, listing), d.get("size"))
                    if spec is not None and spec.size is None:
                        raise DownloadError(f"the Tsinghua share lists {spec.path} without a size",
                                            hint="try --source hf or --source modelscope")
        return listing.manifest(NAME, None)

    @staticmethod
    def _inside(root: str, full: str, listing: Listing) -> str:
        """The path below the model's folder of the share; refused when it is not below it."""
        if not full.startswith(root):
            raise UnsafeListing(f"{listing.source} lists {show(full)}, outside the folder {root} it was asked for",
                                hint=HINT)
        return check_name(full[len(root):], listing.source)

    def origin(self) -> Origin:
        base = f"{self.endpoint}/d/{self.share}/files/?p="
        return Origin(NAME, lambda path: base + quote(f"/{self.folder}/{path}") + "&dl=1")
