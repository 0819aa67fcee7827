"""Evaluation data and grading: data sets, answer extraction, graders, synthetic problems.

::

    from pacore.eval import load_dataset, grade
    problems = load_dataset("gsm8k.jsonl", limit=50)
    grade(result.answer, problems[0].answer, kind=problems[0].kind)
"""

from pacore.eval.datasets import Problem, dataset_fingerprint, load_dataset
from pacore.eval.grading import extract_answer, grade, majority_vote
from pacore.eval.synthetic import synthetic_problems, write_jsonl

__all__ = [
    "Problem",
    "dataset_fingerprint",
    "extract_answer",
    "grade",
    "load_dataset",
    "majority_vote",
    "synthetic_problems",
    "write_jsonl",
]
