"""Workload shapes (ISL/OSL), named presets and prompt building.

A workload says how long prompts are (ISL, input sequence length, in tokens), how many tokens each
request must generate (OSL), and how the prompts are made. Lengths are fixed or drawn from a
distribution. Prompts are random text built from the model's own tokenizer so that a prompt of N
tokens really is N tokens for that model; without a tokenizer a word-based fallback is used and
the prompt lengths are approximate (the server's usage counts are recorded either way).

All prompts of a level are built *before* the level starts, so no tokenization happens on the
load generator's event loop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from widep.errors import UserError, did_you_mean

_STRICT = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

DistKind = Literal["fixed", "uniform", "normal", "lognormal"]
DIST_KINDS: tuple[str, ...] = ("fixed", "uniform", "normal", "lognormal")


class LengthSpec(BaseModel):
    """A sequence length in tokens: fixed, or drawn per request from a distribution."""

    model_config = _STRICT

    distribution: DistKind = "fixed"
    """How lengths vary between requests."""
    mean: int = Field(ge=1)
    """Mean length in tokens (the fixed value for ``fixed``; the midpoint for ``uniform``)."""
    std: float = Field(0.0, ge=0)
    """Standard deviation in tokens (``normal`` and ``lognormal``)."""
    min: int = Field(1, ge=1)
    """Smallest length drawn; draws below are clipped up to it."""
    max: int | None = Field(None, ge=1)
    """Largest length drawn; draws above are clipped down to it (None: no upper bound)."""

    @model_validator(mode="after")
    def _check(self) -> LengthSpec:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max must be >= min. Given: min={self.min}, max={self.max}")
        if self.distribution in ("normal", "lognormal") and self.std <= 0:
            raise ValueError(
                f"{self.distribution} needs std > 0. Given: std={self.std}. "
                "Valid: a positive number of tokens, or distribution 'fixed'"
            )
        if self.distribution == "uniform" and self.max is None:
            raise ValueError("uniform needs min and max. Given: max=None")
        return self

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` integer lengths drawn from this distribution, clipped to [min, max]."""
        if self.distribution == "fixed":
            out = np.full(n, self.mean, dtype=np.int64)
        elif self.distribution == "uniform":
            out = rng.integers(self.min, int(self.max) + 1, size=n)
        elif self.distribution == "normal":
            out = np.rint(rng.normal(self.mean, self.std, size=n))
        else:  # lognormal with the given mean and std of the *lengths*
            sigma2 = math.log1p((self.std / self.mean) ** 2)
            mu = math.log(self.mean) - sigma2 / 2
            out = np.rint(rng.lognormal(mu, math.sqrt(sigma2), size=n))
        hi = self.max if self.max is not None else np.iinfo(np.int64).max
        return np.clip(out, self.min, hi).astype(np.int64)

    @property
    def upper(self) -> int:
        """The longest length this spec can produce (for max_tokens / model-length checks)."""
        if self.max is not None:
            return self.max
        if self.distribution == "fixed":
            return self.mean
        return int(self.mean + 6 * self.std)

    def describe(self) -> str:
        """Short human form, the same syntax :func:`parse_length` accepts."""
        if self.distribution == "fixed":
            return str(self.mean)
        if self.distribution == "uniform":
            return f"uniform:{self.min}-{self.max}"
        return f"{self.distribution}:{self.mean},{self.std:g}"


_LEN_SYNTAX = (
    "N (fixed), uniform:LO-HI, normal:MEAN,STD, lognormal:MEAN,STD (optionally ',MIN,MAX' after normal/lognormal)"
)


def parse_length(text: str, *, field: str = "--isl") -> LengthSpec:
    """Parse a length option: ``1000``, ``uniform:800-1200``, ``normal:1000,100[,MIN,MAX]``,
    ``lognormal:1000,300[,MIN,MAX]``."""
    raw = text.strip()
    try:
        if re.fullmatch(r"\d+", raw):
            return LengthSpec(distribution="fixed", mean=int(raw))
        kind, _, rest = raw.partition(":")
        kind = kind.strip().lower()
        if kind not in DIST_KINDS or not rest:
            raise UserError(
                f"{field} is not a length. Given: {text!r}. Valid: {_LEN_SYNTAX}." + did_you_mean(kind, DIST_KINDS)
            )
        if kind == "uniform":
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", rest)
            if not m:
                raise UserError(f"{field}: uniform needs LO-HI. Given: {text!r}. Valid: uniform:800-1200")
            lo, hi = int(m.group(1)), int(m.group(2))
            return LengthSpec(distribution="uniform", mean=(lo + hi) // 2, min=max(lo, 1), max=hi)
        if kind == "fixed":
            return LengthSpec(distribution="fixed", mean=int(rest))
        parts = [p.strip() for p in rest.split(",")]
        if len(parts) not in (2, 4):
            raise UserError(
                f"{field}: {kind} needs MEAN,STD or MEAN,STD,MIN,MAX. Given: {text!r}. Valid: {kind}:1000,100"
            )
        mean, std = int(float(parts[0])), float(parts[1])
        extra: dict[str, Any] = {}
        if len(parts) == 4:
            extra = {"min": int(parts[2]), "max": int(parts[3])}
        return LengthSpec(distribution=kind, mean=mean, std=std, **extra)  # type: ignore[arg-type]
    except UserError:
        raise
    except (ValueError, TypeError) as err:  # pydantic ValidationError is a ValueError
        raise UserError(
            f"{field} is not a valid length. Given: {text!r}. Valid: {_LEN_SYNTAX}. ({_first_line(err)})"
        ) from None


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # pydantic puts the useful sentence on the second line
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)


@dataclass(frozen=True)
class ShapePreset:
    """A named ISL/OSL shape."""

    name: str
    isl: int
    osl: int
    source: str


# Named shapes. The 10:1 and 100:1 ratios are the llm-d v0.2 blog's "representative workload shapes";
# the absolute lengths of those runs are not published, so 10:1 uses llm-d-benchmark's
# pd-disaggregation experiment (ISL 10000 / OSL 1000) and 100:1 keeps its 10k input.
PRESETS: dict[str, ShapePreset] = {
    "10:1": ShapePreset("10:1", 10000, 1000, "llm-d-benchmark pd-disaggregation.yaml (ISL 10000/OSL 1000)"),
    "100:1": ShapePreset("100:1", 10000, 100, "llm-d v0.2 blog ratio 100:1 with the same 10k input"),
    "1k:100": ShapePreset("1k:100", 1000, 100, "10:1 at 1k input (quick sweeps)"),
    "2k:2k": ShapePreset("2k:2k", 2000, 2000, "llm-d wide-EP guide inference-perf profile (2000/2000)"),
    "5k:250": ShapePreset("5k:250", 5000, 250, "llm-d wide-EP report on 16 H200 (5000/250)"),
}


def preset(name: str) -> ShapePreset:
    """Look up a named shape, with a clear error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(
            f"--shape is not a known preset. Given: {name!r}. Valid: {', '.join(PRESETS)}."
            + did_you_mean(name, list(PRESETS))
        ) from None


class WorkloadSpec(BaseModel):
    """What each request of a sweep looks like."""

    model_config = _STRICT

    isl: LengthSpec
    """Input (prompt) length in tokens."""
    osl: LengthSpec
    """Output length in tokens (sent as max_tokens; with ignore_eos the server generates exactly that)."""
    ignore_eos: bool = True
    """Ask the server to ignore end-of-sequence so output lengths hold (vLLM's ``ignore_eos``)."""
    seed: int = 0
    """Seed for lengths and prompt text; each level derives its own stream from it."""
    tokenizer: str | None = None
    """Local tokenizer directory (transformers AutoTokenizer); None uses the word fallback."""
    shape: str | None = None
    """The preset name this workload came from, if any."""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """Extra JSON fields merged into every request body (e.g. temperature)."""


# --------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request's input: its text, its length as counted here, and max_tokens to ask for."""

    text: str
    input_tokens: int
    output_tokens: int


# Common short English words: the fallback when no tokenizer is available. Most of these are one
# token in BPE vocabularies of modern LLMs, so N words is close to N tokens.
_FALLBACK_WORDS = (
    "the of and to in is was for that on as with by it at from his an were are which this be or "
    "has had not but one all their they new more first its after who two also other been time "
    "can into when would there her only some could these city may about over most many year such "
    "made where through then up world out three so used them part while before between work well "
    "known both under since during later said him state each any like because found day small "
    "same war film team game life area four left high long name great early days end life show "
    "family group line home number back second under place best run open water way like set case "
    "top old hand power side order form field music book road light point river house club good "
    "best own five near land area"
).split()


class PromptBuilder:
    """Builds random prompts of exact token length with a tokenizer, or approximate without one.

    With a tokenizer the builder picks vocabulary entries that decode to a single space-led word
    and re-encode to themselves; a prompt of N such words re-encodes to N tokens for byte-level
    BPE and SentencePiece tokenizers alike. Every prompt is checked by encoding it; a prompt that
    comes out longer or shorter is trimmed or extended until it matches (or the closest is kept).
    """

    def __init__(self, tokenizer_dir: str | None) -> None:
        self.tokenizer_dir = tokenizer_dir
        self._tok: Any = None
        self.note: str | None = None
        if tokenizer_dir is None:
            self._words = list(_FALLBACK_WORDS)
            self.note = (
                "no --tokenizer given: prompts are built from English words (about one token each); "
                "input lengths are approximate, the server's usage counts are what is reported"
            )
            return
        path = Path(tokenizer_dir)
        if not path.is_dir():
            raise UserError(
                f"--tokenizer must be a local directory with tokenizer files. Given: {tokenizer_dir!r}. "
                "Valid: a directory holding tokenizer.json / tokenizer_config.json (e.g. the model directory)"
            )
        try:
            from transformers import AutoTokenizer  # imported only when a tokenizer is used
        except ImportError as err:  # pragma: no cover - transformers comes with vLLM
            raise UserError(f"--tokenizer needs the transformers package ({err}). Given: {tokenizer_dir!r}") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # many loader errors; report them plainly
            raise UserError(
                f"--tokenizer could not be loaded by transformers.AutoTokenizer. Given: {tokenizer_dir!r}. Error: {err}"
            ) from None
        self._words = self._single_token_words()
        if len(self._words) < 50:
            raise UserError(
                f"--tokenizer has too few plain word tokens to build random prompts "
                f"(found {len(self._words)}). Given: {tokenizer_dir!r}"
            )

    @property
    def exact(self) -> bool:
        """True when prompt lengths are measured with the model's tokenizer."""
        return self._tok is not None

    def count(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens), or words without a tokenizer."""
        if self._tok is None:
            return len(text.split())
        return len(self._tok.encode(text, add_special_tokens=False))

    def _single_token_words(self) -> list[str]:
        tok = self._tok
        special = set(getattr(tok, "all_special_ids", []) or [])
        words: list[str] = []
        vocab = tok.get_vocab()
        pattern = re.compile(r"^ [a-z]{2,12}$")
        for tid in sorted(vocab.values()):
            if tid in special:
                continue
            s = tok.decode([tid])
            if not pattern.match(s):
                continue
            # must survive the round trip, also after another word
            if tok.encode(s, add_special_tokens=False) != [tid]:
                continue
            words.append(s)
            if len(words) >= 4000:
                break
        # a concatenation check: SentencePiece may drop the leading space of the first word
        if words:
            probe = "".join(words[:64])
            if len(tok.encode(probe, add_special_tokens=False)) != 64:
                words = [w for w in words if len(tok.encode("x" + w, add_special_tokens=False)) == 2]
        return words

    def build(self, n_tokens: int, rng: np.random.Generator) -> tuple[str, int]:
        """A random prompt of ``n_tokens`` tokens; returns (text, measured length)."""
        words = self._words
        idx = rng.integers(0, len(words), size=n_tokens)
        if self._tok is None:
            return " ".join(words[i] for i in idx), n_tokens
        pieces = [words[i] for i in idx]
        text = "".join(pieces)
        got = self.count(text)
        best = (abs(got - n_tokens), text, got)
        for _ in range(8):
            if got == n_tokens:
                return text, got
            if got > n_tokens:
                pieces = pieces[: max(1, len(pieces) - (got - n_tokens))]
            else:
                more = rng.integers(0, len(words), size=n_tokens - got)
                pieces = pieces + [words[i] for i in more]
            text = "".join(pieces)
            got = self.count(text)
            if abs(got - n_tokens) < best[0]:
                best = (abs(got - n_tokens), text, got)
        return best[1], best[2]


def build_prompts(
    workload: WorkloadSpec,
    n: int,
    *,
    level_seed: int,
    builder: PromptBuilder,
) -> list[Prompt]:
    """``n`` prompts for one level, reproducible from the workload seed and the level's seed."""
    rng = np.random.default_rng([workload.seed, level_seed])
    isls = workload.isl.sample(rng, n)
    osls = workload.osl.sample(rng, n)
    out: list[Prompt] = []
    for isl, osl in zip(isls.tolist(), osls.tolist(), strict=False):
        text, got = builder.build(int(isl), rng)
        out.append(Prompt(text=text, input_tokens=got, output_tokens=int(osl)))
    return out


class PromptPool:
    """Prompts for a level, indexed by request number.

    At most ``size`` prompts are held. A request number past the pool reuses a prompt with a unique
    numeric tag in front ("<i>: "), so no two requests share a prefix (no prefix-cache hits); the tag
    adds a few tokens, which the server's usage counts show.
    """

    def __init__(self, prompts: list[Prompt]) -> None:
        if not prompts:
            raise ValueError("a prompt pool needs at least one prompt")
        self._prompts = prompts

    def __len__(self) -> int:
        return len(self._prompts)

    def get(self, i: int) -> Prompt:
        p = self._prompts[i % len(self._prompts)]
        if i < len(self._prompts):
            return p
        return Prompt(text=f"{i}: {p.text}", input_tokens=p.input_tokens, output_tokens=p.output_tokens)
