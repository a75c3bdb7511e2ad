"""The daemon's knobs: one TOML file in the home (`settings.toml`), each key overridable by EDGE_UNISD_<KEY>.

Validated once at the edge with pydantic; errors name the key and where it came from (the file
or the environment variable) so the user knows what to edit. Components get plain values.
The `[budget]` table is passed through as a dict; `budgets/` validates it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_unisd.atomic_io import atomic_write_text
from edge_unisd.config import RolloutBackendName

ENV_PREFIX = "EDGE_UNISD_"


class SettingsError(ValueError):
    """settings.toml or an EDGE_UNISD_* variable is invalid; the message names the key and the source."""


class DaemonSettings(BaseModel):
    """Everything `edge-unisd run` and its commands read from settings.toml."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(
        None, max_length=4096,
        description="base model: a .gguf file or a Hugging Face model folder; unset: bundled SmolLM2-135M")
    preset: str = Field("edge", min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]*$",
                        description="UniSD method preset for adaptation rounds (edge, unisd-star, sd, ...)")
    round_budget_seconds: float = Field(600.0, ge=10, le=86_400,
                                        description="wall-clock budget of one adaptation round, in seconds")
    schedule_interval_minutes: int = Field(
        60, ge=1, le=10_080, description="how often the scheduler asks the gates whether to adapt")
    spool_poll_seconds: float = Field(30.0, ge=1, le=3_600,
                                      description="how often spool/incoming is checked for new files")
    retention_days: int = Field(
        365, ge=0, le=36_500, description="items older than this many days are deleted; 0 keeps all")
    keep_versions: int = Field(5, ge=1, le=1_000,
                               description="adapter versions kept on disk (rollback targets)")
    held_out_fraction: float = Field(
        0.1, ge=0.0, le=0.5,
        description="share of new items with a reference answer kept out of training to evaluate the gate")
    collect: bool = Field(False, description="serve: store each exchange as an item (opt-in)")
    serve_host: str = Field("127.0.0.1", min_length=1, max_length=255,
                            description="serve: address to bind; anything but loopback needs serve_api_key")
    serve_port: int = Field(8765, ge=1, le=65_535, description="serve: TCP port")
    serve_api_key: str | None = Field(None, min_length=16, max_length=256,
                                      description="serve: bearer key every request must carry (>= 16 chars)")
    base_quantization: Literal["none", "nf4"] = Field(
        "none", description="QLoRA: nf4 holds the base's linear weights in 4-bit (bitsandbytes, the [gpu] extra) "
        "to fit larger models in GPU memory; none trains on the full-precision base")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="what training and evaluation compute in: auto (bf16 on a GPU; on a CPU bf16 where it "
        "multiplies bf16 natively, measured at start, e.g. AVX512-BF16 CPUs: ~1.5x faster rounds; fp32 elsewhere), "
        "float32 or bfloat16. The LoRA weights and the loss arithmetic stay fp32; exports merge into the "
        "full-precision base")
    rollout_backend: RolloutBackendName = Field(
        "auto", description="who samples the on-policy answers: auto (llama.cpp for a GGUF base on CPU, "
        "else transformers), hf (transformers generate) or llamacpp (insist)")
    # f16 by default: verified against the merged torch model at top-1 >= 0.98, KL <= 0.01. q8_0 misses its
    # 0.95 top-1 bar on the bundled 135M model (near-ties) and would have every export refused.
    export_quant: Literal["f16", "bf16", "f32", "q8_0", "q4_k_m"] = Field(
        "f16", description="GGUF export quantisation (f16, bf16, f32, q8_0, q4_k_m)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level; prompts are only ever logged at debug")
    budget: dict[str, Any] = Field(default_factory=dict,
                                   description="the [budget] table, validated by the budgets package")

    @model_validator(mode="after")
    def _remote_serve_needs_key(self) -> DaemonSettings:
        if not _is_loopback(self.serve_host) and self.serve_api_key is None:
            raise ValueError(f"serve_host {self.serve_host!r} is not loopback; set serve_api_key as well "
                             "(or use serve_host = \"127.0.0.1\")")
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- loading

def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as e:
            raise SettingsError(f"reading {path} on Python 3.10 needs the `tomli` package: "
                                "pip install tomli") from e
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise SettingsError(f"settings file not found: {path}; run `edge-unisd init` to write one") from e
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{path}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from e
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror or e}") from e


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """EDGE_UNISD_<KEY> values of the known keys (other EDGE_UNISD_* variables, e.g. _HOME, are not settings).

    An empty value unsets an optional key (e.g. `EDGE_UNISD_BASE_MODEL=` means the bundled model).
    """
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, field in DaemonSettings.model_fields.items():
        if name == "budget":
            continue  # a table, not a scalar; set it in the file
        var = ENV_PREFIX + name.upper()
        if var in environ:
            value = environ[var]
            out[name] = None if value == "" and field.default is None else value
    return out


def _describe_errors(err: ValidationError, origin: dict[str, str], fallback: str) -> str:
    lines = []
    for e in err.errors(include_url=False):
        key = str(e["loc"][0]) if e["loc"] else ""
        where = origin.get(key, fallback)
        if e["type"] == "extra_forbidden":
            known = ", ".join(k for k in DaemonSettings.model_fields)
            lines.append(f"{where}: unknown key {key!r} (known keys: {known})")
        elif key:
            sub = ".".join(str(p) for p in e["loc"][1:])
            lines.append(f"{where}: key {key + ('.' + sub if sub else '')!r}: {e['msg']} "
                         f"(got {json.dumps(e['input'], default=str)[:80]})")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(lines)


def load_settings(path: str | os.PathLike | None, environ: dict[str, str] | None = None) -> DaemonSettings:
    """Read `path` (None: defaults only), apply EDGE_UNISD_* overrides, validate. Raises SettingsError."""
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    fallback = "defaults"
    if path is not None:
        path = Path(path)
        data = _read_toml(path)
        origin = {k: str(path) for k in data}
        fallback = str(path)
    for key, value in env_overrides(environ).items():
        data[key] = value
        origin[key] = f"environment variable {ENV_PREFIX}{key.upper()}"
    try:
        return DaemonSettings.model_validate(data)
    except ValidationError as e:
        raise SettingsError(_describe_errors(e, origin, fallback)) from None


# --- writing the commented default

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a valid TOML basic string


def default_settings_text(base_model: str | None = None) -> str:
    """The commented settings.toml `edge-unisd init` writes: every key, its meaning, its default."""
    defaults = DaemonSettings(base_model=base_model)
    lines = ["# edge-unisd settings. Each key can also be set by the environment: EDGE_UNISD_<KEY>",
             "# (e.g. EDGE_UNISD_ROUND_BUDGET_SECONDS=300). Unknown keys are an error.", ""]
    for name, field in DaemonSettings.model_fields.items():
        if name == "budget":
            continue
        lines.append(f"# {field.description}")
        value = getattr(defaults, name)
        if value is None:
            example = "/path/to/model.gguf" if name == "base_model" else "<a long random string>"
            lines.append(f"# {name} = {_toml_value(example)}")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    lines += ["# Budgets: when rounds may run and how much they may spend (keys: see the budgets package).",
              "[budget]", ""]
    return "\n".join(lines)


def write_default_settings(path: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the commented default settings.toml atomically, 0600. Overwrites: callers check existence."""
    return atomic_write_text(path, default_settings_text(base_model))
