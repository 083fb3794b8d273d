"""The parts of ``python -m jobs.label``: input listing (inputs), the shard plan and exactly-once
bookkeeping (plan), image decoding (decode), the output schema (schema), the Ray Data pipeline
(pipeline) and ``--preview`` drawings (preview)."""
