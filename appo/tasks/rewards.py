"""Answer grading: numeric equivalence for math, token overlap / exact match for QA; the reward rule.

Reward rule (``combine``): score = correct_weight * correctness - (format_penalty if the format is malformed),
where correctness is 1/0 for math and ``precision_times_recall`` in [0, 1] for QA. With the defaults a reward
lies in [-0.1, 1.0]: a correct answer in a malformed response scores 0.9, a wrong or missing one -0.1.

Why not token F1 for QA: F1 pays hedging. Naming two one-word candidates ("Paris, London") scores F1 = 0.67
against either gold, more than the 0.5 a model that is unsure between them can expect by committing to one.
Precision x recall scores that hedge 0.5 ("Paris or London": 1/3), and in general listing candidates never
scores above what committing to the likeliest one earns in expectation (``precision_times_recall``). F1 and
exact match stay available (``token_f1``, ``exact_match``); the QA accuracy appo reports is exact match.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class RewardConfig:
    """correct_weight: multiplies correctness; format_penalty: subtracted when check_format fails."""

    correct_weight: float = 1.0
    format_penalty: float = 0.1

    def __post_init__(self):
        if not self.correct_weight > 0:
            raise ValueError(f"correct_weight: must be positive, got {self.correct_weight}")
        if not 0 <= self.format_penalty <= self.correct_weight:
            raise ValueError(f"format_penalty: must lie in [0, correct_weight], got {self.format_penalty}")


def combine(correctness: float, format_ok: bool, config: RewardConfig) -> float:
    """The scalar reward of one response (rule in the module docstring)."""
    return config.correct_weight * correctness - (0.0 if format_ok else config.format_penalty)


# ---------------------------------------------------------------- numbers (GSM8K and arithmetic)

# A number token: an optional sign (never right after a letter or digit: "a-3" is not -3), digits with an
# optional decimal part or a leading-dot decimal, and an optional exponent ("1e3", "2.5E-4").
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+)(?![A-Za-z]))?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")  # 1,234,567 (not 12,34 nor 1,2345)
_RANGE = re.compile(r"\d\s*[-\u2013]\s*\.?\d")  # "5-3", "2019-2020": a subtraction or a range, not a number


def parse_number(text: str | None) -> Fraction | None:
    """The number an answer states, exactly as a Fraction, or None.

    Handles ``\\boxed{..}`` (the last one wins), ``\\frac{a}{b}``, thousands commas (``1,234,567``), ``$`` and
    other currency signs, a unicode minus, trailing units or periods (``"72 clips."``), decimals, exponents
    (``"1e3"``), fractions (``"3/4"``) and mixed numbers (``"1 1/2"``). When an ``=`` appears, only what follows
    the last one counts (``"5 + 3 = 8"`` -> 8); then the last number is taken. An answer that does not state
    one number is None, never guessed: an unresolved subtraction or range (``"5-3"``, ``"2019-2020"``) or a
    comma between digits that is not a thousands separator (``"12,34"``).
    """
    if text is None:
        return None
    boxed = _last_boxed(text)
    text = boxed if boxed is not None else text
    text = _FRAC.sub(r"(\1)/(\2)", text).replace("−", "-").replace("\u2009", "")
    text = text.rsplit("=", 1)[-1]
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    text = re.sub(r"[$€£¥()]", "", text)
    if re.search(r"\d,\d", text) or _RANGE.search(text):
        return None
    found = list(_NUMBER.finditer(text))[-4:]  # a mixed number needs the last three (and the gap before them)
    if not found:
        return None
    try:
        values = [_token_value(m) for m in found]
        value = values[-1]
        between = [text[a.end():b.start()] for a, b in zip(found, found[1:])]  # gap before found[i + 1]
        if len(found) >= 2 and re.fullmatch(r"\s*/\s*", between[-1]):
            numerator, denominator = values[-2], values[-1]
            value = numerator / denominator
            mixed = (len(found) >= 3 and re.fullmatch(r"\s+", between[-2])
                     and (len(found) == 3 or not re.fullmatch(r"\s*/\s*", between[-3]))
                     and numerator.denominator == denominator.denominator == 1 and 0 < value < 1)
            if mixed:                                     # "1 1/2", "-1 1/2"
                whole = values[-3]
                value = whole + value if whole >= 0 else whole - value
    except (ValueError, ZeroDivisionError):
        return None
    return value


_MAX_EXPONENT = 100  # "1e999999999" is model-written text: never let it cost time or memory


def _token_value(match: re.Match) -> Fraction:
    sign, digits, exponent = match.groups()
    if exponent and abs(int(exponent)) > _MAX_EXPONENT:
        raise ValueError(f"exponent beyond 1e{_MAX_EXPONENT}")
    value = Fraction(digits) * (Fraction(10) ** int(exponent) if exponent else 1)
    return -value if sign else value


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{..}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def numbers_match(predicted: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    """True when ``predicted`` states the number ``gold`` states (exactly, or within rel_tol of |gold|)."""
    got, want = parse_number(predicted), parse_number(gold)
    if got is None or want is None:
        return False
    return got == want or abs(got - want) <= rel_tol * max(abs(want), 1)


# ---------------------------------------------------------------- text answers (HotpotQA)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predicted: str | None, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0 (None counts as wrong)."""
    return float(predicted is not None and normalize_answer(predicted) == normalize_answer(gold))


def precision_times_recall(predicted: str | None, gold: str) -> float:
    """Token precision x recall of the normalised answers: the QA correctness appo rewards.

    Same tokens as ``token_f1`` (SQuAD normalisation) and the same yes/no/noanswer rule; an exact match
    scores 1. It does not pay hedging: for candidates with disjoint tokens c_1..c_k of which the gold is one,
    with probabilities p_i, listing them all scores |c_i| / sum_j |c_j| when c_i is the gold (less with
    words such as "or" between them), so its expectation sum_i p_i |c_i| / sum_j |c_j| is at most max_i p_i,
    what committing to the likeliest candidate earns. Partial answers still earn partial credit ("Obama" for
    "Barack Obama": 1/2; F1 gives 2/3).
    """
    precision, recall = _token_precision_recall(predicted, gold)
    return precision * recall


def token_f1(predicted: str | None, gold: str) -> float:
    """Token-level F1 of the normalised answers, as in the HotpotQA evaluation script.

    As there, a yes/no/noanswer answer on either side scores 0 unless both normalised strings are equal.
    """
    precision, recall = _token_precision_recall(predicted, gold)
    if precision == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _token_precision_recall(predicted: str | None, gold: str) -> tuple[float, float]:
    """(precision, recall) of the normalised answers' tokens, as the HotpotQA evaluation script counts them:
    (0.0, 0.0) for a missing answer, no common token, or a yes/no/noanswer answer on either side that the
    other does not equal."""
    if predicted is None:
        return 0.0, 0.0
    pred, want = normalize_answer(predicted), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or want in ("yes", "no", "noanswer")) and pred != want:
        return 0.0, 0.0
    pred_tokens, gold_tokens = pred.split(), want.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0, 0.0
    return common / len(pred_tokens), common / len(gold_tokens)
