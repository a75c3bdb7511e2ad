"""Which GGUF `edge-unisd serve` answers with, under what version label, and the switch to a newly published one.

The served file is `exports/current.gguf` (published by `adapters.publish.swap_in`: a hard link to a
verified build, renamed into place), else the base model's GGUF when nothing was exported yet.
A watcher polls the file's identity (device, inode, size, mtime); when it changes the new model is
loaded beside the old one and new requests get it. Requests in flight are counted per model: the
old one is closed when the last request that started on it ends, not before: no request is
dropped, nothing restarts.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adapters.publish import CURRENT_MERGED
from edge_unisd.modeling import bundled_model_path, sha256_file

log = logging.getLogger(__name__)

LLAMA_ENV_PREFIX = "EDGE_UNISD_LLAMA_"  # e.g. EDGE_UNISD_LLAMA_N_GPU_LAYERS=-1, EDGE_UNISD_LLAMA_N_CTX=4096
_BUILD_ADAPTER_RE = re.compile(r"^(v\d{4,})-")


class ModelFileError(RuntimeError):
    """There is no GGUF to serve, or it cannot be loaded; the message names the file and what to run."""


# --- what is served ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileIdentity:
    """Changes whenever a file is replaced (new inode) or rewritten in place (size, mtime)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity | None:
        try:
            st = os.stat(path)  # follows a symlinked current.gguf to its build
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ServedVersion:
    """One loaded GGUF as clients see it: `label` is /v1/models' `version` and each response's model."""

    label: str
    path: Path
    kind: Literal["export", "base"]
    adapter: str | None  # the registry version (v0003) the build was exported from, when known
    identity: FileIdentity
    sha256: str | None
    loaded_at: dt.datetime

    def model_card(self, model_id: str) -> dict[str, Any]:
        """The /v1/models entry: OpenAI's fields plus what a user needs to tell versions apart."""
        modified = dt.datetime.fromtimestamp(self.identity.mtime_ns / 1e9, dt.timezone.utc)
        return {"id": model_id, "object": "model", "created": int(modified.timestamp()),
                "owned_by": "edge-unisd", "version": self.label, "adapter": self.adapter, "kind": self.kind,
                "path": str(self.path), "size": self.identity.size, "modified": modified.isoformat(),
                "sha256": self.sha256, "loaded_at": self.loaded_at.isoformat()}


def gguf_to_serve(exports: Path, base_model: str | None) -> tuple[Path, Literal["export", "base"]]:
    """`exports/current.gguf` if published, else the base GGUF (settings' base_model, else the bundled one)."""
    current = exports / CURRENT_MERGED
    if current.exists():
        return current, "export"
    if base_model is None:
        return bundled_model_path(), "base"
    base = Path(base_model).expanduser()
    if base.is_file() and base.suffix.lower() == ".gguf":
        return base, "base"
    raise ModelFileError(f"nothing to serve: {current} does not exist and the base model {base} is not a "
                         "GGUF file; run `edge-unisd export` first")


def _build_of(current: Path) -> Path | None:
    """The build in `exports/builds/` that current.gguf is (a hard link or a symlink to it), if any."""
    builds = current.parent / "builds"
    with contextlib.suppress(OSError):
        for p in builds.glob("*.gguf"):
            with contextlib.suppress(OSError):
                if os.path.samefile(p, current):
                    return p
    return None


def describe(path: Path, kind: Literal["export", "base"], identity: FileIdentity) -> ServedVersion:
    """Name a file: the build it was published from (`v0003-q8_0-<stamp>`), else `<kind>-<sha256 prefix>`."""
    build = _build_of(path) if kind == "export" else None
    if build is not None:
        m = _BUILD_ADAPTER_RE.match(build.stem)
        return ServedVersion(build.stem, path, kind, m.group(1) if m else None, identity, None,
                             dt.datetime.now(dt.timezone.utc))
    digest = sha256_file(path)  # once per publish; a build name spares it for files the daemon exported
    label = f"{'current' if kind == 'export' else 'base'}-{digest[:12]}"
    return ServedVersion(label, path, kind, None, identity, digest, dt.datetime.now(dt.timezone.utc))


def load_llama(path: Path, **overrides: Any) -> Any:
    """A llama_cpp.Llama through llama-cpp-python's own server loader (chat format from the GGUF).

    ModelSettings is a pydantic BaseSettings: its fields are read from EDGE_UNISD_LLAMA_<FIELD>
    (not from bare names like MODEL or N_CTX, which other tools may have set).
    """
    from adapters.llama_runtime import import_llama_cpp

    import_llama_cpp()  # the AMX guard, before llama-cpp-python's loader builds a Llama
    from llama_cpp.server.model import LlamaProxy
    from llama_cpp.server.settings import ModelSettings

    try:
        settings = ModelSettings(_env_prefix=LLAMA_ENV_PREFIX, model=str(path), verbose=False, **overrides)
        llama = LlamaProxy.load_llama_from_model_settings(settings)
        # warm up here, off the request path: the first evaluation pages in and prepares the weights
        # (seconds on a busy CPU), which would otherwise land on the first request after a switch
        llama.eval([llama.token_bos()])
        llama.reset()
        return llama
    except (ValueError, OSError, RuntimeError) as e:  # llama-cpp-python raises these for unusable files
        raise ModelFileError(f"cannot load {path} with llama.cpp: {e}") from e


# --- the switch ----------------------------------------------------------------------------------

@dataclass
class _Loaded:
    version: ServedVersion
    llama: Any
    users: int = 0  # requests that were handed this model and have not ended
    retired: bool = False  # a newer version is being served


class RequestModel:
    """What one request was answered with (`version`); the model stays open until the request ends."""

    def __init__(self) -> None:
        self.version: ServedVersion | None = None
        self.loaded: _Loaded | None = None


_request_model: contextvars.ContextVar[RequestModel | None] = contextvars.ContextVar(
    "edge_unisd_request_model", default=None)


class ModelSwitch:
    """Stands in for llama-cpp-python's LlamaProxy: `switch(model_name)` is the Llama of the current version.

    The model name a client sends is ignored (there is one model: the user's). `poll()` reloads
    when the served file changed. Every request runs inside `request_scope()`: the model it is
    handed is counted as in use until the scope ends; a replaced model is closed (its memory
    freed) when its count reaches zero, not before, and not later than that.
    """

    def __init__(self, exports: Path, base_model: str | None = None,
                 loader: Callable[[Path], Any] = load_llama):
        self.exports = Path(exports)
        self.base_model = base_model
        self._loader = loader
        self._lock = threading.Lock()
        self._current: _Loaded | None = None
        self._seen: tuple[Path, FileIdentity | None] | None = None  # last file tried, loaded or not
        self._draining: list[_Loaded] = []  # replaced, still used by requests in flight

    # --- loading
    def load(self) -> ServedVersion:
        """Load what should be served now (first call: errors propagate, there is nothing to fall back on)."""
        path, kind = gguf_to_serve(self.exports, self.base_model)
        identity = FileIdentity.of(path)
        self._seen = (path, identity)
        if identity is None:
            raise ModelFileError(f"{path} disappeared while loading; try again")
        version = describe(path, kind, identity)
        llama = self._loader(path)
        if FileIdentity.of(path) != identity:  # replaced during the load: the next poll loads the newer one
            self._seen = (path, None)
        self._install(_Loaded(version, llama))
        return version

    def poll(self) -> ServedVersion | None:
        """Reload if the file to serve changed since the last try; the new version, or None. Never raises:
        a file that fails to load is logged and skipped (the old model keeps serving) until it changes again."""
        try:
            path, _ = gguf_to_serve(self.exports, self.base_model)
        except Exception as e:  # noqa: BLE001 - e.g. the bundled package removed under us
            log.warning("serve: cannot find a model file to switch to: %s", e)
            return None
        if self._seen == (path, FileIdentity.of(path)):
            return None
        try:
            return self.load()
        except Exception as e:  # noqa: BLE001 - keep serving the old model whatever went wrong
            log.warning("serve: keeping %s: the new file %s did not load: %s", self.current.label, path, e)
            return None

    def _install(self, loaded: _Loaded) -> None:
        with self._lock:
            old, self._current = self._current, loaded
            if old is not None:
                old.retired = True
                self._draining.append(old)
        if old is None:
            log.info("serve: serving %s from %s", loaded.version.label, loaded.version.path)
            return
        log.info("serve: now serving %s (was %s; requests in flight finish on it)", loaded.version.label,
                 old.version.label)
        self._close_unused()

    def _close_unused(self) -> None:
        with self._lock:
            done = [m for m in self._draining if m.users == 0]
            self._draining = [m for m in self._draining if m.users > 0]
        for m in done:
            close = getattr(m.llama, "close", None)
            if close is not None:
                close()  # frees llama.cpp's model and context now, whoever still holds the Python object
            log.info("serve: closed %s (no request uses it any more)", m.version.label)

    # --- what LlamaProxy offered
    def __call__(self, model: str | None = None) -> Any:
        holder = _request_model.get()
        with self._lock:
            if self._current is None:
                raise ModelFileError("no model is loaded")
            loaded = self._current
            if holder is not None and holder.loaded is None:
                loaded.users += 1
                holder.loaded, holder.version = loaded, loaded.version
            elif holder is not None:
                loaded = holder.loaded  # one request, one model, even across a switch
        return loaded.llama

    def __iter__(self) -> Iterator[str]:
        yield self.current.label

    def free(self) -> None:
        """At shutdown: retire the current model too (closed now, or when its last request ends)."""
        with self._lock:
            current, self._current = self._current, None
            if current is not None:
                current.retired = True
                self._draining.append(current)
        self._close_unused()

    # --- for the rest of serve
    @property
    def current(self) -> ServedVersion:
        with self._lock:
            if self._current is None:
                raise ModelFileError("no model is loaded")
            return self._current.version

    def draining(self) -> int:
        """Replaced models still open for requests in flight (0 once they have all ended)."""
        with self._lock:
            return len(self._draining)

    @contextlib.contextmanager
    def request_scope(self) -> Iterator[RequestModel]:
        """Around one request: the model handed out inside is recorded in the holder and counted as in use."""
        holder = RequestModel()
        token = _request_model.set(holder)
        try:
            yield holder
        finally:
            _request_model.reset(token)
            if holder.loaded is not None:
                with self._lock:
                    holder.loaded.users -= 1
                    retired = holder.loaded.retired
                holder.loaded = None
                if retired:
                    self._close_unused()
