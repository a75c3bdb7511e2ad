"""Put a verified GGUF where servers look, atomically, and write an Ollama Modelfile next to it.

`current.gguf` is a real file: a hard link to the verified build, renamed over the old name in one
step. A server that has the old file open (or mmapped) keeps reading the old inode; one that opens
the path gets the whole new file; no one ever sees a half-written one. Where hard links are not
possible (odd filesystems), a relative symlink is swapped in the same way.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import tempfile
from pathlib import Path

from edge_unisd.atomic_io import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

CURRENT_MERGED = "current.gguf"
CURRENT_LORA = "current-lora.gguf"


def swap_in(build: Path, target: Path) -> Path:
    """Make `target` the same file as `build` in one rename (hard link, else relative symlink)."""
    build, target = Path(build), Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        try:
            os.link(build, tmp)
        except OSError:
            os.symlink(os.path.relpath(build, target.parent), tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# --- Ollama Modelfile ---------------------------------------------------------------------------

# Ollama's Go-template form of ChatML. A default system prompt of the Jinja template becomes SYSTEM,
# which Ollama inserts as the first message when a request has none (what the Jinja template does).
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"<>]+?)<\|im_end\|>")


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template


def chatml_default_system(chat_template: str) -> str | None:
    """The literal default system prompt of a ChatML Jinja template (SmolLM2, Qwen2.5), if it has one."""
    m = _DEFAULT_SYSTEM_RE.search(chat_template)
    return m.group(1).strip() if m else None


def stop_tokens(chat_template: str | None, eos_token: str | None) -> list[str]:
    stops = []
    if is_chatml(chat_template):
        stops += ["<|im_end|>", "<|im_start|>"]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return stops


def _quote(s: str) -> str:
    if '"""' in s:
        raise ValueError('text for a Modelfile contains """; cannot quote it')
    return f'"""{s}"""'


def modelfile_text(from_: str, chat_template: str | None, eos_token: str | None, *,
                   adapter: str | None = None, note: str = "") -> str:
    """An Ollama Modelfile: FROM, optional ADAPTER, TEMPLATE/SYSTEM for ChatML, PARAMETER stop lines.

    For a template that is not ChatML no TEMPLATE is written: Ollama then reads the GGUF's own
    tokenizer.chat_template and matches it against the templates it knows.
    """
    lines = [f"# Written by edge-unisd {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"]
    if note:
        lines += [f"# {line}" for line in note.splitlines()]
    lines.append(f"FROM {from_}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if is_chatml(chat_template):
        lines.append(f"TEMPLATE {_quote(CHATML_GO_TEMPLATE)}")
        system = chatml_default_system(chat_template or "")
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
    elif chat_template:
        lines.append("# TEMPLATE: not ChatML; Ollama uses the chat template stored in the GGUF")
    for stop in stop_tokens(chat_template, eos_token):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, from_: str, chat_template: str | None, eos_token: str | None, *,
                    adapter: str | None = None, note: str = "") -> Path:
    return atomic_write_text(path, modelfile_text(from_, chat_template, eos_token, adapter=adapter, note=note))
