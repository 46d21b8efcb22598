"""Downloading ChatGLM2 weights: one resumable, verifying downloader behind every route.

models.py (the data table), manifest.py, hf.py / modelscope.py / tsinghua.py / gitlfs.py (one per route),
auto.py (probe and fall back), downloader.py + partial.py (the downloader), guard.py (lock, disk space),
runner.py (`glmsetup fetch`), verify.py (`glmsetup verify`).
"""
