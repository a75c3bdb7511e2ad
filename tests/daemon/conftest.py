"""Every daemon test starts without EDGE_UNISD_* settings from the environment of whoever runs it, computing in
fp32 whatever this CPU is ("auto" would take bf16 on one with native bf16; tests that want it ask)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("EDGE_UNISD_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("EDGE_UNISD_COMPUTE_DTYPE", "float32")
