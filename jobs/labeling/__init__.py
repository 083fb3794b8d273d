"""The parts of ``python -m jobs.label``, one file per stage (the path of an image through them
is in this folder's README.md): options (the command line), lease (one run per output), inputs
(listing), plan (shards and their generations), decode, predict, rows (and the output schema),
shards (pieces and atomic commits), pipeline (the wiring), resources (actor sizing), preview
(``--preview`` drawings), ray_data (the model in your own Ray Data pipeline)."""
