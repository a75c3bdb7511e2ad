"""Teacher weights without a second model: base (adapter off), live adapter, or an EMA adapter.

EMA rule (METHOD.md), over the LoRA parameters only — the reference code's EMA skipped them, so
its "EMA teacher" stayed the base (defect 1):

    every `every` optimizer steps:  φ_ema ← β φ_ema + (1 - β) φ_student

φ_ema is a second, non-trainable PEFT adapter on the same base weights: it costs one adapter's
memory. At step 0 it equals the student's fresh adapter (B = 0), i.e. the base model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

STUDENT_ADAPTER = "default"
EMA_ADAPTER = "ema"


def lora_parameters(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA A/B matrices of one adapter, keyed by their name with the adapter name removed."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): p for name, p in model.named_parameters()
            if "lora_" in name and marker in name}


class EmaAdapter:
    """A frozen copy of the student's LoRA adapter that trails it by exponential averaging."""

    def __init__(self, model, decay: float, every: int = 1,
                 student: str = STUDENT_ADAPTER, name: str = EMA_ADAPTER) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.model, self.decay, self.every, self.student, self.name = model, decay, every, student, name
        if name not in model.peft_config:
            model.add_adapter(name, model.peft_config[student])
        model.set_adapter(student)  # add/set_adapter toggle requires_grad; the student stays trainable
        self._pairs = self._match()
        self.copy_from_student()

    def _match(self) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        student, ema = lora_parameters(self.model, self.student), lora_parameters(self.model, self.name)
        if student.keys() != ema.keys() or not student:
            raise RuntimeError("EMA adapter does not mirror the student's LoRA parameters")
        for p in ema.values():
            p.requires_grad_(False)
        return [(ema[k], student[k]) for k in sorted(student)]

    @torch.no_grad()
    def copy_from_student(self) -> None:
        for ema_p, student_p in self._pairs:
            ema_p.copy_(student_p)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Apply the EMA rule if `step` (1-based optimizer step count) is a multiple of `every`."""
        if step % self.every:
            return False
        for ema_p, student_p in self._pairs:
            ema_p.lerp_(student_p.to(ema_p.dtype), 1.0 - self.decay)  # β φ_ema + (1-β) φ_student
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().cpu().clone() for k, p in lora_parameters(self.model, self.name).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = lora_parameters(self.model, self.name)
        missing = set(params) ^ set(state)
        if missing:
            raise KeyError(f"EMA state does not match the adapter: {sorted(missing)[:3]}...")
        for k, p in params.items():
            p.copy_(state[k].to(p.device, p.dtype))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run forwards with the EMA adapter instead of the student's, then switch back."""
        self.model.set_adapter(self.name)
        try:
            yield
        finally:
            self.model.set_adapter(self.student)
            for ema_p, _ in self._pairs:  # set_adapter marks the active adapter trainable
                ema_p.requires_grad_(False)


@contextlib.contextmanager
def teacher_weights(model, kind: str, ema: EmaAdapter | None) -> Iterator[None]:
    """Context in which `model` computes with the chosen teacher weights (always under no_grad by the caller)."""
    if kind == "base":
        with model.disable_adapter():
            yield
    elif kind == "ema":
        if ema is None:
            raise ValueError("teacher='ema' needs an EmaAdapter")
        with ema.active():
            yield
    elif kind == "live":
        yield
    else:
        raise ValueError(f"unknown teacher kind {kind!r}; use base, live or ema")
