"""The EMA teacher: equals the base at step 0, moves after updates, lags the student."""

from __future__ import annotations

import pytest
import torch

from edge_unisd.modeling import attach_lora
from edge_unisd.teacher import EmaAdapter, lora_parameters, teacher_weights
from tests.conftest import make_tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k].detach() - b[k].detach()).pow(2).sum()) for k in a) ** 0.5


@pytest.fixture
def peft_model():
    model = make_tiny_llama(vocab_size=96, hidden=32)
    return attach_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear")


def test_ema_equals_base_at_step_zero_then_moves_and_lags(peft_model):
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    ema = EmaAdapter(peft_model, decay=0.8, every=1)
    with ema.active():
        torch.testing.assert_close(_logits(peft_model, ids), base)  # fresh adapter: B = 0

    student = lora_parameters(peft_model, "default")
    opt = torch.optim.SGD(list(student.values()), lr=0.5)
    distances = []
    for step in range(1, 6):
        loss = peft_model(input_ids=ids).logits[0, -1, 7]  # push one logit: moves the LoRA weights
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema_before = {k: v.detach().clone() for k, v in lora_parameters(peft_model, "ema").items()}
        assert ema.update(step)
        ema_after = lora_parameters(peft_model, "ema")
        assert _distance(ema_before, ema_after) > 0  # it moves
        distances.append(_distance(ema_after, student))
    assert all(d > 0 for d in distances)  # it lags the student
    with ema.active():
        ema_logits = _logits(peft_model, ids)
    student_logits = _logits(peft_model, ids)
    # the EMA teacher sits between the base and the student
    assert 0 < float((ema_logits - base).abs().max()) < float((student_logits - base).abs().max())


def test_ema_update_rule_and_cadence(peft_model):
    ema = EmaAdapter(peft_model, decay=0.75, every=2)
    student = lora_parameters(peft_model, "default")
    with torch.no_grad():
        for p in student.values():
            p.add_(1.0)
    before = {k: v.detach().clone() for k, v in lora_parameters(peft_model, "ema").items()}
    assert not ema.update(1)  # not a multiple of every=2
    assert _distance(before, lora_parameters(peft_model, "ema")) == 0
    assert ema.update(2)
    after = lora_parameters(peft_model, "ema")
    for k in before:
        torch.testing.assert_close(after[k], 0.75 * before[k] + 0.25 * student[k].detach())


def test_ema_is_not_trainable_and_student_stays_trainable(peft_model):
    ema = EmaAdapter(peft_model, decay=0.9)
    with ema.active():
        pass
    assert all(not p.requires_grad for p in lora_parameters(peft_model, "ema").values())
    assert all(p.requires_grad for p in lora_parameters(peft_model, "default").values())
    assert peft_model.active_adapters == ["default"]


def test_teacher_weights_select_base_live_ema(peft_model):
    ids = torch.tensor([[1, 5, 9]])
    ema = EmaAdapter(peft_model, decay=0.5)
    with torch.no_grad():
        for p in lora_parameters(peft_model, "default").values():
            p.normal_(0, 0.5)
    with peft_model.disable_adapter():
        base = _logits(peft_model, ids)
    live = _logits(peft_model, ids)
    with teacher_weights(peft_model, "base", ema):
        torch.testing.assert_close(_logits(peft_model, ids), base)
    with teacher_weights(peft_model, "live", ema):
        torch.testing.assert_close(_logits(peft_model, ids), live)
    with teacher_weights(peft_model, "ema", ema):
        ema_logits = _logits(peft_model, ids)
    assert not torch.allclose(ema_logits, live)
    with pytest.raises(ValueError):
        with teacher_weights(peft_model, "ema", None):
            pass
