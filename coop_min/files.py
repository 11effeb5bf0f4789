"""Files that are never half-written, and their digests.

Every file a run writes goes through `atomic_write`: the content goes to a temporary file next to
the target, which then replaces it in one `os.replace`, so a kill or a full disk leaves either the
old file or the new one, never a mix; a write that fails removes its temporary file. A write that a
full or vanished disk stopped is raised as one OSError naming the folder and the space it needs, whatever
the writer raised (torch.save's zip writer raises RuntimeError, safetensors its SafetensorError).
"""
import errno
import hashlib
import json
import os
import shutil


def atomic_write(path, write):
    """write(tmp_path) writes the content; then it replaces `path` atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        disk = _disk_error(path, tmp, e) if isinstance(e, Exception) else None
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk is None:
            raise
        raise disk from e


def _disk_error(path, tmp, error):
    """The OSError to raise for a write that failed for lack of disk, else None: the folder is gone, the
    writer said so (ENOSPC, EDQUOT), or it raised something else (torch.save, safetensors) while the disk
    held less than the old file or 1 MiB next to the partial file `tmp`."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:                          # unmounted or removed while we wrote
        return OSError(errno.EIO, f"{folder} is gone (its disk was unmounted or removed) while {name} was "
                                  "written", path)
    old = os.path.getsize(path) if os.path.exists(path) else 0   # about the new file's size
    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    if not isinstance(error, OSError) and free >= max(old, 1 << 20):
        return None
    free += os.path.getsize(tmp) if os.path.exists(tmp) else 0   # once the partial file is removed
    needs = f"about {_size(old)}, {_size(free)} is free" if old > free else f"more than the {_size(free)} free"
    return OSError(errno.ENOSPC, f"no space left in {folder}: {name} needs {needs}", path)


def _size(n):
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 2 ** 10:.1f} KiB"


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
