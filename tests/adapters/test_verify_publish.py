"""The comparison maths, the bars, the atomic swap of current.gguf, and the Ollama Modelfile."""

from __future__ import annotations

import os

import numpy as np
import pytest

from adapters.publish import chatml_default_system, modelfile_text, swap_in
from adapters.verify import BARS, bar_for, compare_logits

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def test_identical_or_shifted_logits_give_zero_kl_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((7, 50)).astype(np.float32) * 3
    kl, top = compare_logits(logits, logits + 4.0)  # softmax is shift-invariant
    np.testing.assert_allclose(kl, 0.0, atol=1e-9)
    assert top.tolist() == [1.0] * 7


def test_kl_matches_a_hand_computed_value_and_top1_sees_a_swap():
    ref = np.log(np.array([[0.7, 0.2, 0.1]]))
    test = np.log(np.array([[0.2, 0.7, 0.1]]))
    kl, top = compare_logits(ref, test)
    expected = 0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)
    assert kl[0] == pytest.approx(expected) and top[0] == 0.0


def test_bars_get_stricter_with_precision():
    assert bar_for("f16") == BARS["f16"] and BARS["f16"].top1_min == 0.98 and BARS["f16"].kl_max == 0.01
    assert BARS["q8_0"].top1_min == 0.95 and BARS["q8_0"].kl_max == 0.03
    order = ["f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m", "q2_k"]
    for hi, lo in zip(order, order[1:], strict=False):
        assert BARS[hi].top1_min >= BARS[lo].top1_min and BARS[hi].kl_max <= BARS[lo].kl_max, (hi, lo)
    with pytest.raises(ValueError, match="no verification bar"):
        bar_for("q1_0")


def test_swap_in_replaces_atomically_and_open_readers_keep_the_old_file(tmp_path):
    old, new = tmp_path / "b1.gguf", tmp_path / "b2.gguf"
    old.write_bytes(b"old model")
    new.write_bytes(b"new model")
    current = tmp_path / "current.gguf"
    swap_in(old, current)
    assert current.read_bytes() == b"old model" and not current.is_symlink()
    with open(current, "rb") as reader:  # a server that has the file open
        swap_in(new, current)
        assert reader.read() == b"old model"
    assert current.read_bytes() == b"new model" and os.path.samefile(current, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1.gguf", "b2.gguf", "current.gguf"]


def test_modelfile_translates_chatml_with_its_default_system_prompt():
    smol_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chatml_default_system(SMOL_TEMPLATE) == smol_system
    text = modelfile_text("./current.gguf", SMOL_TEMPLATE, "<|im_end|>", note="verified")
    lines = text.splitlines()
    assert "FROM ./current.gguf" in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in lines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert lines.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in lines
    assert text.count('"""') == 4


def test_modelfile_for_other_templates_and_for_an_adapter():
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
    text = modelfile_text("/models/base.gguf", llama3, "<|eot_id|>", adapter="./current-lora.gguf")
    assert "TEMPLATE" not in text.replace("# TEMPLATE", "")
    assert "ADAPTER ./current-lora.gguf" in text and 'PARAMETER stop "<|eot_id|>"' in text
