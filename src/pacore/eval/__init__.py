"""Evaluation: data sets, answer extraction, graders, synthetic problems, batch runs,
reports and training export (the Python side of ``pacore run``, ``report`` and ``export-train``).

::

    from pacore.eval import load_dataset, grade
    problems = load_dataset("gsm8k.jsonl", limit=50)
    grade(result.answer, problems[0].answer, kind=problems[0].kind)

    from pacore.eval import Arm, run_dataset, write_report
    await run_dataset("runs/gsm8k", problems, dataset_path="gsm8k.jsonl",
                      arm=Arm.build("pacore", schedule="low"), backend=backend)
    write_report(["runs/gsm8k"])
"""

from typing import TYPE_CHECKING

from pacore._lazy import lazy_attributes

if TYPE_CHECKING:
    from pacore.eval.datasets import Problem, dataset_fingerprint, load_dataset
    from pacore.eval.export import export_train
    from pacore.eval.grading import extract_answer, grade, majority_vote
    from pacore.eval.report import write_report
    from pacore.eval.runner import Arm, BatchRun, run_dataset
    from pacore.eval.synthetic import synthetic_problems, write_jsonl

__all__ = [
    "Arm",
    "BatchRun",
    "Problem",
    "dataset_fingerprint",
    "export_train",
    "extract_answer",
    "grade",
    "load_dataset",
    "majority_vote",
    "run_dataset",
    "synthetic_problems",
    "write_jsonl",
    "write_report",
]

# The public names by the module each comes from, imported on first use: a command that needs one
# module (``pacore data check`` reads data sets) does not import the runner, reports and export.
__getattr__ = lazy_attributes(
    __name__,
    {
        "pacore.eval.datasets": ("Problem", "dataset_fingerprint", "load_dataset"),
        "pacore.eval.export": ("export_train",),
        "pacore.eval.grading": ("extract_answer", "grade", "majority_vote"),
        "pacore.eval.report": ("write_report",),
        "pacore.eval.runner": ("Arm", "BatchRun", "run_dataset"),
        "pacore.eval.synthetic": ("synthetic_problems", "write_jsonl"),
    },
)
