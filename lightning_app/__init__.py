"""Entry points: ``python -m lightning_app <command>`` (fit, validate, test, benchmark, importance,
evolve, app, app-benchmark, images), the benchmark and evolution runners, the annotation app and
the reporter."""
