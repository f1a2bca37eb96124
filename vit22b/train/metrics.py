"""`WORKDIR/metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard event files."""
import json
import os

import numpy as np


class MetricsWriter:
    """Writes only where `enabled` (process 0). On resume, lines past the restored step are dropped, since
    those steps are recomputed exactly; the file then reads like one uninterrupted run."""

    def __init__(self, workdir, resumed_step=None, enabled=True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._truncate(resumed_step or 0)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def _truncate(self, last_step):
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, step, metrics):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, global_step=step)

    def close(self):
        if self.enabled:
            self.tb.close()


def read_metrics(workdir):
    """All rows of WORKDIR/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
