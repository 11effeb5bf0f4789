"""Files that are never half-written, and their digests.

Every file a run writes goes through `atomic_write`: the content goes to a temporary file next to
the target, which then replaces it in one `os.replace`, so a kill or a full disk leaves either the
old file or the new one, never a mix; a write that fails removes its temporary file.
"""
import hashlib
import json
import os


def atomic_write(path, write):
    """write(tmp_path) writes the content; then it replaces `path` atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
