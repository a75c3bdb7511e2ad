import math
import random
from datetime import datetime, timedelta

import pytest

from budgets.cost_model import CostModel
from budgets.planner import Candidate, RoundPlan, most_uncertain, plan_round

# Per completion token: cheap path 0.03 s; one view 0.005 s. Per step: 0.5 s.
CM = CostModel(per_token={"rollout": 0.02, "teacher": 0.004, "student": 0.006, "view": 0.005, "other": 0.0},
               per_step={"optimizer": 0.4, "ema": 0.1})
T0 = datetime(2024, 1, 1)
KW = dict(batch_size=4, K=3, completion_tokens=50)  # cheap item 1.5 s, views for one item 0.75 s


def pool(n_new=8, n_old=8, seed=0):
    rng = random.Random(seed)
    new = [Candidate(f"n{i}", True, uncertainty=None) for i in range(n_new)]
    old = [Candidate(f"o{i}", False, uncertainty=rng.random(),
                     last_trained=T0 + timedelta(hours=rng.randrange(1000))) for i in range(n_old)]
    return new + old


def test_new_first_then_least_recently_trained_replay():
    cands = [Candidate("o_recent", False, 0.1, T0 + timedelta(days=5)), Candidate("n1", True),
             Candidate("o_never", False, 0.1, None), Candidate("o_old", False, 0.1, T0),
             Candidate("n2", True),
             Candidate("o_mid", False, 0.1, T0 + timedelta(days=2))]
    plan = plan_round(cands, 1e6, CM, replay_share=0.5, **KW)
    assert plan.item_ids == ["n1", "n2", "o_never", "o_old"]
    assert (plan.n_new, plan.n_replay) == (2, 2)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.25, 0.5])
def test_replay_share_is_respected_when_the_budget_binds(share):
    cands = pool(n_new=100, n_old=100)
    plan = plan_round(cands, 60.0, CM, replay_share=share, **KW)
    n = len(plan.item_ids)
    assert 20 <= n < 200  # the budget, not the pool, limits the round
    assert plan.n_replay == round(share * n)
    assert all(i.startswith("n") for i in plan.item_ids[:plan.n_new])
    assert all(i.startswith("o") for i in plan.item_ids[plan.n_new:])


def test_replay_share_is_relative_to_the_new_items_when_all_fit():
    plan = plan_round(pool(n_new=6, n_old=50), 1e6, CM, replay_share=0.25, **KW)
    assert (plan.n_new, plan.n_replay) == (6, 2)


def test_views_go_to_the_most_uncertain_in_order_unknown_last():
    cands = [Candidate("a", True, 0.2), Candidate("b", True, None), Candidate("c", True, 0.9),
             Candidate("d", True, 0.5), Candidate("e", True, float("nan"))]
    plan = plan_round(cands, 1e6, CM, **KW)
    assert plan.view_item_ids == ["c", "d", "a", "b", "e"]
    cheap = CM.predict(5, 50, 0, 3, 2).seconds
    two_views = plan_round(cands, cheap + 2 * 0.75 + 1e-9, CM, **KW)
    assert two_views.view_item_ids == ["c", "d"]


def test_more_budget_buys_views_for_more_items_as_a_growing_prefix():
    cands = pool(n_new=0, n_old=12)  # all old, uncertainties known
    cands = [Candidate(c.id, True, c.uncertainty) for c in cands]
    order = most_uncertain([c.id for c in cands], {c.id: c.uncertainty for c in cands}, 12)
    cheap = CM.predict(12, 50, 0, 3, 3).seconds
    prev = -1
    for extra in [0, 0.5, 0.8, 2.0, 4.0, 8.9, 100]:
        plan = plan_round(cands, cheap + extra, CM, **KW)
        assert len(plan.item_ids) == 12
        assert plan.view_item_ids == order[:len(plan.view_item_ids)]
        assert len(plan.view_item_ids) >= prev
        assert len(plan.view_item_ids) == min(12, math.floor(extra / 0.75))
        prev = len(plan.view_item_ids)


def test_no_budget_left_for_views_routes_none():
    cands = pool(n_new=40, n_old=0)
    plan = plan_round(cands, 30.0, CM, **KW)  # not even every item's cheap path fits
    assert 0 < len(plan.item_ids) < 40 and plan.view_item_ids == []
    cheap = CM.predict(8, 50, 0, 3, 2).seconds
    exact = plan_round(pool(n_new=8, n_old=0), cheap, CM, **KW)
    assert len(exact.item_ids) == 8 and exact.view_item_ids == []
    assert plan_round(pool(), 1e6, CM, **{**KW, "K": 0}).view_item_ids == []


def test_zero_or_tiny_budget_plans_nothing_and_says_why():
    for budget in (0.0, -5.0, 1.0):
        plan = plan_round(pool(), budget, CM, **KW)
        assert plan.item_ids == [] and plan.steps == 0 and plan.predicted_seconds == 0
        assert "less than one item" in plan.summary()
    assert "no candidates" in plan_round([], 100, CM, **KW).summary()


def test_never_over_budget_randomised():
    rng = random.Random(1234)
    for trial in range(300):
        cands = pool(n_new=rng.randrange(0, 30), n_old=rng.randrange(0, 30), seed=trial)
        budget = rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 60), rng.uniform(0, 500)])
        kw = dict(batch_size=rng.randrange(1, 9), K=rng.randrange(0, 5),
                  completion_tokens=rng.uniform(1, 200), replay_share=rng.choice([0.0, 0.25, 0.6]),
                  max_items=rng.choice([None, rng.randrange(0, 20)]))
        plan = plan_round(cands, budget, CM, **kw)
        assert plan.predicted_seconds <= budget or not plan.item_ids
        assert set(plan.view_item_ids) <= set(plan.item_ids)
        assert len(set(plan.item_ids)) == len(plan.item_ids)
        assert plan.steps == math.ceil(len(plan.item_ids) / kw["batch_size"])
        if kw["max_items"] is not None:
            assert len(plan.item_ids) <= kw["max_items"]
        again = CM.predict(len(plan.item_ids), kw["completion_tokens"], len(plan.view_item_ids), kw["K"],
                           plan.steps)
        assert again.seconds == pytest.approx(plan.predicted_seconds)
        # Maximal: one more view would not have fitted.
        if plan.item_ids and kw["K"] and len(plan.view_item_ids) < len(plan.item_ids):
            more = CM.predict(len(plan.item_ids), kw["completion_tokens"], len(plan.view_item_ids) + 1,
                              kw["K"], plan.steps).seconds
            assert more > budget


def test_memory_ceiling_lowers_the_batch_size():
    plan = plan_round(pool(), 1e6, CM, memory_ceiling_bytes=10_000, bytes_per_item=3_000, **KW)
    assert plan.batch_size == 3 and plan.steps == math.ceil(len(plan.item_ids) / 3)
    none = plan_round(pool(), 1e6, CM, memory_ceiling_bytes=1_000, bytes_per_item=3_000, **KW)
    assert none.item_ids == [] and "memory ceiling" in none.note


def test_summary_reads_like_a_log_line():
    plan = plan_round(pool(n_new=6, n_old=6), 20.0, CM, **KW)
    text = plan.summary()
    assert f"{len(plan.item_ids)} items ({plan.n_new} new, {plan.n_replay} replay)" in text
    assert "of 20.0s budget" in text and "rollout" in text
    assert isinstance(plan, RoundPlan)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(replay_share=1.0), "replay_share"),
    (dict(batch_size=0), "batch_size"),
    (dict(completion_tokens=0), "completion_tokens"),
    (dict(memory_ceiling_bytes=10), "both"),
])
def test_bad_arguments_are_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_round(pool(), 10, CM, **{**KW, **kw})


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match="'x'"):
        plan_round([Candidate("x", True), Candidate("x", False)], 10, CM, **KW)
