"""Check a written GGUF against the merged torch model before anyone may load it.

Three checks, all on this machine, with llama-cpp-python:
1. Next-token distributions on probe texts (chat-formatted and plain), position by position on the
   same token ids: mean KL(p_torch || p_gguf) and top-1 agreement, against a bar per quant type.
2. The chat template stored in the GGUF, rendered the way llama-cpp-python renders it
   (Jinja2ChatFormatter) and tokenised by llama.cpp, gives transformers' prompt ids.
3. Plain text tokenised by llama.cpp (with its BOS/EOS flags) gives transformers' ids.
A wrong tokenizer, lost template, or garbled/unpermuted weights fails one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bar:
    """Minimum top-1 agreement and maximum mean KL (nats) an export must meet."""

    top1_min: float
    kl_max: float


# f16 and q8_0 bars are the issue's; f32 is stricter than f16; bf16 keeps 8 mantissa bits (f16: 11):
# q8_0's top-1 bar with a KL bar 10x tighter than q8_0's (measured on SmolLM2-135M: 0.975-0.989, 0.0004).
# K-quants: loose bars that say "this is still the model, not a garbled file" (a wrong permutation or
# tokenizer gives top-1 near 0 and KL of several nats). Measured on SmolLM2-135M, base and with a strong
# random adapter (a small model is the hard case: many near-ties), worst of the two, then headroom:
#   q6_k 0.89/0.021  q5_k_m 0.84/0.11  q5_k_s 0.82/0.13  q4_k_m 0.83/0.093  q4_k_s 0.82/0.13
#   q3_k_l 0.75/0.23  q3_k_m 0.73/0.27  q3_k_s and q2_k 0.63/0.71          (top-1 / mean KL)
# On that model q8_0 itself measures top-1 0.946 and KL 0.0065 (llama.cpp's own quantiser gives the
# same numbers): it misses the q8_0 top-1 bar on near-ties, so use f16 for models that small.
BARS: dict[str, Bar] = {
    "f32": Bar(0.99, 0.002),
    "f16": Bar(0.98, 0.01),
    "bf16": Bar(0.95, 0.02),
    "q8_0": Bar(0.95, 0.03),
    "q6_k": Bar(0.85, 0.05),
    "q5_k_m": Bar(0.80, 0.20), "q5_k_s": Bar(0.78, 0.22),
    "q4_k_m": Bar(0.78, 0.20), "q4_k_s": Bar(0.76, 0.25),
    "q3_k_l": Bar(0.68, 0.40), "q3_k_m": Bar(0.68, 0.40), "q3_k_s": Bar(0.55, 1.0),
    "q2_k": Bar(0.55, 1.0),
}
# A LoRA GGUF applied at run time on a quantised base (the bundled Q4_1 file): the torch reference is
# that same base dequantised, so only llama.cpp's 8-bit activations differ. Measured on SmolLM2-135M
# with random adapters: top-1 0.943-0.964, KL 0.0045-0.006.
LORA_ON_QUANTIZED_BASE = Bar(0.92, 0.03)


def bar_for(quant: str) -> Bar:
    try:
        return BARS[quant]
    except KeyError:
        raise ValueError(f"no verification bar for quant {quant!r}; known: {', '.join(BARS)}") from None


DEFAULT_CHATS: tuple[tuple[tuple[dict[str, str], ...], str], ...] = (
    (({"role": "user", "content": "What is the capital of France? Answer in one sentence."},),
     "The capital of France is Paris."),
    (({"role": "system", "content": "You are a concise assistant."},
      {"role": "user", "content": "Write a Python function that returns the square of x."}),
     "def square(x):\n    return x * x"),
    (({"role": "user", "content": "Give me two tips for sleeping better."},),
     "1. Keep a regular schedule.\n2. Avoid screens an hour before bed."),
)
DEFAULT_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees Celsius at sea level, "
    "and 12 * 7 = 84.",
    "import numpy as np\n\ndef mean(xs):\n    return sum(xs) / len(xs)  # average\n",
    "Der Zug nach München fährt um 14:35 ab. Très bien, merci ! ✓ 😀",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Q: How many legs does a spider have?\nA: Eight.\nQ: Which planet is closest to the Sun?\nA:",
    "To make pancakes, whisk two eggs with a cup of milk, add flour and a pinch of salt, then",
)


@dataclass
class VerifyReport:
    """What verification measured and whether it passed; `to_dict` is what the CLI prints and meta stores."""

    gguf: str
    quant: str
    bar: Bar
    mean_kl: float
    max_kl: float
    top1: float
    n_positions: int
    n_probes: int
    template_ok: bool
    tokenizer_ok: bool
    lora: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def summary(self) -> str:
        return (f"mean KL {self.mean_kl:.5f} (bar <= {self.bar.kl_max}), top-1 {self.top1:.3f} "
                f"(bar >= {self.bar.top1_min}) over {self.n_positions} positions of {self.n_probes} probes; "
                f"chat template {'ok' if self.template_ok else 'MISMATCH'}, "
                f"tokenizer {'ok' if self.tokenizer_ok else 'MISMATCH'}")


# --- pure comparison ----------------------------------------------------------------------------

def compare_logits(ref_logits_T_V: np.ndarray, test_logits_T_V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position KL(p_ref || p_test) and top-1 agreement (1.0/0.0). Float64 inside."""
    ref = torch.from_numpy(np.asarray(ref_logits_T_V, dtype=np.float64))
    test = torch.from_numpy(np.asarray(test_logits_T_V, dtype=np.float64))
    lp_ref, lp_test = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)  # (T, V)
    kl_T = (lp_ref.exp() * (lp_ref - lp_test)).sum(-1).clamp_min(0.0)
    top1_T = (ref.argmax(-1) == test.argmax(-1)).double()
    return kl_T.numpy(), top1_T.numpy()


# --- probes -------------------------------------------------------------------------------------

def _ids(x) -> list[int]:
    """apply_chat_template / encode return a list or a BatchEncoding depending on the version."""
    if hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(i) for i in x]


def probe_ids(tokenizer, chats=DEFAULT_CHATS, texts=DEFAULT_TEXTS) -> list[list[int]]:
    """Token ids of every probe: each chat prompt (template + generation prompt) followed by an answer,
    and each plain text with the tokenizer's own special tokens."""
    probes: list[list[int]] = []
    if getattr(tokenizer, "chat_template", None):
        for messages, answer in chats:
            prompt = _ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))
            probes.append(prompt + _ids(tokenizer.encode(answer, add_special_tokens=False)))
    for text in texts:
        probes.append(_ids(tokenizer.encode(text, add_special_tokens=True)))
    return [p for p in probes if p]


@torch.no_grad()
def torch_logits(model: torch.nn.Module, ids: Sequence[int]) -> np.ndarray:
    device = next(model.parameters()).device
    out = model(torch.tensor([list(ids)], device=device))
    return out.logits[0].float().cpu().numpy()  # (T, V)


def open_llama(gguf_path: Path, *, n_ctx: int, lora_path: Path | None = None, n_threads: int | None = None):
    """A llama.cpp context that keeps the logits of every position."""
    from adapters.llama_runtime import import_llama_cpp

    llama_cpp = import_llama_cpp()
    n_ctx = max(64, n_ctx)
    n_threads = n_threads or polite_threads()  # batch threads too: their default is every core
    return llama_cpp.Llama(model_path=str(gguf_path), lora_path=str(lora_path) if lora_path else None,
                           logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=n_threads, n_threads_batch=n_threads, verbose=False)


def llama_logits(llm, ids: Sequence[int]) -> np.ndarray:
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


# --- tokenizer and template ---------------------------------------------------------------------

SAMPLE_CHAT = (
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi! What's 2+2? Also: naïve café, 123456, <b>bold</b>\n\n  indented."},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Thanks — and 10/3?"},
)
SAMPLE_TEXT = "Hello world! It's 2024-06-01; numbers 1234567 and unicode: naïve café Привет 你好 🙂\n\tTabs."


def check_chat_template(llm, tokenizer, messages=SAMPLE_CHAT) -> tuple[bool, str]:
    """The GGUF's own chat template, rendered as llama-cpp-python does and tokenised by llama.cpp,
    must give the ids transformers gives for the same chat."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    hf_template = getattr(tokenizer, "chat_template", None)
    if not hf_template:
        return template is None, "no chat template in transformers' tokenizer"
    if not template:
        return False, "the GGUF has no tokenizer.chat_template"
    model = llm._model
    bos = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
    eos = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
    rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)(
        messages=list(messages)).prompt
    got = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
    want = _ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))
    return _same_ids("chat prompt", got, want)


def check_tokenizer(llm, tokenizer, text: str = SAMPLE_TEXT) -> tuple[bool, str]:
    """Plain text with special tokens added by each side's own rules (BOS/EOS flags)."""
    got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    want = _ids(tokenizer.encode(text, add_special_tokens=True))
    return _same_ids("plain-text", got, want)


def _same_ids(what: str, got: list[int], want: list[int]) -> tuple[bool, str]:
    if got == want:
        return True, "ok"
    i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return False, f"{what} ids differ at position {i}: llama.cpp {got[i:i + 5]} vs transformers {want[i:i + 5]}"


# --- the whole verification ---------------------------------------------------------------------

def verify_gguf(gguf_path: str | Path, model: torch.nn.Module, tokenizer, quant: str, *,
                lora_path: str | Path | None = None, probes: list[list[int]] | None = None,
                bar: Bar | None = None, n_threads: int | None = None) -> VerifyReport:
    """Compare llama.cpp on `gguf_path` (plus `lora_path` if given) with the torch `model` (the merged one)."""
    gguf_path = Path(gguf_path)
    bar = bar or bar_for(quant)
    probes = probes if probes is not None else probe_ids(tokenizer)
    n_threads = n_threads or polite_threads()
    llm = open_llama(gguf_path, n_ctx=max(len(p) for p in probes) + 8,
                     lora_path=Path(lora_path) if lora_path else None, n_threads=n_threads)
    try:
        with _torch_threads(n_threads):
            kl, top = _probe_divergence(model, llm, probes)
            template_ok, template_msg = check_chat_template(llm, tokenizer)
            tokenizer_ok, tokenizer_msg = check_tokenizer(llm, tokenizer)
    finally:
        llm.close()
    report = VerifyReport(gguf=str(gguf_path), quant=quant, bar=bar, mean_kl=float(kl.mean()),
                          max_kl=float(kl.max()), top1=float(top.mean()), n_positions=int(kl.size),
                          n_probes=len(probes), template_ok=template_ok, tokenizer_ok=tokenizer_ok,
                          lora=str(lora_path) if lora_path else None)
    if not np.isfinite(report.mean_kl) or report.mean_kl > bar.kl_max:
        report.problems.append(f"mean KL {report.mean_kl:.5f} is above the {quant} bar {bar.kl_max}")
    if report.top1 < bar.top1_min:
        report.problems.append(f"top-1 agreement {report.top1:.3f} is below the {quant} bar {bar.top1_min}")
    if not template_ok:
        report.problems.append(f"chat template: {template_msg}")
    if not tokenizer_ok:
        report.problems.append(f"tokenizer: {tokenizer_msg}")
    log.info("verified %s: %s", gguf_path.name, report.summary())
    return report


def _probe_divergence(model: torch.nn.Module, llm, probes: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-position KL and top-1 agreement over all probes; a context shared by two probes (e.g. a
    template's default system prompt) counts once."""
    kls, tops = [], []
    seen: set[tuple[int, ...]] = set()
    for ids in probes:
        kl_T, top_T = compare_logits(torch_logits(model, ids), llama_logits(llm, ids))
        fresh_T = np.array([tuple(ids[: t + 1]) not in seen for t in range(len(ids))])
        seen.update(tuple(ids[: t + 1]) for t in range(len(ids)))
        kls.append(kl_T[fresh_T])
        tops.append(top_T[fresh_T])
    return np.concatenate(kls), np.concatenate(tops)


def polite_threads() -> int:
    """Half the cores: verification runs beside the user's work."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread pool spins badly when the cores are busy (measured: a forward 10x slower with
    2 threads than with 1 on 2 loaded cores), so the few verification forwards use the same small count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
