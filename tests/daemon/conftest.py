"""Every daemon test starts without EDGE_UNISD_* settings from the environment of whoever runs it."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("EDGE_UNISD_"):
            monkeypatch.delenv(var)
