"""Fixtures of the method's tests that load a base through load_base, as the daemon does."""

from __future__ import annotations

import pytest

from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    """A tiny random llama saved as an HF folder with the bundled tokenizer (what load_base reads)."""
    folder = tmp_path_factory.mktemp("tiny-base")
    make_tiny_llama(len(tokenizer), init_std=0.1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
