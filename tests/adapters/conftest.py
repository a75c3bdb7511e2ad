"""Fixtures for the adapters tests: a tiny byte-level BPE tokenizer with a ChatML template, tiny random
llama / qwen2 models saved as HF folders with it, and random LoRA adapters that clearly change the logits.

Everything is built in-process from a config (no downloads); the bundled SmolLM2 model is used only by
tests marked slow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

# SmolLM2's template shape: ChatML with a default system prompt when the chat has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
    "def square(x):\n    return x * x\n", "Water boils at 100 degrees Celsius; 12 * 7 = 84.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman.",
    "Keep a regular schedule and avoid screens before bed.", "Der Zug fährt um 14:35 ab. Très bien!",
] * 20


def make_tokenizer(folder: Path):
    """Byte-level BPE (GPT-2 pre-tokenizer) trained on a few sentences, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: Path, arch: str, *, hidden: int = 64, intermediate: int = 128, pad_vocab: int = 0,
                    tied: bool | None = None, init: float = 0.1, seed: int = 0) -> Path:
    """A random llama (tied, like SmolLM2) or qwen2 (untied, with q/k/v biases) model + tokenizer in `folder`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    kw = dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=intermediate, vocab_size=len(tok) + pad_vocab, max_position_embeddings=512,
              initializer_range=init, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True if tied is None else tied, **kw)
    else:
        cfg = Qwen2Config(tie_word_embeddings=False if tied is None else tied, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, init)  # zero biases would not test their mapping
    model.save_pretrained(folder)
    return folder


def make_random_adapter(base_model: torch.nn.Module, folder: Path, *, rank: int = 4, alpha: float = 8.0,
                        b_std: float = 0.1, seed: int = 1, **lora_kwargs) -> Path:
    """A LoRA on every linear layer with lora_B scaled up (PEFT's zero init would change nothing)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base_model),
                                LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", **lora_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _quiet_gguf_logs():
    logging.getLogger("gguf").setLevel(logging.WARNING)
    yield


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", pad_vocab=12)


@pytest.fixture(scope="session")
def tiny_llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    from edge_unisd.modeling import load_base

    return make_random_adapter(load_base(tiny_llama).model, tmp_path_factory.mktemp("tiny-llama-adapter") / "a1")


@pytest.fixture(scope="session")
def tiny_qwen2_adapter(tiny_qwen2, tmp_path_factory) -> Path:
    from edge_unisd.modeling import load_base

    return make_random_adapter(load_base(tiny_qwen2).model, tmp_path_factory.mktemp("tiny-qwen2-adapter") / "a1")
