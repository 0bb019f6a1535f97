"""Scores, all in percent (0-100) as in the SoMeLVLM tables.

* **Acc** = correct / all samples; **Acc\\*** = correct / parseable samples, i.e. accuracy among
  the answers that could be mapped to an option (None when no answer is parseable). A failed or
  missing prediction counts as wrong and unparseable.
* **BLEU**: sacrebleu corpus BLEU, default settings (tokenizer "13a", one reference per sample).
* **ROUGE-L**: rouge-score `rougeL` F1 with the Porter stemmer (`use_stemmer=True`), averaged
  over samples.
* **Judge** (optional): the mean of a user-supplied `judge(prompt, prediction, reference)`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

Judge = Callable[[str, str, str], float]

BLEU_TOKENIZER = "13a"
ROUGE_USE_STEMMER = True


def accuracy(golds: Sequence[str], parsed: Sequence[str | None]) -> dict:
    """Acc and Acc* for gold labels and parsed answers (None = unparseable)."""
    if len(golds) != len(parsed):
        raise ValueError(f"{len(golds)} gold labels but {len(parsed)} answers")
    n = len(golds)
    correct = sum(p is not None and p == g for g, p in zip(golds, parsed))
    parseable = sum(p is not None for p in parsed)
    return {
        "n": n,
        "correct": correct,
        "parseable": parseable,
        "unparseable": n - parseable,
        "acc": 100.0 * correct / n if n else None,
        "acc_star": 100.0 * correct / parseable if parseable else None,
    }


def option_counts(golds: Sequence[str], parsed: Sequence[str | None]) -> dict[str, dict[str, int]]:
    """Per label: how often it is the gold answer, the parsed answer, and both."""
    gold_n, pred_n = Counter(golds), Counter(p for p in parsed if p is not None)
    hits = Counter(g for g, p in zip(golds, parsed) if g == p)
    labels = list(dict.fromkeys([*golds, *pred_n]))
    return {label: {"gold": gold_n[label], "predicted": pred_n[label], "correct": hits[label]}
            for label in labels}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Corpus BLEU x100 (sacrebleu, tokenizer 13a); None for an empty corpus."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return None
    return sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=BLEU_TOKENIZER).score


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    """Mean ROUGE-L F1 x100 (rouge-score, stemming on); None for an empty corpus."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    if not predictions:
        return None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=ROUGE_USE_STEMMER)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / len(scores)


def judge_score(judge: Judge, prompts: Sequence[str], predictions: Sequence[str],
                references: Sequence[str]) -> float | None:
    """Mean of `judge(prompt, prediction, reference)` over samples (e.g. a GPT-style 0-10 score)."""
    _check_lengths(predictions, references)
    _check_lengths(prompts, references)
    if not predictions:
        return None
    scores = [float(judge(q, p, r)) for q, p, r in zip(prompts, predictions, references)]
    return sum(scores) / len(scores)


def _check_lengths(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
