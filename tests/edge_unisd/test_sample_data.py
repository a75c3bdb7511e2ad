"""The bundled sample user: shape of the data set, consistency of answers and checks, loader errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_unisd.items import IngestRow, Item
from edge_unisd.sample_data import (
    SAMPLE_DIR,
    SampleDataError,
    answer_is_correct,
    load_checks,
    load_general_prompts,
    load_profile,
    load_sample_items,
    load_sample_rows,
)

# Facts only this user has: none may leak into the general (retention) prompts.
USER_TERMS = ["Maren", "Lindqvist", "Biscuit", "Sixten", "Tomas", "Elsa", "Ingrid", "Kestrel", "Heron",
              "Tidewater", "Gothenburg", "Majorna", "Priya", "Hallberg", "Valhallabadet", "Kyoto", "beagle",
              "rooibos", "flat white", "risotto", "Umeå", "Dagster"]


@pytest.fixture(scope="module")
def rows() -> list[IngestRow]:
    return load_sample_rows()


@pytest.fixture(scope="module")
def checks() -> dict[str, list[str]]:
    return load_checks()


# --- the data set ---------------------------------------------------------------------------------

def test_every_line_is_an_ingest_row_with_only_schema_keys():
    allowed = set(IngestRow.model_fields)
    lines = (SAMPLE_DIR / "items.jsonl").read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, 1):
        obj = json.loads(line)
        assert set(obj) <= allowed, f"line {lineno}: extra keys {set(obj) - allowed}"
        assert obj["source"] == "sample"
        IngestRow.model_validate(obj)


def test_size_and_mix(rows):
    n = len(rows)
    assert n >= 160
    assert len({r.id for r in rows}) == n
    assert sum(r.reference is not None for r in rows) >= 0.6 * n
    assert sum(r.rejected is not None for r in rows) >= 10
    assert sum(r.context is not None for r in rows) >= 10


def test_answers_are_short_single_sentences(rows):
    # The model is 135M parameters: long answers would drown the user's facts in generic tokens.
    for r in rows:
        for answer in (r.reference, r.rejected):
            if answer is not None:
                assert "\n" not in answer and len(answer.split()) <= 25, (r.id, answer)


def test_items_carry_ids_and_messages(rows):
    items = load_sample_items()
    assert [i.id for i in items] == [r.id for r in rows]
    assert all(isinstance(i, Item) and i.messages[-1]["role"] == "user" for i in items)
    with_context = next(i for i in items if i.context)
    assert with_context.reference is not None


def test_every_check_refers_to_an_item_and_most_items_are_checkable(rows, checks):
    ids = {r.id for r in rows}
    assert set(checks) <= ids
    assert len(checks) >= 0.75 * len(rows)


def test_references_pass_and_rejected_answers_fail_their_checks(rows, checks):
    by_id = {r.id: r for r in rows}
    n_rejected_checked = 0
    for item_id, keywords in checks.items():
        row = by_id[item_id]
        if row.reference is not None:
            assert answer_is_correct(row.reference, keywords), (item_id, row.reference, keywords)
        if row.rejected is not None:
            n_rejected_checked += 1
            assert not answer_is_correct(row.rejected, keywords), (item_id, row.rejected, keywords)
    assert n_rejected_checked >= 10


def test_each_fact_is_asked_several_ways(rows, checks):
    # Held-out items must test the same facts trained on elsewhere, not new ones.
    by_keyword: dict[str, int] = {}
    for keywords in checks.values():
        for kw in keywords:
            by_keyword[kw.casefold()] = by_keyword.get(kw.casefold(), 0) + 1
    for name in ("biscuit", "sixten", "priya", "routing data", "flat white", "peanut", "ingrid"):
        assert by_keyword.get(name, 0) >= 2, name


def test_profile_states_the_facts_the_checks_rely_on():
    profile = load_profile()
    for term in USER_TERMS:
        assert term in profile, term
    assert "fictional" in profile.casefold()


def test_general_prompts_are_many_and_unrelated_to_the_user():
    prompts = load_general_prompts()
    assert len(prompts) >= 40
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        assert not any(term.casefold() in prompt.casefold() for term in USER_TERMS), prompt
        assert "my " not in prompt.casefold(), prompt  # nothing that asks about the user


# --- answer_is_correct ---------------------------------------------------------------------------

def test_answer_is_correct_keywords_and_alternatives():
    assert answer_is_correct("Your dog is called BISCUIT.", ["Biscuit"])
    assert not answer_is_correct("Your dog is called Sixten.", ["Biscuit"])
    assert answer_is_correct("Biscuit and Sixten", ["biscuit", "sixten"])
    assert not answer_is_correct("Just Biscuit", ["biscuit", "sixten"])
    assert answer_is_correct("It's at 9:15.", ["09:15|9:15"])
    assert answer_is_correct("She lives in Umea", ["Umeå|Umea"])
    assert answer_is_correct("Cheers,\n  Maren", ["Cheers, Maren"])
    assert answer_is_correct("an oat\u2011milk flat\u00a0white", ["flat white"])
    assert not answer_is_correct("anything", [])


# --- loader errors ---------------------------------------------------------------------------------

def _copy_sample(tmp_path: Path) -> Path:
    target = tmp_path / "sample_user"
    shutil.copytree(SAMPLE_DIR, target)
    return target


def _append(path: Path, line: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([*lines, line]) + "\n", encoding="utf-8")
    return len(lines) + 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"id": "s999", "prompt": "hi", "colour": "red"}', "colour"),
        ('{"id": "s999", "prompt": "   "}', "prompt is empty"),
        ('{"prompt": "no id here"}', "need an 'id'"),
        ('{"id": "s001", "prompt": "duplicate"}', "already used on line"),
        ('{"id": "s999", "prompt": ', "not valid JSON"),
    ],
)
def test_bad_item_row_names_file_and_line(tmp_path, line, reason):
    directory = _copy_sample(tmp_path)
    lineno = _append(directory / "items.jsonl", line)
    with pytest.raises(SampleDataError) as err:
        load_sample_rows(directory)
    assert f"items.jsonl:{lineno}:" in str(err.value)
    assert reason in str(err.value)


def test_bad_check_and_general_rows_name_file_and_line(tmp_path):
    directory = _copy_sample(tmp_path)
    lineno = _append(directory / "checks.jsonl", '{"id": "s001x", "must_contain": []}')
    with pytest.raises(SampleDataError, match=rf"checks\.jsonl:{lineno}:.*must_contain"):
        load_checks(directory)
    lineno = _append(directory / "general.jsonl", '{"prompt": "ok", "answer": "no"}')
    with pytest.raises(SampleDataError, match=rf"general\.jsonl:{lineno}:.*answer"):
        load_general_prompts(directory)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SampleDataError, match="profile.md"):
        load_profile(tmp_path)
