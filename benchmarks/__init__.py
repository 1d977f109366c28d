"""Benchmarks for switch-dit: one command measures every kernel, block and training step.

    python -m benchmarks            # everything (GPU), results in benchmarks/results/
    python -m benchmarks --quick    # the subset that decides the issue targets
    python -m benchmarks --smoke    # CPU smoke run with tiny shapes (CI), results in a temp dir
    python -m benchmarks.report     # regenerate the table, chart and README section

See benchmarks/README.md. Nothing here is imported by the ``switch_dit`` package, and
importing this package does not import ``switch_dit`` (so the smoke mode can set
TRITON_INTERPRET before any kernel module is loaded).
"""

SCHEMA_VERSION = 2  # 2: rows carry their provenance; the file its datasheet peaks
