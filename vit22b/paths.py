"""Every path a run reads or writes is an `etils.epath.Path`: a local folder, a `file://` URL, or a bucket
(`gs://`, `s3://`) where that filesystem is installed (gcsfs, s3fs). Orbax, TFDS and Grain take the same paths.
"""
import os

from etils import epath


def resolve(path):
    """'~/runs/x', 'file:///tmp/x' or 'gs://bucket/x' -> an absolute epath.Path (local paths made absolute, so
    a checkpoint manager and a subprocess agree on them)."""
    text = os.fspath(path)
    if text.startswith("file://"):  # epath's backends know gs://, s3://, ... but not the local-file URL
        text = text[len("file://"):]
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path):
    return "://" not in os.fspath(path)
