"""What a front door passes to :func:`pacore.asolve`, built once as one value.

The CLI's ``ask``, the server and the batch runner each validate their own
input (flags, a request body, a run's settings) into a :class:`SolveOptions`,
then call ``asolve(prompt, backend=..., on_event=..., **options.as_kwargs())``.
What is per call rather than per front door (the backend, the event
callback, a pooled first round) stays an explicit argument of that call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pacore.adaptive import POLICIES_OFF, ComputePolicy
from pacore.backends.base import GenerationParams
from pacore.prompts import SynthesisTemplate
from pacore.schedule import Schedule
from pacore.synthesis import ReferenceOrder


@dataclass(frozen=True, slots=True)
class SolveOptions:
    """The settings of :func:`pacore.asolve` a front door decides (see its docstring for each)."""

    schedule: Schedule = field(default_factory=lambda: Schedule.parse(None))
    params: GenerationParams = field(default_factory=GenerationParams)
    #: A loaded template, a built-in's name or a template file; ``None``: the default.
    template: SynthesisTemplate | str | Path | None = None
    seed: int | None = None
    min_success: float | None = None
    deadline: float | None = None
    reference_order: ReferenceOrder = "shuffle"
    stream_answer: bool = False
    #: Adaptive-compute policies; ``None`` (or a default policy): the paper's method.
    compute: ComputePolicy | None = None

    def replace(self, **changes: Any) -> SolveOptions:
        """A copy with ``changes`` (e.g. a repeat's own ``seed`` and ``params``)."""
        return replace(self, **changes)

    @property
    def policy(self) -> ComputePolicy:
        """The adaptive-compute policy in force (all off when none was given)."""
        return self.compute or POLICIES_OFF

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pacore.asolve` these options stand for.

        ``compute`` is passed only when a policy is on, so a request without
        one calls the engine exactly as before the policies existed.
        """
        kwargs: dict[str, Any] = {
            "schedule": self.schedule,
            "params": self.params,
            "template": self.template,
            "seed": self.seed,
            "min_success": self.min_success,
            "deadline": self.deadline,
            "reference_order": self.reference_order,
            "stream_answer": self.stream_answer,
        }
        if self.compute is not None and not self.compute.is_default:
            kwargs["compute"] = self.compute
        return kwargs


def policy_label(fields: Mapping[str, Any]) -> str:
    """A policy's non-default fields (``ComputePolicy.model_dump(exclude_defaults=True)``) as
    text for names and labels: ``keep-top=0.5+early-stop``; empty for none."""
    order = {name: i for i, name in enumerate(ComputePolicy.model_fields)}  # stored policies are key-sorted
    parts = []
    for name in sorted(fields, key=lambda name: order.get(name, len(order))):
        value, label = fields[name], name.replace("_", "-")
        parts.append(
            label if value is True else f"{label}={value:g}" if isinstance(value, float) else f"{label}={value}"
        )
    return "+".join(parts)
