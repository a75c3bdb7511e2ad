"""Crash safety: `kill -9` of the daemon during a round loses no acknowledged prompt, leaves the store and the
adapter registry consistent (only whole versions), and the next start runs the round to the end.

A real `edge-unisd run` subprocess on the test hook's tiny random model (see test_service.py's helpers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from adapters.registry import PEFT_FILES, AdapterRegistry
from daemon.lifecycle import lock_holder
from daemon.store import Store
from tests.daemon.test_service import Daemon, console_script, make_home, wait_until

ROUND_DONE_S = 240.0


def whole_versions_only(adapters_dir) -> list[str]:
    """Every entry of the adapters folder is a whole version (PEFT files + meta.json), the CURRENT pointer or
    the lock; a kill must not leave a half version where `list()` or a server could pick it up."""
    names = sorted(os.listdir(adapters_dir))
    for name in names:
        path = adapters_dir / name
        if name in ("CURRENT", ".lock"):
            continue
        assert name.startswith("v") and path.is_dir(), f"unexpected {name} in {adapters_dir}"
        assert all((path / f).is_file() for f in (*PEFT_FILES, "meta.json")), f"{name} is not whole"
        json.loads((path / "meta.json").read_text())
    return [n for n in names if n.startswith("v")]


def test_a_daemon_killed_during_a_round_restarts_and_finishes_it_without_losing_items(tmp_path):
    home = make_home(tmp_path / "home", n_items=24)  # 6 steps of 4
    daemon = Daemon(home)
    try:
        daemon.wait_for("round 1:", 180)  # planned: its items are fixed, it is running in the child
        # acknowledged while the round runs: through the CLI (committed before it exits 0) and the spool
        rows = tmp_path / "more.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"late {i}", "id": f"late{i}"}) + "\n" for i in range(3)))
        ack = subprocess.run(console_script() + ["ingest", "--home", str(home.root), str(rows)], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert ack.returncode == 0 and ack.stdout.startswith("more.jsonl: 3 added")
        (home.incoming / "spooled.jsonl").write_text('{"prompt": "from the spool", "id": "spooled"}\n')
        wait_until(lambda: (home.done / "spooled.jsonl").exists(), 30, "the spool file to be filed away")
        daemon.wait_for("step 1/", 180)
        daemon.proc.send_signal(signal.SIGKILL)  # mid-round: no handler, no checkpoint, no cleanup
        daemon.proc.wait(10)
    finally:
        daemon.kill()
    assert "round 1:" in daemon.log and "v0001" not in daemon.log  # it was killed before the version
    # the round's child died with its parent (PR_SET_PDEATHSIG): the home is free for the next daemon
    wait_until(lambda: lock_holder(home.root) is None, 10, "the daemon lock to be released")
    with Store.open(home) as store:
        (running,) = store.unfinished_rounds()  # as the kill left it

    restarted = Daemon(home)
    try:
        restarted.wait_for("round 1: promoted", ROUND_DONE_S)  # the same round (id 1), run to its end
        took = restarted.stop(signal.SIGTERM)
    finally:
        restarted.kill()
    assert took < 30 and restarted.proc.returncode == 0, restarted.log[-2000:]

    # no acknowledged prompt lost, none stored twice
    with Store.open(home) as store:
        ids = {it.id for it in store.get_items()}
        assert ids == {f"q{i}" for i in range(24)} | {"late0", "late1", "late2", "spooled"}
        assert store.unfinished_rounds() == []
        last = store.last_round()
        assert (last.id, last.status, last.adapter_version) == (running.id, "done", "v0001")
        assert {v.version: v.status for v in store.adapter_versions()} == {"v0001": "promoted"}
        assert store.count_items().pending == len(ids) - last.n_items  # what arrived after the plan waits
    # the registry: whole versions only, the current one among them
    assert whole_versions_only(home.adapters) == ["v0001"]
    reg = AdapterRegistry(home.adapters)
    assert reg.current().version == "v0001" and set(reg.get("v0001").item_ids) <= ids
    assert not (home.checkpoints / "round.json").exists()
