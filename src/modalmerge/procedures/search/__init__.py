"""Hyperparameter search over a merge recipe (`modalmerge search`, issue 14).

A recipe marks the values to search (`{search: ...}`, space.py); each trial fills them in, merges
in memory from inputs opened once per worker and evaluates the merged model (trial.py,
evaluators.py); a runner keeps trials in flight, in this process or on Ray workers (runners.py,
ray_runner.py); the study loop asks Optuna for parameters, tells it the results, keeps a journal
to resume from, and writes the report and the best merge (study.py, report.py, output.py). The
same loop runs an in-process objective (tune.py): the benchmarks' validation rows tune through it.
Optuna, Ray and matplotlib are imported only where they are used, so this package imports
without them.
"""
