"""Evaluation on SoMeData-style task files: option extraction, answer parsing, Acc/Acc*,
BLEU/ROUGE-L, a resumable encode-once-ask-many runner and the `somelvlm eval` CLI."""

from .metrics import accuracy, bleu, judge_score, rouge_l
from .runner import evaluate, read_predictions, score, write_report
from .tasks import FAMILIES, TaskFile, extract_options, family_of, load_task, load_tasks, parse_answer

__all__ = [
    "FAMILIES", "TaskFile", "accuracy", "bleu", "evaluate", "extract_options", "family_of",
    "judge_score", "load_task", "load_tasks", "parse_answer", "read_predictions", "rouge_l", "score",
    "write_report",
]
