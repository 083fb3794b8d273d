"""The Ray programs a user submits: ``python -m jobs.train``, ``jobs.label``, ``jobs.evaluate``.

Every Ray call of the project lives in this package; ``maskrcnn`` stays usable without Ray.
"""

from jobs import retries as _retries  # noqa: F401,E402  (a Ray worker hands its S3 retries to its job: jobs/retries.py)
