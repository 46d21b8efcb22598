"""Downloading ChatGLM2 weights: one resumable, verifying downloader behind every route.

models.py (the data table), manifest.py, hf.py / modelscope.py / tsinghua.py / gitlfs.py (one per route),
auto.py (probe and fall back), downloader.py + segments.py + partial.py (the downloader: files, one segment
over HTTP, the partial file on disk), guard.py (lock, disk space),
listing.py (the one check of every name a source lists), safefs.py (glmsetup's own files, never through a
link), runner.py (`glmsetup fetch`), verify.py (`glmsetup verify`).
"""
