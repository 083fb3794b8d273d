"""The Ray programs a user submits: ``python -m jobs.train``, ``jobs.label``, ``jobs.evaluate``.

Every Ray call of the project lives in this package; ``maskrcnn`` stays usable without Ray.
"""
