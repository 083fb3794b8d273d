"""The parts of ``python -m jobs.train``: the command line and its checks (options), the run's
plan that the driver hands the workers (spec), the checks of the datasets and ``--weights``
(inputs), Ray Train on the cluster (launch), the loop each worker runs (worker, which starts by
resume), and the run's console lines, metrics.jsonl and plot (metrics)."""
