"""Prompt views, rollout masks and padding: the plumbing every loss term stands on."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from edge_unisd.items import Item
from edge_unisd.rollout import (
    completion_mask_from_ids,
    generate_completions,
    inverse_cdf_draw,
    left_pad,
    pack_completions,
    sample_next_tokens,
    warp_logits,
)
from edge_unisd.views import (
    ViewBuilder,
    embed_texts,
    induced_guideline,
    negative_context,
    primary_context,
    render_prompt,
    token_idf,
)

PROFILE = "Name: Maren.\nDog: Biscuit.\nCity: Gothenburg."
POOL = [
    Item(id="a", messages=({"role": "user", "content": "What is my dog called?"},), reference="Biscuit."),
    Item(id="b", messages=({"role": "user", "content": "Remind me of my dog's name."},), reference="It's Biscuit."),
    Item(id="c", messages=({"role": "user", "content": "Which city do I live in?"},), reference="Gothenburg."),
    Item(id="d", messages=({"role": "user", "content": "Where is my home town?"},), reference="Gothenburg, Sweden."),
    Item(id="e", messages=({"role": "user", "content": "Suggest a lunch."},), reference="A lentil salad.",
         rejected="A steak sandwich."),
]


def test_student_and_teacher_prompts_differ_only_by_the_context(tokenizer):
    item = POOL[0]
    student = render_prompt(tokenizer, item.messages)
    teacher = render_prompt(tokenizer, item.messages, primary_context(item, PROFILE))
    s_text, t_text = tokenizer.decode(student), tokenizer.decode(teacher)
    context = primary_context(item, PROFILE)
    assert context in t_text and "Biscuit" not in s_text
    assert t_text.replace(f"{context}\n\n---\n\n", "") == s_text  # remove the context block: the same prompt
    assert student[-3:] == teacher[-3:]  # both end by opening the assistant turn


def test_primary_context_holds_profile_item_context_and_reference():
    item = Item(id="x", messages=({"role": "user", "content": "Q"},), context="Email: lunch moved to 13:00",
                reference="13:00.")
    ctx = primary_context(item, PROFILE)
    assert "Biscuit" in ctx and "lunch moved" in ctx and "13:00." in ctx
    assert primary_context(Item(id="y", messages=({"role": "user", "content": "Q"},)), None) is None


def test_auxiliary_views_never_show_the_items_own_reference_and_are_deterministic(tokenizer):
    texts = [it.prompt_text for it in POOL]
    emb = embed_texts(tokenizer, texts, token_idf(tokenizer, texts))
    builder = ViewBuilder(pool=POOL, profile=PROFILE, kinds=["retrieval", "random", "induced"], num_views=3,
                          examples_per_view=1, seed=7, pool_embeddings=emb)
    for j, item in enumerate(POOL):
        views = builder.auxiliary_contexts(item, emb[j])
        assert len(views) == 3
        assert all(f"A: {item.reference}" not in v for v in views)
        assert views == builder.auxiliary_contexts(item, emb[j])  # same seed, same views
    assert builder.auxiliary_contexts(POOL[0], emb[0])[2] == induced_guideline(PROFILE)


def test_retrieval_finds_items_about_the_same_thing(tokenizer):
    """Over the sample user's history, a question about the dog retrieves other questions about the dog."""
    from edge_unisd.sample_data import load_sample_items

    pool = [it for it in load_sample_items() if it.reference]
    texts = [it.prompt_text for it in pool]
    emb = embed_texts(tokenizer, texts, token_idf(tokenizer, texts))
    builder = ViewBuilder(pool=pool, profile=PROFILE, kinds=["retrieval"], num_views=1, examples_per_view=2,
                          seed=0, pool_embeddings=emb)
    query = Item(id="q", messages=({"role": "user", "content": "What breed is my dog?"},))
    q_emb = embed_texts(tokenizer, [query.prompt_text], token_idf(tokenizer, texts))[0]
    shown = builder.auxiliary_contexts(query, q_emb)[0]
    assert shown.count("dog") + shown.count("Biscuit") >= 2, shown


def test_negative_view_uses_the_rejected_answer():
    assert "A steak sandwich." in negative_context(POOL[4])
    assert negative_context(POOL[0]) is None


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 6, 2, 9, 2], [2, 7, 7, 7, 7], [5, 5, 5, 5, 5]])
    mask = completion_mask_from_ids(ids, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_left_pad_and_pack_completions():
    ids, attn = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    packed = pack_completions([[7, 8], [9]], pad_id=0, eos_id=2)
    assert packed.completion_ids.tolist() == [[7, 8, 2], [9, 2, 0]]
    assert packed.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_rollout_is_batched_seeded_and_masked(tokenizer, tiny_model):
    prompts = [render_prompt(tokenizer, it.messages) for it in POOL[:3]]
    a = generate_completions(tiny_model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    b = generate_completions(tiny_model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a.completion_ids.shape[0] == 3 and a.completion_ids.shape[1] <= 6
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, completion_mask_from_ids(a.completion_ids, [2]))
    forced = generate_completions(tiny_model, tokenizer, prompts, max_new_tokens=5, min_new_tokens=5, seed=1)
    assert forced.completion_ids.shape[1] == 5 and forced.num_tokens >= 3 * 4


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)])
def test_warped_logits_equal_hf_generates_processors(temperature, top_p):
    """The llama.cpp backend samples from these logits: they must be HF generate's, ban included."""
    logits_R_V = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    hf = logits_R_V.clone()
    hf[:, [2, 7]] = float("-inf")  # what MinNewTokensLengthLogitsProcessor does to the EOS ids
    hf = TemperatureLogitsWarper(temperature)(ids, hf)
    if top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(ids, hf)
    ours = warp_logits(logits_R_V, temperature=temperature, top_p=top_p, banned=[2, 7])
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    assert torch.allclose(ours[~torch.isinf(ours)], hf[~torch.isinf(hf)])
    assert (ours > float("-inf")).any(-1).all()  # the most likely allowed token always stays


def test_sampled_tokens_follow_the_warped_distribution():
    logits_V = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    rows = 40_000
    draws = sample_next_tokens(logits_V.expand(rows, -1), temperature=0.8, top_p=0.95, banned=[4],
                               generator=torch.Generator().manual_seed(1))
    expected = warp_logits(logits_V[None], temperature=0.8, top_p=0.95, banned=[4]).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=5).float() / rows
    assert freq[4] == 0 and freq[expected == 0].sum() == 0  # banned and outside the nucleus: never drawn
    assert torch.allclose(freq, expected, atol=0.01)


def test_sampling_is_seeded_and_greedy_skips_banned_ids():
    logits_R_V = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))

    def draw(seed: int) -> torch.Tensor:
        return sample_next_tokens(logits_R_V, temperature=2.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    best = logits_R_V.argmax(-1)
    greedy = sample_next_tokens(logits_R_V, temperature=0.0, banned=best[:1].tolist())
    assert not (greedy == best[0]).any()
    assert torch.equal(greedy[best != best[0]], best[best != best[0]])
    with pytest.raises(ValueError, match="temperature"):
        warp_logits(logits_R_V, temperature=0.0)


def test_inverse_cdf_draw_is_the_first_entry_past_u_of_the_mass_and_never_a_zero_weight():
    weights_R_V = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.5, 0.0, 0.0, 1.5, 0.0],
                                [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    for u in [0.0, 1e-9, 0.1, 0.2, 0.2000001, 0.5, 0.7, 0.9, 0.999, 1.0 - 1e-15]:
        u_R = torch.full((3,), u, dtype=torch.float64)
        cdf_R_V = weights_R_V.double().cumsum(-1)
        expected = torch.searchsorted(cdf_R_V, (u_R * cdf_R_V[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        for block in (4, 3, 1024):  # blocks that split the row unevenly, and one larger than the row
            drawn = inverse_cdf_draw(weights_R_V, u_R, block=block)
            assert torch.equal(drawn, expected.clamp(max=9)), (u, block)
            assert (weights_R_V.gather(-1, drawn[:, None]) > 0).all()


def test_a_row_with_nothing_to_sample_is_a_clear_error():
    logits_R_V = torch.randn(3, 20)
    logits_R_V[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample_next_tokens(logits_R_V, temperature=1.0)
    with pytest.raises(ValueError, match="every token banned"):
        sample_next_tokens(torch.randn(2, 3), temperature=1.0, banned=[0, 1, 2])
