"""Where the daemon keeps everything of one user: one private (0700) directory, found alike by every command.

Resolution order: `--home DIR`, else $EDGE_UNISD_HOME, else $XDG_DATA_HOME/edge-unisd
(~/.local/share/edge-unisd). Every path inside is named here so no other module builds one by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edge_unisd.atomic_io import ensure_private_dir

HOME_ENV = "EDGE_UNISD_HOME"


class HomeError(RuntimeError):
    """The home directory is missing or unusable; the message says which path and what to run."""


def default_home() -> Path:
    """$EDGE_UNISD_HOME, else $XDG_DATA_HOME/edge-unisd, else ~/.local/share/edge-unisd."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser() / "edge-unisd"


def resolve_home(arg: str | os.PathLike | None = None) -> Path:
    """The home a command works on: the `--home` value if given, else the default."""
    return (Path(arg).expanduser() if arg else default_home()).absolute()


@dataclass(frozen=True)
class Home:
    """The layout of one home directory. `create()` makes it; `require()` checks `init` ran."""

    root: Path

    @classmethod
    def resolve(cls, arg: str | os.PathLike | None = None) -> Home:
        return cls(resolve_home(arg))

    # --- files
    @property
    def db(self) -> Path:
        return self.root / "edge-unisd.db"

    @property
    def settings(self) -> Path:
        return self.root / "settings.toml"

    @property
    def lock(self) -> Path:
        """Single-instance lock file of the daemon (`edge-unisd run`)."""
        return self.root / "daemon.lock"

    # --- directories
    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def incoming(self) -> Path:
        """Drop JSON Lines files here (write as `.name` or `name.part`, then rename) to have them ingested."""
        return self.spool / "incoming"

    @property
    def done(self) -> Path:
        return self.spool / "done"

    @property
    def rejected(self) -> Path:
        return self.spool / "rejected"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def directories(self) -> list[Path]:
        return [self.root, self.adapters, self.exports, self.spool, self.incoming, self.done, self.rejected,
                self.logs, self.checkpoints]

    def create(self) -> Home:
        """Make every directory (0700; existing ones are tightened to 0700 too). Idempotent."""
        if self.root.exists() and not self.root.is_dir():
            raise HomeError(f"{self.root} exists and is not a directory; choose another --home")
        try:
            for d in self.directories():
                ensure_private_dir(d)
        except OSError as e:
            raise HomeError(f"cannot create the home directory {self.root}: {e.strerror or e}") from e
        return self

    def is_initialised(self) -> bool:
        return self.db.is_file() and self.settings.is_file()

    def require(self) -> Home:
        """Raise a HomeError saying what to run when `edge-unisd init` has not been run for this home."""
        if not self.is_initialised():
            raise HomeError(f"no edge-unisd home at {self.root}; run "
                            f"`edge-unisd init --home {self.root}` first (or set {HOME_ENV})")
        return self.create()  # a newer version may have added a directory
