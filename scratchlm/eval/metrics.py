"""Metrics for task results: pure functions of predictions and references, no model.

Generation metrics compare a prediction with one or more references:

- `exact_match` and `token_f1` as in the SQuAD evaluation script (Rajpurkar et al. 2016): both
  texts are normalised first (lowercase, punctuation and the articles a/an/the removed,
  whitespace collapsed), then the best reference counts. Per example, in [0, 1].
- `bleu` and `chrf` through sacrebleu (Post 2018), corpus-level (statistics summed over all
  examples before the ratio, as BLEU is defined; an average of sentence BLEU is a different and
  noisier number). On sacrebleu's 0-100 scale, the scale every published BLEU uses.
- `rouge` through Google's rouge-score (the package behind the reference numbers): F-measure of
  ROUGE-1, ROUGE-2 and ROUGE-L per example, best reference, averaged over examples; in [0, 1].
  Its tokenizer keeps only ASCII letters and digits, so it sees nothing in other scripts.

Classification metrics compare predicted labels with true ones: `accuracy`, `macro_f1` and
`confusion_matrix`.
"""

import re
import string
from collections import Counter
from collections.abc import Sequence

from scratchlm.errors import ConfigError

GENERATION_METRICS = ("exact_match", "f1", "bleu", "chrf", "rouge1", "rouge2", "rougeL")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


# ---- SQuAD-style answer comparison ---------------------------------------------------------
def normalize_answer(text: str) -> str:
    """The SQuAD script's normalisation, in its order: lowercase, drop ASCII punctuation, drop
    articles, collapse whitespace. 'The Cat, sat.' -> 'cat sat'."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    _check_references(references)
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(ref) for ref in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """Best F1 over references of the bags of normalised words (SQuAD's F1). Two empty answers
    agree (1.0); an empty one against a non-empty one scores 0.0."""
    _check_references(references)
    return max(_bag_f1(normalize_answer(prediction).split(), normalize_answer(ref).split()) for ref in references)


def _bag_f1(guess: list[str], truth: list[str]) -> float:
    if not guess or not truth:
        return float(guess == truth)
    common = sum((Counter(guess) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(guess), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str) or not references:
        raise ConfigError(f"references must be a non-empty list of strings, not {references!r}")


# ---- corpus-level overlap metrics ----------------------------------------------------------
def _reference_streams(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; examples with fewer references pad
    with None, which sacrebleu skips."""
    if len(predictions) != len(references):
        raise ConfigError(f"{len(predictions)} predictions but {len(references)} reference lists")
    for refs in references:
        _check_references(refs)
    width = max((len(refs) for refs in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation, exponential smoothing)."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), _reference_streams(predictions, references)).score)


def chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus chrF (0-100): character n-gram F-score (Popović 2015), kinder than BLEU to short
    texts and to languages with rich morphology."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(predictions, references)).score)


def rouge(
    predictions: Sequence[str], references: Sequence[Sequence[str]], types: Sequence[str] = ROUGE_TYPES
) -> dict[str, float]:
    """Mean over examples of the best-reference ROUGE F-measure, for each of `types`."""
    from rouge_score import rouge_scorer

    unknown = [t for t in types if t not in ROUGE_TYPES]
    if unknown:
        raise ConfigError(f"unknown ROUGE type {unknown[0]!r} (supported: {', '.join(ROUGE_TYPES)})")
    _reference_streams(predictions, references)  # same length and shape checks as BLEU
    if not predictions:
        return {t: 0.0 for t in types}
    scorer = rouge_scorer.RougeScorer(list(types))
    totals = dict.fromkeys(types, 0.0)
    for prediction, refs in zip(predictions, references):
        scores = scorer.score_multi(list(refs), prediction)  # best reference per type
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: totals[t] / len(predictions) for t in types}


def generation_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], names: Sequence[str] = GENERATION_METRICS
) -> dict[str, float]:
    """The metrics in `names`, keyed by name. Predictions are compared without surrounding
    whitespace: a model continues "The answer is" with " Paris", which is the answer."""
    unknown = [n for n in names if n not in GENERATION_METRICS]
    if unknown:
        raise ConfigError(f"unknown generation metric {unknown[0]!r} (supported: {', '.join(GENERATION_METRICS)})")
    _reference_streams(predictions, references)  # one reference list per prediction, none empty
    stripped = [p.strip() for p in predictions]
    out: dict[str, float] = {}
    n = max(len(stripped), 1)
    if "exact_match" in names:
        out["exact_match"] = sum(exact_match(p, r) for p, r in zip(stripped, references)) / n
    if "f1" in names:
        out["f1"] = sum(token_f1(p, r) for p, r in zip(stripped, references)) / n
    if "bleu" in names:
        out["bleu"] = bleu(stripped, references)
    if "chrf" in names:
        out["chrf"] = chrf(stripped, references)
    types = [t for t in ROUGE_TYPES if t in names]
    if types:
        out.update(rouge(stripped, references, types))
    return {name: out[name] for name in GENERATION_METRICS if name in out}


# ---- classification ------------------------------------------------------------------------
def _check_pairs(predictions: Sequence, truths: Sequence) -> None:
    if len(predictions) != len(truths):
        raise ConfigError(f"{len(predictions)} predictions but {len(truths)} true labels")


def accuracy(predictions: Sequence, truths: Sequence) -> float:
    """Fraction of predictions equal to the truth (0.0 for no examples)."""
    _check_pairs(predictions, truths)
    return sum(p == t for p, t in zip(predictions, truths)) / len(truths) if truths else 0.0


def macro_f1(predictions: Sequence, truths: Sequence) -> float:
    """Unweighted mean over labels of each label's F1 = 2TP / (2TP + FP + FN), over the labels
    that occur in the truth or the predictions (scikit-learn's default). A rare class counts as
    much as a common one, so always answering the majority label scores poorly."""
    _check_pairs(predictions, truths)
    labels = set(predictions) | set(truths)
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predictions, truths))
        fp = sum(p == label and t != label for p, t in zip(predictions, truths))
        fn = sum(p != label and t == label for p, t in zip(predictions, truths))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def confusion_matrix(predictions: Sequence, truths: Sequence, labels: Sequence) -> list[list[int]]:
    """counts[i][j] = number of examples whose true label is labels[i] and predicted labels[j]."""
    _check_pairs(predictions, truths)
    index = {label: n for n, label in enumerate(labels)}
    outside = [x for x in [*truths, *predictions] if x not in index]
    if outside:
        raise ConfigError(f"label {outside[0]!r} is not one of {list(labels)!r}")
    counts = [[0] * len(labels) for _ in labels]
    for p, t in zip(predictions, truths):
        counts[index[t]][index[p]] += 1
    return counts
