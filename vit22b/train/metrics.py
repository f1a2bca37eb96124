"""`WORKDIR/metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard event files."""
import io
import json

import numpy as np
from etils import epath

from vit22b import paths


class _EventFileOnObjectStore:
    """tensorboardX writes event records to a file object. An object store cannot append, so each flush uploads
    the whole file again (as tensorboardX's own GCS writer does), here through epath like every other file."""

    def __init__(self, path):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data):
        self.buffer.write(data)

    def flush(self):
        self.path.write_bytes(self.buffer.getvalue())

    def close(self):
        self.flush()


class _EventFilesOnObjectStores:
    def open(self, path):
        return _EventFileOnObjectStore(path)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _route_remote_event_files():
    from tensorboardX import record_writer
    for scheme in ("gs", "s3", "az"):
        record_writer.register_writer_factory(scheme, _EventFilesOnObjectStores())


class MetricsWriter:
    """Writes only where `enabled` (process 0). On resume, lines past the restored step are dropped, since
    those steps are recomputed exactly; the file then reads like one uninterrupted run."""

    def __init__(self, workdir, resumed_step=None, enabled=True):
        self.enabled = enabled
        self.path = paths.resolve(workdir) / "metrics.jsonl"
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Object stores cannot append: there the whole file is rewritten at each write (it stays small).
        self._rows = self._kept_rows(resumed_step or 0) if not paths.is_local(self.path) else None
        if self._rows is None:
            self._rewrite(self._kept_rows(resumed_step or 0))
        from tensorboardX import SummaryWriter
        _route_remote_event_files()
        self.tb = SummaryWriter(logdir=str(self.path.parent), flush_secs=30)

    def _kept_rows(self, last_step):
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= last_step]

    def _rewrite(self, lines):
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.path)

    def write(self, step, metrics):
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in metrics.items()}}
        line = json.dumps(row) + "\n"
        if self._rows is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._rows.append(line)
            self._rewrite(self._rows)
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, global_step=step)

    def close(self):
        if self.enabled:
            self.tb.close()


def read_metrics(workdir):
    """All rows of WORKDIR/metrics.jsonl, in order."""
    text = (paths.resolve(workdir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
