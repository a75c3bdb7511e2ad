"""The heap policy comes from EDGE_UNISD_HEAP, defaults to fast, and a typo is named, not ignored."""

from __future__ import annotations

import pytest

from edge_unisd import heap


def test_policy_defaults_to_fast_and_reads_the_environment():
    assert heap.heap_policy({}) == "fast"
    assert heap.heap_policy({heap.HEAP_ENV: " Lean "}) == "lean"
    assert heap.THRESHOLD_BYTES["lean"] < heap.THRESHOLD_BYTES["fast"]


def test_unknown_policy_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"EDGE_UNISD_HEAP='tiny'.*'fast'.*'lean'"):
        heap.heap_policy({heap.HEAP_ENV: "tiny"})


def test_configure_applies_once_per_process():
    first = heap.configure_heap()  # load_base may have applied it already in this test session
    assert heap.configure_heap("lean" if first == "fast" else "fast") == first
    heap.release_free_memory()  # safe to call at any time
