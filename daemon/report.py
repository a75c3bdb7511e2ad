"""`edge-unisd report [--out DIR]`: the history a user cares about, as PNG plots and one small HTML page.

    edge-unisd report [--home DIR] [--out DIR] [--json]

Reads the home's store only (no model is loaded): held-out fit and retention of every adapter version
(from the gate's metrics), the loss terms and reliability weights of every round (the step summary
`daemon.jobs` stores in rounds.metrics["loss"]), and the seconds spent per night (the ledger). Writes
`index.html`, which shows the plots side by side and references them by relative path, so the folder
can be moved or opened from anywhere. Numbers only: no prompt or answer text reaches the report.
Every file is written 0600 through `edge_unisd.atomic_io`; a plot with no data is not drawn.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.evaluation import DEFAULT_MAX_RETENTION_JSD
from daemon.home import Home
from daemon.settings import load_settings
from daemon.store import AdapterVersionRecord, LedgerEntry, Round, Store
from edge_unisd.atomic_io import atomic_write_bytes, atomic_write_text, ensure_private_dir

REPORT_DIR = "report"  # default output folder inside the home
INDEX = "index.html"
VERSIONS_PNG, ROUNDS_PNG, BUDGET_PNG = "fit_retention.png", "loss_weights.png", "budget.png"
LOSS_TERMS = ("kd", "contrastive", "feature", "sft")
NIGHT_STARTS_HOUR = 12  # spending from noon to the next noon (local time) counts as one night


class ReportError(RuntimeError):
    """The report cannot be written (e.g. matplotlib is missing); the message says what to do."""


# --- what the store holds ------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundPoint:
    """One round's training summary: mean loss terms and agreement weights over its steps."""

    id: int
    status: str
    preset: str | None
    loss_mean: float | None
    terms: dict[str, float]
    weight_mean: float | None
    weight_min: float | None
    clip_fraction: float | None
    kd_kept: float | None = None  # share of the distillation signal the weights kept (older rounds: None)


@dataclass(frozen=True)
class Spend:
    created_at: dt.datetime
    predicted: float | None
    spent: float | None


@dataclass(frozen=True)
class History:
    versions: list[AdapterVersionRecord]
    rounds: list[RoundPoint]
    ledger: list[Spend]

    @property
    def empty(self) -> bool:
        return not (self.versions or self.rounds or self.ledger)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def _round_point(r: Round) -> RoundPoint | None:
    """The loss summary `daemon.jobs` stores with a round; None for rounds that never trained a step."""
    loss = (r.metrics or {}).get("loss") or {}
    if not isinstance(loss, dict) or not loss:
        return None
    terms = {k: v for k, v in ((k, _num((loss.get("terms_mean") or {}).get(k))) for k in LOSS_TERMS)
             if v is not None}
    return RoundPoint(id=r.id, status=r.status, preset=r.preset, loss_mean=_num(loss.get("mean")),
                      terms=terms, weight_mean=_num(loss.get("weight_mean")),
                      weight_min=_num(loss.get("weight_min")), clip_fraction=_num(loss.get("clip_fraction")),
                      kd_kept=_num(loss.get("kd_kept")))


def read_history(store: Store) -> History:
    """Every adapter version, every round that trained, every ledger entry, oldest first."""
    with Session(store.engine) as s:
        rounds = [p for p in (_round_point(r) for r in s.scalars(select(Round).order_by(Round.id))) if p]
        ledger = [Spend(e.created_at, _num(e.predicted), _num(e.spent))
                  for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.created_at, LedgerEntry.id))]
    return History(versions=store.adapter_versions(), rounds=rounds, ledger=ledger)


def night_of(when: dt.datetime, tz: dt.tzinfo | None = None) -> dt.date:
    """The night a moment belongs to: 02:00 on the 1st belongs to the night begun on the 31st."""
    local = when.astimezone(tz)
    return (local - dt.timedelta(hours=NIGHT_STARTS_HOUR)).date()


def spent_per_night(ledger: Sequence[Spend], tz: dt.tzinfo | None = None
                    ) -> list[tuple[dt.date, float, float]]:
    """(night, seconds spent, seconds predicted) per night with ledger entries, oldest first."""
    nights: dict[dt.date, list[float]] = {}
    for e in ledger:
        acc = nights.setdefault(night_of(e.created_at, tz), [0.0, 0.0])
        acc[0] += e.spent or 0.0
        acc[1] += e.predicted or 0.0
    return [(night, spent, predicted) for night, (spent, predicted) in sorted(nights.items())]


def _metric(version: AdapterVersionRecord, when: str, key: str) -> float | None:
    return _num(((version.metrics or {}).get(when) or {}).get(key))


# --- plots (matplotlib's object API on the Agg canvas: no pyplot, no display, no global state) ---------

def _figure(rows: int, height: float = 3.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("`edge-unisd report` needs matplotlib: pip install 'edge-unisd[report]' "
                          "(or pip install matplotlib)") from None
    fig = Figure(figsize=(7.5, height * rows), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, 1, squeeze=False)[:, 0]


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_versions(versions: Sequence[AdapterVersionRecord], bound: float) -> bytes | None:
    """Held-out fit and retention JSD of each version as the gate measured it; promoted vs rejected."""
    measured = [v for v in versions if v.metrics and v.metrics.get("after")]
    if not measured:
        return None
    fig, (ax_fit, ax_ret) = _figure(2)
    xs = list(range(len(measured)))
    styles = {"promoted": dict(color="tab:green", marker="o"), "rejected": dict(color="tab:red", marker="x")}
    for status in dict.fromkeys(v.status for v in measured):
        idx = [i for i, v in enumerate(measured) if v.status == status]
        for ax, key in ((ax_fit, "fit_nll"), (ax_ret, "retention_jsd")):
            pts = [(i, y) for i in idx if (y := _metric(measured[i], "after", key)) is not None]
            if pts:
                ax.scatter(*zip(*pts, strict=True), label=status, zorder=3,
                           **styles.get(status, dict(color="tab:gray", marker="s")))
    fit_line = [(i, y) for i, v in enumerate(measured) if (y := _metric(v, "after", "fit_nll")) is not None]
    if fit_line:
        ax_fit.plot(*zip(*fit_line, strict=True), color="tab:gray", linewidth=0.8, zorder=2)
    base_fit = _metric(measured[0], "before", "fit_nll")
    if base_fit is not None:
        ax_fit.axhline(base_fit, color="tab:gray", linestyle="--", linewidth=0.8,
                       label="before the first version")
    ax_ret.axhline(bound, color="tab:red", linestyle="--", linewidth=0.8, label=f"gate bound {bound:g}")
    ax_fit.set_ylabel("held-out NLL\n(nats/token, lower better)")
    ax_ret.set_ylabel("retention JSD vs base\n(lower better)")
    ax_fit.set_title("Adapter versions: held-out fit and retention")
    labels = [v.version.split("-")[0] for v in measured]
    for ax in (ax_fit, ax_ret):
        ax.set_xticks(xs, labels, rotation=45 if len(xs) > 8 else 0, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax_fit.ticklabel_format(axis="y", useOffset=False)
    return _png(fig)


def plot_rounds(rounds: Sequence[RoundPoint]) -> bytes | None:
    """Mean loss terms per round (top) and reliability weights / clipped share per round (bottom)."""
    if not rounds:
        return None
    fig, (ax_loss, ax_w) = _figure(2)
    xs = [r.id for r in rounds]
    for key in ("loss",) + LOSS_TERMS:
        ys = [r.loss_mean if key == "loss" else r.terms.get(key) for r in rounds]
        if all(y is None or y == 0.0 for y in ys):
            continue  # a term no preset used: leave it out rather than draw a flat zero
        ax_loss.plot(xs, [math.nan if y is None else y for y in ys], marker="o", markersize=3,
                     label="total loss" if key == "loss" else key, linewidth=1.6 if key == "loss" else 1.0)
    for label, ys, style in (("weight mean", [r.weight_mean for r in rounds], dict(color="tab:blue")),
                             ("weight min", [r.weight_min for r in rounds], dict(color="tab:orange")),
                             ("KD signal kept", [r.kd_kept for r in rounds], dict(color="tab:green")),
                             ("clipped share", [r.clip_fraction for r in rounds],
                              dict(color="tab:gray", linestyle=":"))):
        if any(y is not None for y in ys):
            ax_w.plot(xs, [math.nan if y is None else y for y in ys], marker="o", markersize=3, label=label,
                      **style)
    ax_loss.set_title("Rounds: loss terms (mean over steps) and reliability weights")
    ax_loss.set_ylabel("loss")
    ax_w.set_ylabel("weight / share")
    ax_w.set_ylim(-0.02, 1.05)
    ax_w.set_xlabel("round")
    for ax in (ax_loss, ax_w):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _png(fig)


def plot_budget(nights: Sequence[tuple[dt.date, float, float]]) -> bytes | None:
    """Seconds of adaptation spent per night, beside what the planner predicted."""
    if not nights:
        return None
    fig, (ax,) = _figure(1, height=3.2)
    xs = list(range(len(nights)))
    ax.bar([x - 0.2 for x in xs], [n[1] / 60 for n in nights], width=0.4, label="spent", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], [n[2] / 60 for n in nights], width=0.4, label="predicted", color="tab:gray",
           alpha=0.6)
    ax.set_xticks(xs, [n[0].isoformat() for n in nights], rotation=45 if len(xs) > 6 else 0, fontsize=8)
    ax.set_ylabel("minutes")
    ax.set_title("Budget spent per night (noon to noon, local time)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# --- the page ------------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.9rem}td,th{padding:.25rem .6rem;border-bottom:1px solid #eee;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}
.promoted{color:#1a7f37}.rejected{color:#b42318}"""


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _versions_table(versions: Sequence[AdapterVersionRecord]) -> str:
    rows = []
    for v in reversed(versions[-20:]):  # newest first; the plot has the full history
        reason = ((v.metrics or {}).get("verdict") or {}).get("reason", "")
        acc = _metric(v, "after", "accuracy")
        rows.append(
            f"<tr><td>{html.escape(v.version)}</td>"
            f"<td class='{html.escape(v.status)}'>{html.escape(v.status)}</td>"
            f"<td class='n'>{_fmt(_metric(v, 'after', 'fit_nll'), '.3f')}</td>"
            f"<td class='n'>{_fmt(_metric(v, 'after', 'retention_jsd'), '.4f')}</td>"
            f"<td class='n'>{_fmt(None if acc is None else 100 * acc, '.0f')}</td>"
            f"<td class='muted'>{html.escape(str(reason))}</td></tr>")
    return ("<table><tr><th>version</th><th>status</th><th>held-out NLL</th><th>retention JSD</th>"
            "<th>accuracy %</th><th>gate</th></tr>" + "".join(rows) + "</table>")


def render_html(history: History, plots: dict[str, str], *, home: Path, generated: dt.datetime) -> str:
    """index.html: the plots that have data (relative links), the latest versions, or a 'no data yet' note."""
    head = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>edge-unisd report</title>"
            f"<style>{_CSS}</style></head><body><h1>edge-unisd: adaptation history</h1>"
            f"<p class='muted'>{html.escape(str(home))} · generated {generated:%Y-%m-%d %H:%M %Z}</p>")
    if history.empty:
        body = ("<p><strong>No data yet.</strong> Nothing has been trained in this home: ingest prompts "
                "(<code>edge-unisd ingest FILE.jsonl</code>) and run a round "
                "(<code>edge-unisd adapt --once</code>), or let the daemon run; then write this report "
                "again.</p>")
        return head + body + "</body></html>\n"
    spent = sum(e.spent or 0.0 for e in history.ledger)
    promoted = sum(v.status == "promoted" for v in history.versions)
    parts = [f"<p>{len(history.versions)} adapter versions ({promoted} promoted), "
             f"{len(history.rounds)} rounds that trained, {spent / 60:.1f} minutes of adaptation in all.</p>"]
    for name, caption in plots.items():
        cap = html.escape(caption)
        parts.append(f"<h2>{cap}</h2><img src='{html.escape(name)}' alt='{cap}'>")
    missing = {VERSIONS_PNG: "adapter versions", ROUNDS_PNG: "rounds with training steps",
               BUDGET_PNG: "ledger entries"}
    for name, what in missing.items():
        if name not in plots:
            parts.append(f"<p class='muted'>No {what} yet.</p>")
    if history.versions:
        parts.append("<h2>Latest versions</h2>" + _versions_table(history.versions))
    return head + "".join(parts) + "</body></html>\n"


# --- writing it ----------------------------------------------------------------------------------

def _out_dir(out: str | os.PathLike | None, home: Home) -> Path:
    """The default (inside the home) is made private; a folder the user names is created 0700 if missing
    but an existing one keeps its mode (it may be a shared folder such as ~/Desktop)."""
    if out is None:
        return ensure_private_dir(home.root / REPORT_DIR)
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ReportError(f"--out {path} exists and is not a directory; give a folder")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def retention_bound(home: Home) -> float:
    """The gate's bound from settings.toml when it sets one, else the gate's default (as daemon.jobs does)."""
    settings = load_settings(home.settings)
    return float(getattr(settings, "gate_max_retention_jsd", DEFAULT_MAX_RETENTION_JSD))


def write_report(home: Home, out: str | os.PathLike | None = None, *, tz: dt.tzinfo | None = None,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone()) -> dict[str, Any]:
    """Read the store, draw what has data, write the PNGs and index.html (0600). Returns what was written."""
    home = home.require()
    with Store.open(home) as store:
        history = read_history(store)
    folder = _out_dir(out, home)
    drawn = {VERSIONS_PNG: ("Held-out fit and retention per adapter version",
                            lambda: plot_versions(history.versions, retention_bound(home))),
             ROUNDS_PNG: ("Loss terms and reliability weights per round",
                          lambda: plot_rounds(history.rounds)),
             BUDGET_PNG: ("Budget spent per night", lambda: plot_budget(spent_per_night(history.ledger, tz)))}
    plots: dict[str, str] = {}
    for name, (caption, draw) in drawn.items():
        png = draw()
        if png is None:
            (folder / name).unlink(missing_ok=True)  # a plot from an earlier report whose data is gone
            continue
        atomic_write_bytes(folder / name, png)
        plots[name] = caption
    index = atomic_write_text(folder / INDEX, render_html(history, plots, home=home.root, generated=now()))
    return {"out": str(folder), "index": str(index), "plots": [str(folder / n) for n in plots],
            "empty": history.empty, "versions": len(history.versions), "rounds": len(history.rounds),
            "ledger_entries": len(history.ledger)}


def main(args: argparse.Namespace) -> int:
    """`edge-unisd report`: args has `home`, `out` and `json`. Raises HomeError / ReportError for the CLI."""
    result = write_report(Home.resolve(args.home), args.out)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif result["empty"]:
        print(f"no data yet; wrote {result['index']}")
    else:
        print(f"wrote {result['index']} with {len(result['plots'])} plots")
    return 0
