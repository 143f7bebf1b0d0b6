"""Benchmark suite for celery-adaptive: ``python -m bench run --help``.

Data flow of one run (see bench/README.md for the figures and their definitions)::

    workloads.build() --schedule--> runner --send_task--> private Redis db0 --> celery worker
                                       |                                           | (pool under test)
                                       |<--results (db1, finish times)-------------+
                                       |<--psutil samples of the worker tree (sampler)
                                       v
                          metrics.summarise() -> runs/*.json -> report.py (summary.md), plots.py

Importing this package (or any module in it) starts nothing: no Redis, no worker, no threads.
"""
