"""What ``jobs.train`` says and records about a run: its console lines, the pace and ETA of
the training steps, ``metrics.jsonl`` (one JSON object per logged step, evaluation and
(re)start) and the ``metrics.png`` curves drawn from it at the end."""

from __future__ import annotations

import json
import sys
import time

from jobs.common import format_duration
from jobs.training.spec import METRICS_FILE, PLOT_FILE


def log(message: str) -> None:
    """Prints ``message`` as one of the job's own console lines."""
    print(f"[jobs.train] {message}", flush=True)


def ap_text(result: dict) -> str:
    """An evaluation ``result``'s (``evaluate_model``'s) box, mask and, for a keypoint model,
    keypoint AP, as the job prints them."""
    keypoint_ap = f"  keypoint AP {result['keypoints_AP']:.4f}" if "keypoints_AP" in result else ""
    return f"box AP {result['bbox_AP']:.4f}  mask AP {result['segm_AP']:.4f}{keypoint_ap}"


def step_text(record: dict, total_steps: int, eta: str) -> str:
    """A logged step's console line: ``record`` is its metrics.jsonl record (step, epoch, loss
    and its terms, lr, images/s), ``total_steps`` the run's length, ``eta`` the time left."""
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
    return (
        f"step {record['step']}/{total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
        f"({terms}) lr {record['lr']:.5f} {record['images_per_s']:.1f} img/s ETA {eta}"
    )


class Pace:
    """The clock of a worker's training steps between logged steps, for images/s and the ETA.
    Time out of training (evaluation, checkpoints) is left out: ``resume`` after it."""

    def __init__(self, start_step: int) -> None:
        """``start_step``: the step the worker starts (or resumes) at."""
        self.start_step = self.last_step = start_step
        self.last_time = time.perf_counter()
        self.train_seconds = 0.0  # in training steps only: the ETA's mean step time

    def lap(self, step: int, images_per_step: float) -> float:
        """Images per second since the last lap, now at ``step``, where each step took
        ``images_per_step`` images (all ranks)."""
        now = time.perf_counter()
        rate = images_per_step * (step - self.last_step) / (now - self.last_time)
        self.train_seconds += now - self.last_time
        self.last_time, self.last_step = now, step
        return rate

    def resume(self) -> None:
        """Restarts the clock after time spent out of training."""
        self.last_time = time.perf_counter()

    def eta(self, step: int, total_steps: int) -> str:
        """The time left to ``total_steps`` from ``step``, at the mean step time so far."""
        return format_duration((total_steps - step) * self.train_seconds / (step - self.start_step))


def read_metrics(output: str, storage_options: dict | None) -> list[dict]:
    """The records of ``<output>/metrics.jsonl`` (read with ``storage_options``); [] when there is
    none. Lines that are not a record (a file cut short by a version that wrote it in place, an
    edit) are left out with a warning: a resume keeps the rest, and writes them no more."""
    from maskrcnn.storage import join_uri, open_uri

    uri = join_uri(output, METRICS_FILE)
    records, unreadable = [], 0
    try:
        with open_uri(uri, "r", storage_options) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    unreadable += 1
    except FileNotFoundError:
        return []
    if unreadable:
        lines = "line is" if unreadable == 1 else "lines are"
        print(f"warning: {unreadable} {lines} not a record of the run in {uri} (cut short or edited); left out", file=sys.stderr)
    return records


class MetricsLog:
    """Rank 0's record of the run, rewritten whole to ``<output>/metrics.jsonl`` at each
    checkpoint, evaluation and the end (object stores cannot append). On a resume, records
    after the restored step are dropped: that stretch is trained again."""

    def __init__(self, output: str, storage_options: dict | None, start_step: int) -> None:
        """``output``: the run folder; ``storage_options``: for writing there; ``start_step``:
        the step the run starts or resumes at."""
        self.uri = output
        self.storage_options = storage_options
        self.records = [r for r in read_metrics(output, storage_options) if r.get("step", 0) <= start_step]

    def add(self, record: dict) -> None:
        self.records.append(record)

    def flush(self) -> None:
        """Rewrites the file whole or not at all: a kill in the middle must not leave a resume a
        truncated record of the run to read."""
        from jobs.mistakes import writing_output
        from maskrcnn.storage import filesystem, join_uri, put_atomic

        text = "".join(json.dumps(r) + "\n" for r in self.records)
        fs, path = filesystem(join_uri(self.uri, METRICS_FILE), self.storage_options)
        with writing_output(self.uri):
            put_atomic(fs, path, text.encode("utf-8"))


def plot_metrics(records: list[dict], uri: str, storage_options: dict | None) -> bool:
    """Loss terms, learning rate and AP of ``records`` (metrics.jsonl's) against step, as a PNG
    at ``uri`` (written with ``storage_options``); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed; no metrics plot", file=sys.stderr)
        return False
    import io

    from maskrcnn.storage import filesystem, put_atomic

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    terms = list(dict.fromkeys(k for r in steps for k in r if k.startswith("loss_")))  # whatever the model returned
    for key in ["loss", *terms]:
        logged = [r for r in steps if key in r]
        axes[0].plot([r["step"] for r in logged], [r[key] for r in logged], label=key, linewidth=2 if key == "loss" else 1)
    axes[0].set(title="training loss (mean over workers)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:purple")
    axes[1].set(title="learning rate", xlabel="step")
    twin = axes[1].twinx()
    twin.plot([r["step"] for r in steps], [r["images_per_s"] for r in steps], color="tab:gray", alpha=0.6)
    twin.set_ylabel("images/s (all workers)")
    curves = (("bbox_AP", "box AP"), ("segm_AP", "mask AP"), ("bbox_AP50", "box AP50"), ("segm_AP50", "mask AP50"),
              ("keypoints_AP", "keypoint AP"))
    for key, label in curves:
        if evals and key not in evals[0]:
            continue
        axes[2].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=label)
    axes[2].set(title="COCO AP on --val-annotations", xlabel="step", ylim=(0, 1))
    if evals:
        axes[2].legend(fontsize=8)
    else:
        axes[2].text(0.5, 0.5, "no --val-annotations", ha="center", va="center", transform=axes[2].transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    fs, path = filesystem(uri, storage_options)
    put_atomic(fs, path, buffer.getvalue())
    return True


def summarize_run(output: str, storage_options: dict | None) -> None:
    """After a run into ``output``: draws ``metrics.png`` and prints the last evaluation's AP."""
    from maskrcnn.storage import join_uri

    records = read_metrics(output, storage_options)
    plot_uri = join_uri(output, PLOT_FILE)
    if plot_metrics(records, plot_uri, storage_options):
        log(f"wrote {plot_uri}")
    evals = [r for r in records if r.get("event") == "eval"]
    if evals:
        log(f"final {ap_text(evals[-1])}")
