"""`WORKDIR/metrics.jsonl` (one JSON object per line, with `step`) and TensorBoard event files."""
import io
import json
import os

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
        """The lines up to LAST_STEP. A line that is not a JSON row (a write cut short) is reported with its
        number and moved to metrics.jsonl.malformed."""
        if not self.path.exists():
            return []
        kept, malformed = [], []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
            except (ValueError, TypeError, KeyError):
                malformed.append(line + "\n")
                print(f"{self.path}:{n}: not a JSON row; moved to {self.path}.malformed", flush=True)
                continue
            if step <= last_step:
                kept.append(line + "\n")
        if malformed:
            aside = self.path.parent / (self.path.name + ".malformed")
            aside.write_text((aside.read_text() if aside.exists() else "") + "".join(malformed))
        return kept

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
            _append_whole(self.path, line.encode())
        else:
            self._rows.append(line)
            self._rewrite(self._rows)
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, global_step=step)

    def write_image(self, step, name, image):
        """An HWC uint8 picture: WORKDIR/images/NAME_STEP.png, and TensorBoard's image NAME at STEP."""
        if not self.enabled:
            return
        from PIL import Image
        folder = self.path.parent / "images"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
        (folder / f"{name.replace('/', '_')}_{int(step)}.png").write_bytes(buffer.getvalue())
        self.tb.add_image(name, np.asarray(image, np.uint8), global_step=step, dataformats="HWC")

    def close(self):
        if self.enabled:
            self.tb.close()


def _append_whole(path, data):
    """Append DATA in one write, or not at all: a write cut short (a full disk) is truncated away again, so the
    file never ends in half a row."""
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
        except OSError:
            written = -1
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(f"{path}: could not append a metrics row (disk full?)")
    finally:
        os.close(fd)


def read_metrics(workdir):
    """All rows of WORKDIR/metrics.jsonl, in order."""
    path = paths.resolve(workdir) / "metrics.jsonl"
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{n}: not a JSON row: {line[:80]!r}") from None
    return rows
