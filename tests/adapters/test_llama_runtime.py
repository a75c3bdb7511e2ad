"""The AMX guard: on an AMX CPU llama.cpp models load without the extra buffer types that crash."""

from __future__ import annotations

import pytest

from adapters.llama_runtime import EXTRA_BUFFERS_ENV, cpu_has_amx, extra_buffers_wanted, import_llama_cpp


def test_amx_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert cpu_has_amx(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert not cpu_has_amx(info)
    assert not cpu_has_amx(tmp_path / "missing")


@pytest.mark.parametrize(("env", "amx", "wanted"), [
    ({}, True, False), ({}, False, True),
    ({EXTRA_BUFFERS_ENV: "1"}, True, True), ({EXTRA_BUFFERS_ENV: "0"}, False, False),
])
def test_extra_buffers_follow_the_cpu_unless_the_environment_says(env, amx, wanted):
    assert extra_buffers_wanted(env, has_amx=amx) is wanted


def test_the_guard_reaches_the_params_every_llama_is_built_with():
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_cpp.llama_model_default_params()
    assert params.use_extra_bufts is extra_buffers_wanted()
    assert import_llama_cpp() is llama_cpp  # applied once per process
