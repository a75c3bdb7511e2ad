"""`edge-unisd report`: PNG plots and index.html from a store with fabricated history, and an empty home."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from daemon import report
from daemon.home import Home, HomeError
from daemon.settings import write_default_settings
from daemon.store import LedgerEntry, Store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UTC = dt.timezone.utc


def _home(tmp_path: Path) -> Home:
    home = Home(tmp_path / "home").create()
    write_default_settings(home.settings)
    Store.open(home).close()
    return home


def _metrics(before_fit: float, after_fit: float, jsd: float, promote: bool) -> dict:
    reason = ("promoted: " if promote else "rejected: ") + "fit and retention"
    verdict = {"promote": promote, "reason": reason}
    return {"before": {"fit_nll": before_fit, "retention_jsd": 0.0},
            "after": {"fit_nll": after_fit, "retention_jsd": jsd, "accuracy": 0.25}, "verdict": verdict}


def _loss(kd: float, w_mean: float, w_min: float) -> dict:
    return {"first": kd + 0.5, "last": kd, "mean": kd + 0.1, "weight_mean": w_mean, "weight_min": w_min,
            "kd_kept": 0.75, "clip_fraction": 0.02,
            "terms_mean": {"kd": kd, "contrastive": 0.3, "feature": 0.05, "sft": 0.0}}


@pytest.fixture
def history_home(tmp_path) -> Home:
    """Three rounds (two promoted versions, one rejected), one failed round, ledger rows over two nights."""
    home = _home(tmp_path)
    with Store.open(home) as store:
        fits = [(3.0, 2.6, 0.01, True), (2.6, 2.4, 0.02, True), (2.4, 2.9, 0.3, False)]
        parent = None
        for i, (before, after, jsd, promote) in enumerate(fits):
            rid = store.start_round([], preset="edge")
            version = f"v{rid:04d}-2026010{i + 1}T020000Z"
            store.add_adapter_version(version, home.adapters / version, parent=parent,
                                      status="promoted" if promote else "rejected",
                                      metrics=_metrics(before, after, jsd, promote),
                                      created=dt.datetime(2026, 1, i + 1, 2, tzinfo=UTC))
            store.finish_round(rid, "done", metrics={"loss": _loss(1.0 - 0.2 * i, 0.8, 0.1 * (i + 1))},
                               adapter_version=version)
            store.record_ledger(rid, predicted=300.0, spent=280.0 + 10 * i, gates={})
            parent = version if promote else parent
        failed = store.start_round([], preset="edge")
        store.finish_round(failed, "failed", error="boom")  # no metrics: must not break the plots
        with Session(store.engine) as s, s.begin():  # spread the ledger over two nights
            for eid, when in ((1, dt.datetime(2026, 1, 1, 22, tzinfo=UTC)),
                              (2, dt.datetime(2026, 1, 2, 3, tzinfo=UTC)),
                              (3, dt.datetime(2026, 1, 3, 1, tzinfo=UTC))):
                s.execute(update(LedgerEntry).where(LedgerEntry.id == eid).values(created_at=when))
    return home


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_report_writes_every_plot_and_a_page_that_shows_them(history_home, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(history_home, out, tz=UTC)
    assert result["empty"] is False
    # the failed round trained nothing: no loss point
    assert (result["versions"], result["rounds"], result["ledger_entries"]) == (3, 3, 3)
    names = {report.VERSIONS_PNG, report.ROUNDS_PNG, report.BUDGET_PNG}
    assert {Path(p).name for p in result["plots"]} == names
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert _private(out / name)
    index = out / report.INDEX
    assert _private(index)
    page = index.read_text()
    for name in names:
        assert f"src='{name}'" in page  # relative: the folder can be moved
    assert "No data yet" not in page
    assert "v0003-20260103T020000Z" in page and "rejected" in page
    assert "src='/" not in page


def test_default_out_is_a_private_folder_in_the_home(history_home, capsys):
    args = argparse.Namespace(home=str(history_home.root), out=None, json=True)
    assert report.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    folder = history_home.root / report.REPORT_DIR
    assert printed["out"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / report.INDEX).is_file()


def test_empty_home_gives_a_no_data_page_not_a_crash(tmp_path, capsys):
    home = _home(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / report.ROUNDS_PNG).write_bytes(PNG_MAGIC)  # left by an earlier report; its data is gone now
    args = argparse.Namespace(home=str(home.root), out=str(out), json=False)
    assert report.main(args) == 0
    assert "no data yet" in capsys.readouterr().out
    page = (out / report.INDEX).read_text()
    assert "No data yet" in page and "<img" not in page
    assert _private(out / report.INDEX)
    assert sorted(p.name for p in out.iterdir()) == [report.INDEX]


def test_uninitialised_home_is_a_user_error(tmp_path):
    with pytest.raises(HomeError, match="edge-unisd init"):
        report.write_report(Home(tmp_path / "nowhere"))


def test_out_that_is_a_file_is_refused(history_home, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(report.ReportError, match="not a directory"):
        report.write_report(history_home, target)


def test_spending_is_grouped_by_night_noon_to_noon():
    e = report.Spend
    ledger = [e(dt.datetime(2026, 1, 1, 22, tzinfo=UTC), 100.0, 90.0),  # evening of the 1st
              e(dt.datetime(2026, 1, 2, 3, tzinfo=UTC), 100.0, 60.0),  # same night, after midnight
              e(dt.datetime(2026, 1, 2, 23, tzinfo=UTC), None, 30.0),  # the next night
              e(dt.datetime(2026, 1, 3, 11, tzinfo=UTC), 50.0, None)]  # still that night (before noon)
    assert report.spent_per_night(ledger, tz=UTC) == [(dt.date(2026, 1, 1), 150.0, 200.0),
                                                      (dt.date(2026, 1, 2), 30.0, 50.0)]
    plus_two = dt.timezone(dt.timedelta(hours=2))  # 22:00 UTC is midnight local: still the same night
    assert report.night_of(dt.datetime(2026, 1, 1, 22, tzinfo=UTC), plus_two) == dt.date(2026, 1, 1)


def test_rounds_without_a_loss_summary_are_skipped_and_bad_numbers_dropped(history_home):
    with Store.open(history_home) as store:
        rid = store.start_round([], preset="sd")
        store.finish_round(rid, "done", metrics={"loss": {"mean": float("nan"), "terms_mean": {"kd": "x"},
                                                          "weight_mean": 1.0}})
        points = report.read_history(store).rounds
    assert [p.id for p in points] == [1, 2, 3, 5]
    last = points[-1]
    assert last.loss_mean is None and last.terms == {} and last.weight_mean == 1.0
    assert last.kd_kept is None and points[0].kd_kept == 0.75  # rounds stored before kd_kept still plot
    assert report.plot_rounds(points).startswith(PNG_MAGIC)
