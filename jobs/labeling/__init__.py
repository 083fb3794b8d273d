"""The parts of ``python -m jobs.label``, one file per stage (the path of an image through them
is in this folder's README.md): inputs (listing), shards (the plan, pieces, commits:
exactly-once), decode, predict, rows (and the output schema), pipeline (the wiring), resources
(actor sizing), preview (``--preview`` drawings), ray_data (the model in your own Ray Data
pipeline)."""
