"""Where a self-training run keeps what it did: the folders of its stages under ``--output``,
the settings it was started with and the seconds each stage took (``selftrain.state.json``,
rewritten atomically after every stage), and the final report (``selftrain.json``)."""

from __future__ import annotations

import json

from jobs.common import JobError
from maskrcnn.storage import join_uri, open_uri

STATE_FILE = "selftrain.state.json"
REPORT_FILE = "selftrain.json"
FORMAT = "maskrcnn-ray-selftrain/1"


class Layout:
    """The run's paths: ``teacher/`` (a jobs.train --output, or only ``eval.json`` with --weights),
    ``round-N/labels/`` (jobs.label's), ``round-N/detections.json`` (jobs.export_coco's),
    ``round-N/pseudo.json``, ``round-N/train.json`` and ``round-N/student/`` (jobs.train's)."""

    def __init__(self, output: str):
        self.output = output.rstrip("/")

    def __call__(self, *parts: str) -> str:
        return join_uri(self.output, *parts)

    def round(self, number: int, *parts: str) -> str:
        return self(f"round-{number}", *parts)


class State:
    """The settings the run in ``--output`` was started with, and its stage times."""

    def __init__(self, layout: Layout, settings: dict, storage_options: dict | None):
        self.uri = layout(STATE_FILE)
        self.storage_options = storage_options
        saved = read_json_or_none(self.uri, storage_options)
        if saved is not None and saved.get("settings") != settings:
            changed = [
                f"--{k.replace('_', '-')} {_show(saved.get('settings', {}).get(k))} -> {_show(settings.get(k))}"
                for k in sorted(set(settings) | set(saved.get("settings", {})))
                if saved.get("settings", {}).get(k) != settings.get(k)
            ]
            raise JobError(
                f"--output {layout.output} holds a self-training run started with other settings (run -> command: "
                f"{'; '.join(changed)}); give a new --output, or the run's own settings to continue it"
            )
        self.data = saved or {"format": FORMAT, "settings": settings, "seconds": {}}
        if saved is None:
            self.save()

    def seconds(self, key: str) -> dict:
        return self.data["seconds"].setdefault(key, {})

    def record(self, key: str, stage: str, seconds: float) -> None:
        self.seconds(key)[stage] = round(seconds, 1)
        self.save()

    def save(self) -> None:
        from jobs.selftraining.pseudo import write_json_plain

        write_json_plain(self.uri, self.data, self.storage_options)


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, dict) else str(value)


def read_json_or_none(uri: str, storage_options: dict | None) -> dict | None:
    """The JSON object at ``uri``; None when there is none (or a damaged one, redone)."""
    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    except Exception as exc:  # permission, network, credentials
        from maskrcnn.storage import explain_storage_error

        raise JobError(f"cannot read {uri}: {explain_storage_error(exc)}") from None
    return data if isinstance(data, dict) else None
