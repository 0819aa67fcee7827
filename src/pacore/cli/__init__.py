"""The ``pacore`` command: one module per command group, wired in ``main``."""
