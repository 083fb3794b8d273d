"""``python -m jobs.selftrain``: its options (``options``), the selection of pseudo-labels and
the student's training set (``pseudo``), and the run's state and report (``state``)."""
