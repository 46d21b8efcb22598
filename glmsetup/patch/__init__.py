"""glmsetup.patch: fix the official ChatGLM2 demo scripts on a syntax tree, with a diff, a backup and an undo.

    from glmsetup.patch import patch_folder, patch_paths, revert_paths

The package itself stays light: libcst is imported only when something is patched.
"""
from __future__ import annotations


def _require_libcst():
    from glmsetup.errors import require

    require("libcst", "patch")


def patch_paths(targets, **kwargs) -> dict:
    """Patch the demos among files/folders `targets` (see glmsetup.patch.apply.patch_paths)."""
    _require_libcst()
    from glmsetup.patch.apply import patch_paths as _patch

    return _patch(targets, **kwargs)


def patch_folder(src_dir, *, model, profile, loader: str = "glmsetup", listen: bool = False) -> dict:
    """Patch every demo in `src_dir` in place and return the report (for `glmsetup run --official`)."""
    _require_libcst()
    from glmsetup.patch.apply import patch_folder as _patch_folder

    return _patch_folder(src_dir, model=model, profile=profile, loader=loader, listen=listen)


def revert_paths(targets, **kwargs) -> dict:
    """Undo the last patch run on each backed-up file among `targets`, byte for byte (see revert.py)."""
    from glmsetup.patch.revert import revert_paths as _revert

    return _revert(targets, **kwargs)


__all__ = ["patch_paths", "patch_folder", "revert_paths"]
