"""The choices and defaults of ``pacore run`` and ``pacore export-train``, apart from the code that uses them.

Every ``pacore`` command line declares the commands whose options list them (``pacore --help``
declares them all): kept here, they cost it nothing, where importing the runner or the exporter
would load the engine, the run store and the report code.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The methods ``pacore run`` evaluates.
METHODS = ("pacore", "single", "majority")
#: Samples a majority arm votes over when none are given.
DEFAULT_SAMPLES = 16

ExportFormat = Literal["pacore", "verl", "trl"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)

DEFAULT_MIN_ACC = 0.0
DEFAULT_MAX_ACC = 0.375
DEFAULT_MIN_SIZE = 16
DEFAULT_MAX_SIZE = 24
