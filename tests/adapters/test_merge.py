"""merge_adapter: the merged weights are W + scaling * B @ A, in fp32, and the caller's model is untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters.merge import MergeError, full_precision_base, is_quantized, merge_adapter
from edge_unisd.modeling import LoadedModel, load_base


def test_merged_weights_are_base_plus_scaled_lora(tiny_qwen2, tiny_qwen2_adapter):
    base = load_base(tiny_qwen2)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    merged = merge_adapter(base, tiny_qwen2_adapter).state_dict()
    cfg = json.loads((tiny_qwen2_adapter / "adapter_config.json").read_text())
    lora = load_file(str(tiny_qwen2_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    delta = cfg["lora_alpha"] / cfg["r"] * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(merged[name], before[name] + delta)
    torch.testing.assert_close(merged["model.layers.1.self_attn.v_proj.bias"],
                               before["model.layers.1.self_attn.v_proj.bias"])  # biases are not LoRA'd
    assert all(v.dtype == torch.float32 for v in merged.values())
    assert not any("lora" in k for k in merged)
    for k, v in base.model.state_dict().items():  # the caller's model is unchanged
        torch.testing.assert_close(v, before[k])


def test_a_live_peft_model_is_unwrapped_not_merged(tiny_llama, tiny_llama_adapter):
    from peft import LoraConfig, get_peft_model

    base = load_base(tiny_llama)
    plain = merge_adapter(base, tiny_llama_adapter).state_dict()
    live = get_peft_model(load_base(tiny_llama).model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in live.named_parameters():
            if "lora_B" in n:
                p.fill_(1.0)  # the live adapter must not leak into the export
    from_live = merge_adapter(LoadedModel(live, base.tokenizer, base.source, base.device, base.dtype),
                              tiny_llama_adapter).state_dict()
    assert from_live.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(from_live[k], plain[k])
    assert any("lora_B" in n for n, _ in live.named_parameters())  # still the caller's PEFT model


def test_a_quantised_or_half_precision_base_is_reloaded_in_fp32(tiny_llama):
    base = load_base(tiny_llama)
    base.model.lm_head.weight = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.uint8), requires_grad=False)
    assert is_quantized(base.model)
    fresh = full_precision_base(base)
    assert fresh.model is not base.model and not is_quantized(fresh.model)
    half = load_base(tiny_llama, dtype="bfloat16")
    assert next(full_precision_base(half).model.parameters()).dtype == torch.float32


def test_a_folder_without_adapter_files_is_named_in_the_error(tiny_llama, tmp_path):
    with pytest.raises(MergeError, match="adapter_config.json missing"):
        merge_adapter(tiny_llama, tmp_path)
