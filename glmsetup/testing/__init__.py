"""Helpers shared by the test suite and `glmsetup selftest` (a tiny real ChatGLM2 checkpoint)."""
