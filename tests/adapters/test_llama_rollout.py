"""The llama.cpp rollout backend (adapters/llama_rollout.py) on a tiny random llama exported to an f32 GGUF:
greedy tokens equal HF generate's with the live LoRA (on-policy), the adapter is re-applied on every call,
all rows decoded together equal rows decoded one per call, the context grows for larger calls, the
padding/mask contract matches, the trainer uses the backend, and misuse fails with a clear error."""

from __future__ import annotations

import pytest
import torch

from adapters.llama_rollout import LlamaCppRollout, RolloutBackendError, pack_rows
from edge_unisd.config import ConfigError, load_method_config
from edge_unisd.items import Item
from edge_unisd.modeling import attach_lora, load_base
from edge_unisd.rollout import generate_completions
from edge_unisd.trainer import UniSDTrainer
from edge_unisd.views import render_prompt
from tests.adapters.conftest import make_tiny_model

QUESTIONS = ["What is the capital of France?", "def square(x):", "Hello there!", "Water boils at"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder, f32 GGUF of the same weights): peaked weights (init 0.5) so greedy has no near-ties."""
    from adapters.gguf_export import write_merged_from_hf

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-llama-peaked"), "llama", init=0.5)
    gguf_path = folder.parent / "base-f32.gguf"
    write_merged_from_hf(folder, load_base(folder).model.state_dict(), gguf_path, "f32")
    return folder, gguf_path


@pytest.fixture(scope="module", params=["merged", "adapter"])
def backend(tiny, request):
    """Both ways the live LoRA reaches llama.cpp: merged into a private copy of the weights, or as an adapter."""
    folder, gguf_path = tiny
    b = LlamaCppRollout(gguf_path, load_base(folder).tokenizer, n_threads=1, lora=request.param)
    assert b.lora_mode == request.param
    yield b
    b.close()


def _randomise_lora(model, seed: int, b_std: float = 0.3) -> None:
    """PEFT's zero lora_B changes nothing: make the adapter matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)


def _peft(folder, seed: int = 1):
    loaded = load_base(folder)
    torch.manual_seed(seed)  # lora_A's init draws from the global RNG: the same model whatever ran before
    model = attach_lora(loaded.model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear")
    _randomise_lora(model, seed)
    return model, loaded.tokenizer


def _prompts(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, ({"role": "user", "content": q},)) for q in QUESTIONS]


def _greedy_pair(model, tokenizer, backend, prompts, **kw):
    hf = generate_completions(model, tokenizer, prompts, temperature=0.0, **kw)
    lc = backend.generate(model, prompts, temperature=0.0, **kw)
    return hf, lc


def _assert_same(hf, lc) -> None:
    assert torch.equal(hf.completion_ids, lc.completion_ids), (hf.completion_ids.tolist(), lc.completion_ids.tolist())
    torch.testing.assert_close(hf.completion_mask, lc.completion_mask)


# --- on-policy: the same tokens as HF generate with the live adapter ------------------------------

def test_greedy_tokens_equal_hf_generate_with_the_lora(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    hf, lc = _greedy_pair(model, tok, backend, prompts, max_new_tokens=16)
    _assert_same(hf, lc)
    with model.disable_adapter():
        base = generate_completions(model, tok, prompts, max_new_tokens=16, temperature=0.0)
    assert not torch.equal(base.completion_ids, hf.completion_ids), "the LoRA must change the output to mean anything"


def test_adapter_is_rewritten_on_every_call(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    before = backend.generate(model, prompts, max_new_tokens=12, temperature=0.0)
    _randomise_lora(model, seed=8)  # what an optimizer step does: the same modules, new values
    hf, after = _greedy_pair(model, tok, backend, prompts, max_new_tokens=12)
    assert not torch.equal(before.completion_ids, after.completion_ids)
    _assert_same(hf, after)


def test_disabled_adapter_samples_the_base(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    backend.generate(model, prompts, max_new_tokens=4, temperature=0.0)  # a LoRA is set on the context now
    with model.disable_adapter():  # the SFT path's teacher completions
        hf, lc = _greedy_pair(model, tok, backend, prompts, max_new_tokens=12)
    _assert_same(hf, lc)


def test_sampling_is_seeded(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)

    def sample(seed: int):
        return backend.generate(model, prompts, max_new_tokens=16, temperature=3.0, top_p=0.95, seed=seed)

    a, b, c = sample(3), sample(3), sample(4)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


# --- all rows in one llama_decode per step --------------------------------------------------------

def _kept(rollout) -> list[list[int]]:
    """Each row's tokens up to and including its EOS (what the mask keeps)."""
    return [row[:int(n)] for row, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(-1),
                                           strict=True)]


def test_rows_decoded_together_equal_rows_decoded_one_per_call(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    prompts += [prompts[1][:-3], list(prompts[0])]  # one row a prefix of another, one row twice
    at = _with_extra_eos(model, tok, backend, prompts)  # row 0 (and its copy) stop early
    together = backend.generate(model, prompts, max_new_tokens=10, temperature=0.0)
    alone = [_kept(backend.generate(model, [p], max_new_tokens=10, temperature=0.0))[0] for p in prompts]
    assert _kept(together) == alone
    clamped = [prompts[1], prompts[4]]  # the whole shorter prompt is shared: its last token is still decoded per row
    assert _kept(backend.generate(model, clamped, max_new_tokens=10, temperature=0.0)) == [alone[1], alone[4]]
    assert len(alone[0]) == at + 1 and len(alone[-1]) == at + 1 and max(len(r) for r in alone) == 10
    assert len({len(p) for p in prompts}) > 1


def test_context_grows_for_more_rows_and_longer_rows(tiny):
    folder, gguf_path = tiny
    model, tok = _peft(folder)
    prompts = _prompts(tok)
    b = LlamaCppRollout(gguf_path, tok, n_ctx=512, n_threads=1)
    try:
        hf, lc = _greedy_pair(model, tok, b, prompts[:2], max_new_tokens=6)
        _assert_same(hf, lc)
        rows, cells = b._ctx_rows, b._ctx_cells
        assert rows == 2 and cells < 300
        long = (prompts[2] * 6)[:300]  # past the first context's KV cells
        more = prompts + [long] + prompts[:3]  # past its sequences
        hf, lc = _greedy_pair(model, tok, b, more, max_new_tokens=6)
        _assert_same(hf, lc)
        assert b._ctx_rows == len(more) and b._ctx_cells >= len(long) + 6 * len(more)
        _assert_same(*_greedy_pair(model, tok, b, prompts[:1], max_new_tokens=6))  # smaller: reused, not shrunk
        assert b._ctx_rows == len(more)
    finally:
        b.close()
    with pytest.raises(RolloutBackendError, match="was closed"):
        b.generate(model, prompts, max_new_tokens=2)


# --- the Rollout contract: EOS, min_new_tokens, max_new_tokens ------------------------------------

def _with_extra_eos(model, tokenizer, backend, prompts) -> int:
    """Make a token greedy decoding writes at position 2 of row 0 an EOS id (and not earlier in that row)."""
    row = backend.generate(model, prompts, max_new_tokens=8, temperature=0.0).completion_ids[0].tolist()
    eos = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])
    model.base_model.model.generation_config.eos_token_id = [tokenizer.eos_token_id, eos]
    return row.index(eos)


def test_eos_stops_the_row_and_pads_after_it(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    at = _with_extra_eos(model, tok, backend, prompts)
    hf, lc = _greedy_pair(model, tok, backend, prompts, max_new_tokens=8)
    _assert_same(hf, lc)
    assert lc.completion_mask[0].tolist() == [1.0] * (at + 1) + [0.0] * (lc.completion_ids.shape[1] - at - 1)
    assert (lc.completion_ids[0, at + 1:] == tok.pad_token_id).all()


def test_min_new_tokens_suppresses_every_eos(tiny, backend):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    at = _with_extra_eos(model, tok, backend, prompts)
    eos = model.generation_config.eos_token_id
    hf, lc = _greedy_pair(model, tok, backend, prompts, max_new_tokens=8, min_new_tokens=at + 3)
    _assert_same(hf, lc)
    early = lc.completion_ids[:, :at + 3]
    assert not any((early == e).any() for e in eos)
    assert (lc.completion_mask.sum(-1) >= at + 3).all()


@pytest.mark.parametrize("max_new_tokens", [1, 3])
def test_max_new_tokens_is_respected(tiny, backend, max_new_tokens):
    model, tok = _peft(tiny[0])
    prompts = _prompts(tok)
    hf, lc = _greedy_pair(model, tok, backend, prompts, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens)
    assert lc.completion_ids.shape == (len(prompts), max_new_tokens)
    assert lc.num_tokens == len(prompts) * max_new_tokens
    _assert_same(hf, lc)


def test_pack_rows_pads_after_eos_like_the_hf_path():
    r = pack_rows([[5, 9, 2], [7, 7, 7, 7], [2]], eos_ids=[2, 9], pad_id=0)
    assert r.completion_ids.tolist() == [[5, 9, 0, 0], [7, 7, 7, 7], [2, 0, 0, 0]]
    assert r.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    empty = pack_rows([[], []], eos_ids=[2], pad_id=0)
    assert empty.completion_ids.tolist() == [[2], [2]] and empty.num_tokens == 2


# --- the trainer ----------------------------------------------------------------------------------

class _Spy:
    """Records the trainer's calls and forwards them to the real backend."""

    def __init__(self, inner: LlamaCppRollout) -> None:
        self.inner, self.calls = inner, []

    def generate(self, model, prompts, **kw):
        self.calls.append(kw)
        return self.inner.generate(model, prompts, **kw)


def _trainer_cfg(backend: str):
    return load_method_config("sd", {"rollout": {"max_new_tokens": 6, "temperature": 1.0, "backend": backend},
                                     "gradient_checkpointing": False, "lora": {"rank": 4, "alpha": 8},
                                     "optim": {"batch_size": 2, "micro_batch_size": 2}, "seed": 5})


def test_trainer_rolls_out_through_the_backend(tiny, backend):
    model, tok = _peft(tiny[0])
    items = [Item(id=f"i{i}", messages=({"role": "user", "content": q},), reference="Paris.")
             for i, q in enumerate(QUESTIONS[:2])]
    spy = _Spy(backend)
    trainer = UniSDTrainer(model, tok, _trainer_cfg("llamacpp"), total_steps=2, profile="Lives in Paris.",
                           pool=items, rollout_backend=spy)
    report = trainer.step(items)
    assert len(spy.calls) == 1 and spy.calls[0]["seed"] == 5 * 1_000_003 and spy.calls[0]["max_new_tokens"] == 6
    assert report.tokens["completion"] > 0 and report.stage_seconds["rollout"] > 0
    assert torch.isfinite(torch.tensor(report.loss))


def test_llamacpp_config_without_a_backend_is_refused(tiny):
    model, tok = _peft(tiny[0])
    with pytest.raises(ValueError, match="rollout_backend=LlamaCppRollout"):
        UniSDTrainer(model, tok, _trainer_cfg("llamacpp"), total_steps=1)


def test_unknown_backend_names_the_key():
    with pytest.raises(ConfigError, match="rollout.backend"):
        load_method_config("sd", {"rollout": {"backend": "vllm"}})


# --- clear errors ---------------------------------------------------------------------------------

def test_non_gguf_bases_are_refused(tiny, tmp_path):
    folder, _ = tiny
    tok = load_base(folder).tokenizer
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    for path, why in [(folder, "a folder, not a GGUF"), (fake, "not a GGUF file"), (tmp_path / "nope.gguf", "missing")]:
        with pytest.raises(RolloutBackendError, match=why):
            LlamaCppRollout(path, tok)


def test_missing_llama_cpp_is_a_clear_error(tiny, monkeypatch):
    import adapters.llama_runtime

    def missing():
        raise ModuleNotFoundError("No module named 'llama_cpp'")

    monkeypatch.setattr(adapters.llama_runtime, "import_llama_cpp", missing)
    with pytest.raises(RolloutBackendError, match="pip install llama-cpp-python"):
        LlamaCppRollout(tiny[1], None)


def test_wrong_model_or_too_long_prompt_is_refused(tiny, backend):
    from tests.conftest import make_tiny_llama

    model, tok = _peft(tiny[0])
    with pytest.raises(RolloutBackendError, match="build LlamaCppRollout from the GGUF"):
        backend.generate(make_tiny_llama(vocab_size=500), _prompts(tok), max_new_tokens=2)
    with pytest.raises(RolloutBackendError, match="larger n_ctx"):
        backend.generate(model, [[1] * 10], max_new_tokens=backend.n_ctx)
    most = backend._ll.llama_max_parallel_sequences()
    with pytest.raises(RolloutBackendError, match=f"at most {most} sequences"):
        backend.generate(model, [[1]] * (most + 1), max_new_tokens=2)


def test_failed_decode_is_a_clear_error(tiny, backend, monkeypatch):
    model, tok = _peft(tiny[0])
    monkeypatch.setattr(backend._ll, "llama_decode", lambda ctx, batch: 1)
    with pytest.raises(RolloutBackendError, match=r"base-f32.gguf: llama_decode failed .* code 1: no KV cache slot"):
        backend.generate(model, _prompts(tok), max_new_tokens=4)
    monkeypatch.undo()
    _assert_same(*_greedy_pair(model, tok, backend, _prompts(tok), max_new_tokens=4))  # the backend still works


# --- what llama.cpp samples from ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_q8(tiny):
    """The tiny model's weights stored as Q8_0: a quantised base, as the bundled Q4_1 one is."""
    from adapters.gguf_export import write_merged_from_hf

    folder, f32_path = tiny
    path = f32_path.parent / "base-q8_0.gguf"
    write_merged_from_hf(folder, load_base(folder).model.state_dict(), path, "q8_0")
    return path


def _tensors(path):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    return {t.name: (GGMLQuantizationType(t.tensor_type), dequantize(t.data, GGMLQuantizationType(t.tensor_type)))
            for t in GGUFReader(path).tensors}


def test_unquantised_base_is_sampled_as_it_is(tiny, tmp_path):
    from adapters.llama_rollout import rollout_weights_file

    _, f32_path = tiny
    assert rollout_weights_file(f32_path, "f16", tmp_path) == f32_path
    assert rollout_weights_file(f32_path, "base", tmp_path) == f32_path
    assert not (tmp_path / "rollout-weights").exists() or not any((tmp_path / "rollout-weights").iterdir())


def test_quantised_base_gets_an_f16_copy_of_its_values_made_once(tiny, tiny_q8, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from adapters.llama_rollout import rollout_weights_file

    copy = rollout_weights_file(tiny_q8, "f16", tmp_path)
    assert copy != tiny_q8 and copy.parent == tmp_path / "rollout-weights"
    assert (copy.stat().st_mode & 0o777) == 0o600 and (copy.parent.stat().st_mode & 0o777) == 0o700
    base, made = _tensors(tiny_q8), _tensors(copy)
    assert base.keys() == made.keys()
    for name, (qtype, values) in base.items():
        new_type, new_values = made[name]
        assert new_type == (QT.F32 if qtype == QT.F32 else QT.F16), name
        np.testing.assert_allclose(new_values, values, rtol=1e-3, atol=1e-6, err_msg=name)
    stamp = copy.stat().st_mtime_ns
    assert rollout_weights_file(tiny_q8, "f16", tmp_path) == copy and copy.stat().st_mtime_ns == stamp
    greedy = LlamaCppRollout(tiny_q8, load_base(tiny[0]).tokenizer, n_threads=1, cache_dir=tmp_path)
    try:
        assert greedy.base_gguf == copy
    finally:
        greedy.close()


def test_unknown_rollout_weights_name_the_choices(tiny, tmp_path):
    from adapters.llama_rollout import rollout_weights_file

    with pytest.raises(RolloutBackendError, match="f16, q8_0, base"):
        rollout_weights_file(tiny[1], "q4_0", tmp_path)
    with pytest.raises(ConfigError):
        load_method_config("sd", {"rollout": {"llama_weights": "q4_0"}})


def test_damaged_base_gets_an_error_naming_it(tiny, tmp_path):
    from adapters.llama_rollout import rollout_weights_file

    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(tiny[1].read_bytes()[:2000])  # cut inside the vocabulary
    with pytest.raises(RolloutBackendError, match=r"damaged\.gguf: ends at byte 2000 .*re-download or re-convert"):
        rollout_weights_file(damaged, "f16", tmp_path)


def test_q8_0_copy_is_quantised_on_request(tiny, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from adapters.llama_rollout import rollout_weights_file

    _, f32_path = tiny
    copy = rollout_weights_file(f32_path, "q8_0", tmp_path)
    base, made = _tensors(f32_path), _tensors(copy)
    for name, (_, values) in base.items():
        new_type, new_values = made[name]
        assert new_type == (QT.F32 if values.ndim == 1 else QT.Q8_0), name
        np.testing.assert_allclose(new_values, values, atol=float(np.abs(values).max()) / 100, err_msg=name)


def test_a_changed_base_file_gets_a_new_copy(tiny, tmp_path):
    """The copy is named by the base's content: a base rewritten in place is not served its old copy,
    and the old copy does not stay behind in the cache."""
    from adapters.gguf_export import write_merged_from_hf
    from adapters.llama_rollout import rollout_weights_file

    folder, _ = tiny
    base = tmp_path / "base.gguf"
    state = load_base(folder).model.state_dict()
    write_merged_from_hf(folder, state, base, "q8_0")
    first = rollout_weights_file(base, "f16", tmp_path)
    write_merged_from_hf(folder, {k: v * 2 for k, v in state.items()}, base, "q8_0")
    first_values = _tensors(first)["blk.0.ffn_up.weight"][1].tolist()
    other = rollout_weights_file(base, "q8_0", tmp_path)  # another type of the same base: not an old copy
    stranger = tmp_path / "rollout-weights" / f"base2-{'a' * 16}-f16.gguf"  # another base's copy
    stranger.touch()
    write_merged_from_hf(folder, {k: v * 2 for k, v in state.items()}, base, "q8_0")
    second = rollout_weights_file(base, "f16", tmp_path)
    assert second != first and _tensors(second)["blk.0.ffn_up.weight"][1].tolist() != first_values
    assert not first.exists() and other.is_file() and stranger.is_file()  # only the outdated f16 copy goes


# --- merged rollout weights (adapters/merged_rollout_weights.py) ----------------------------------

def _slot_values(merged, name: str) -> torch.Tensor:
    import os

    import numpy as np

    slot = merged._slots[name]
    raw = os.pread(merged._fd, int(np.prod(slot.shape)) * torch.finfo(slot.dtype).bits // 8, slot.offset)
    return torch.frombuffer(bytearray(raw), dtype=slot.dtype).reshape(slot.shape)


@pytest.fixture
def merged_copy(tiny):
    """(PEFT model with a random LoRA, MergedWeights of the tiny f32 GGUF, its ModelShape, the slots' values
    before any write); closed afterwards."""
    from adapters.gguf_export import shape_from_hf_config
    from adapters.merged_rollout_weights import MergedWeights

    folder, gguf_path = tiny
    model, _ = _peft(folder)
    merged = MergedWeights(gguf_path)
    try:
        before = {name: _slot_values(merged, name).clone() for name in merged._slots}
        yield model, merged, shape_from_hf_config(model.config.to_dict(), "tiny"), before
    finally:
        merged.close()
    assert merged.closed


def test_merged_copy_holds_what_the_merged_export_writes(merged_copy):
    """The patched tensors equal the merged GGUF export's (PEFT merge_and_unload, exporter's Q/K order)."""
    from adapters.gguf_export import to_gguf_tensors

    model, merged, shape, before = merged_copy
    assert merged.write(model, "default", shape) > 0 and not merged.holds_base
    expected = to_gguf_tensors(model.merge_and_unload().state_dict(), shape, drop_output=True, where="tiny")
    changed = 0
    for name in merged._slots:
        got = _slot_values(merged, name)
        torch.testing.assert_close(got, torch.from_numpy(expected[name]), rtol=1e-6, atol=1e-6, msg=name)
        changed += not torch.equal(got, before[name])
    assert changed == 7 * shape.n_blocks  # every adapted linear layer, nothing else


def test_merged_copy_goes_back_to_the_base(merged_copy):
    model, merged, shape, base = merged_copy
    assert merged.write(model, None, shape) == 0  # already the base: nothing to write
    merged.write(model, "default", shape)
    assert merged.write(model, None, shape) > 0 and merged.holds_base
    for name, values in base.items():
        torch.testing.assert_close(_slot_values(merged, name), values, rtol=0, atol=0, msg=name)


def test_merged_copy_follows_a_new_model(merged_copy, tiny):
    """The daemon trains a new model each round: its layers are written, not the previous model's."""
    from adapters.gguf_export import to_gguf_tensors

    first, merged, shape, _ = merged_copy
    merged.write(first, "default", shape)
    second, _ = _peft(tiny[0], seed=2)
    merged.write(second, "default", shape)
    expected = to_gguf_tensors(second.merge_and_unload().state_dict(), shape, drop_output=True, where="tiny")
    for name in merged._slots:
        torch.testing.assert_close(_slot_values(merged, name), torch.from_numpy(expected[name]), rtol=1e-6,
                                   atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT's, for these odd adapters
@pytest.mark.parametrize(("extra", "why"), [
    ({"target_modules": ["q_proj", "embed_tokens"]}, "a Embedding adapter layer"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "trains full modules"),
])
def test_what_merging_cannot_carry_is_refused(tiny, extra, why):
    """Merging only the linear layers' deltas would sample from a model the trainer is not training."""
    from peft import LoraConfig, get_peft_model

    loaded = load_base(tiny[0])
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, **extra))
    b = LlamaCppRollout(tiny[1], loaded.tokenizer, n_threads=1, lora="merged")
    try:
        with pytest.raises(RolloutBackendError, match=f"cannot merge the live adapter.*{why}.*'hf'"):
            b.generate(model, _prompts(loaded.tokenizer), max_new_tokens=2)
    finally:
        b.close()


def test_merged_rollouts_leave_no_file_behind(tiny, tmp_path):
    folder, gguf_path = tiny
    model, tok = _peft(folder)
    b = LlamaCppRollout(gguf_path, tok, n_threads=1, tmp_root=tmp_path)
    try:
        assert b.lora_mode == "merged"
        _assert_same(*_greedy_pair(model, tok, b, _prompts(tok), max_new_tokens=6))
        assert b.totals["merged_write"] > 0 and b.totals["adapter_write"] == 0
        assert list(tmp_path.iterdir()) == []  # the copy is a memfd: RAM only, gone with the process
    finally:
        b.close()


def test_auto_falls_back_to_the_adapter_when_writes_are_not_seen(tiny, monkeypatch):
    """A llama.cpp build that copies weights into its own buffers would sample stale merged weights."""
    folder, gguf_path = tiny
    model, tok = _peft(folder)
    monkeypatch.setattr(LlamaCppRollout, "_writes_reach_llama", lambda self, merged: False)
    b = LlamaCppRollout(gguf_path, tok, n_threads=1)
    try:
        assert b.lora_mode == "adapter" and b._held["merged"] is None
        _assert_same(*_greedy_pair(model, tok, b, _prompts(tok), max_new_tokens=6))
    finally:
        b.close()
    with pytest.raises(RolloutBackendError, match="does not read weights from the file mapping.*'adapter'"):
        LlamaCppRollout(gguf_path, tok, n_threads=1, lora="merged")


def test_auto_falls_back_when_llama_cpp_cannot_load_the_copy(tiny, monkeypatch):
    folder, gguf_path = tiny
    model, tok = _peft(folder)
    real_load = LlamaCppRollout._load

    def load(self, path):
        if str(path).startswith("/proc/self/fd/"):
            raise RolloutBackendError(f"{path}: llama.cpp cannot load it as a model: no /proc here")
        real_load(self, path)

    monkeypatch.setattr(LlamaCppRollout, "_load", load)
    b = LlamaCppRollout(gguf_path, tok, n_threads=1)
    try:
        assert b.lora_mode == "adapter" and b._held["merged"] is None and b._llm is not None
        _assert_same(*_greedy_pair(model, tok, b, _prompts(tok), max_new_tokens=6))
    finally:
        b.close()


def test_the_probe_sees_a_write(tiny):
    from adapters.merged_rollout_weights import MergedWeights

    folder, gguf_path = tiny
    b = LlamaCppRollout(gguf_path, load_base(folder).tokenizer, n_threads=1, lora="adapter")
    try:
        merged = MergedWeights(gguf_path)  # not what b loaded: its writes cannot reach b's model
        try:
            assert not b._writes_reach_llama(merged)
        finally:
            merged.close()
    finally:
        b.close()


def test_quantised_rollout_file_uses_the_adapter(tiny, tiny_q8, tmp_path):
    tok = load_base(tiny[0]).tokenizer
    b = LlamaCppRollout(tiny_q8, tok, n_threads=1, weights="base", cache_dir=tmp_path)
    try:
        assert b.lora_mode == "adapter"
    finally:
        b.close()
    with pytest.raises(RolloutBackendError, match="weights unavailable: .*is not an f16/bf16/f32 tensor"):
        LlamaCppRollout(tiny_q8, tok, n_threads=1, weights="base", cache_dir=tmp_path, lora="merged")
    with pytest.raises(RolloutBackendError, match="auto, merged, adapter"):
        LlamaCppRollout(tiny[1], tok, lora="fused")


# --- bf16 rollout weights (for a model that trains in bf16) ------------------------------------------

def test_auto_rollout_weights_follow_the_training_dtype(tiny, tmp_path):
    from adapters.llama_rollout import resolve_rollout_weights, rollout_weights_file

    assert resolve_rollout_weights("auto", torch.bfloat16) == "bf16"
    assert resolve_rollout_weights("auto", torch.float32) == "f16"
    assert resolve_rollout_weights("q8_0", torch.bfloat16) == "q8_0"  # an explicit choice is kept
    with pytest.raises(RolloutBackendError, match="'q4_0'.*auto, f16, bf16"):
        resolve_rollout_weights("q4_0", torch.float32)
    with pytest.raises(RolloutBackendError, match="resolve_rollout_weights"):
        rollout_weights_file(tiny[1], "auto", tmp_path)


def test_bf16_merged_copy_holds_the_merged_export_to_bf16_rounding(tiny, tmp_path):
    """The bf16 copy's adapted tensors are patched as bf16 bits, the merged export's values rounded once."""
    from adapters.gguf_export import shape_from_hf_config, to_gguf_tensors
    from adapters.llama_rollout import rollout_weights_file
    from adapters.merged_rollout_weights import MergedWeights

    folder, f32_path = tiny
    copy = rollout_weights_file(f32_path, "bf16", tmp_path)
    model, _ = _peft(folder)
    shape = shape_from_hf_config(model.config.to_dict(), "tiny")
    merged = MergedWeights(copy)
    try:
        matmul_slots = {name: slot for name, slot in merged._slots.items() if len(slot.shape) == 2}
        assert matmul_slots and all(slot.dtype == torch.bfloat16 for slot in matmul_slots.values())
        before = {name: _slot_values(merged, name).clone() for name in matmul_slots}
        merged.write(model, "default", shape)
        expected = to_gguf_tensors(model.merge_and_unload().state_dict(), shape, drop_output=True, where="tiny")
        changed = 0
        for name in matmul_slots:
            got = _slot_values(merged, name)
            torch.testing.assert_close(got, torch.from_numpy(expected[name]).to(torch.bfloat16), rtol=0, atol=0,
                                       msg=name)
            changed += not torch.equal(got, before[name])
        assert changed == 7 * shape.n_blocks
    finally:
        merged.close()


def test_bf16_rollouts_sample_the_live_lora_merged(tiny, tmp_path):
    """Greedy tokens from the bf16 copy with the LoRA merged in follow HF generate's with the LoRA, not the base's.

    bf16 rounds weights and llama.cpp's activations to 8 bits of mantissa, so a later near-tie may fall the
    other way (one row of four did at token 8 here): the first tokens of every row must agree."""
    folder, gguf_path = tiny
    model, tok = _peft(folder)
    prompts = _prompts(tok)
    b = LlamaCppRollout(gguf_path, tok, n_threads=1, weights="bf16", cache_dir=tmp_path)
    try:
        assert b.base_gguf.name.endswith("-bf16.gguf") and b.lora_mode == "merged"
        hf, lc = _greedy_pair(model, tok, b, prompts, max_new_tokens=12)
        assert b.totals["merged_write"] > 0
        assert torch.equal(hf.completion_ids[:, :6], lc.completion_ids[:, :6]), (hf.completion_ids, lc.completion_ids)
        with model.disable_adapter():
            base = b.generate(model, prompts, max_new_tokens=12, temperature=0.0)
        assert not torch.equal(base.completion_ids[:, :6], lc.completion_ids[:, :6]), "the LoRA must reach llama.cpp"
    finally:
        b.close()
