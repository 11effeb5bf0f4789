"""Read the pickle inside a PyTorch zip file (torch.save, torch.jit.save) without running it.

A pickle is a small program: every global it names is imported and may be called. PyTorch's own
`torch.load(weights_only=True)` allows tensors and plain containers only, which is too little for the
two kinds of foreign file coop_min reads: OpenAI's TorchScript archives (weights/convert.py) and the
official CoOp checkpoints, whose scheduler entry pickles an LR scheduler and an optimizer object
(coop_min/official.py). `RestrictedUnpickler` builds tensors itself from the archive's storages and
imports nothing: each global the pickle names must be in the caller's allow-list, which maps it to a
harmless stand-in (a storage dtype, a tensor-building function of ours, a container type, or
`Inert`, an object that keeps its pickled state and has no behaviour). Any other global, such as
`os.system`, `builtins.eval` or `subprocess.Popen`, stops the read before anything runs.
"""
import collections
import io
import os
import pickle
import zipfile

import torch

MAX_ZIP_RATIO = 10      # torch writes zip entries uncompressed: together they are the file's size, not 10x it
_READ_CHUNK = 1 << 24   # bytes per readinto: a storage is read in place, never held twice

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    return storage.as_strided(size, stride, storage_offset)


def rebuild_parameter(data, *unused):
    # torch._utils._rebuild_parameter(data, requires_grad, backward_hooks): the plain tensor
    return data


TENSORS = {("torch", name): dtype for name, dtype in STORAGE_DTYPES.items()} | {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class Inert:
    """Stands in for a pickled object of an allowed class: keeps the pickled state, runs nothing."""

    state = None

    def __new__(cls, *args, **kwargs):      # pickle's NEWOBJ and REDUCE create it with the class's args
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):           # pickle's BUILD: what the object's __getstate__ returned
        self.state = state


def inert(module, name):
    """A new `Inert` subclass named after the global it stands in for."""
    return type(name, (Inert,), {"__module__": module, "__qualname__": name})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `<archive>/data.pkl`: the globals in `allowed` ({(module, name): stand-in}) and
    tensors read from the archive's storages, nothing else."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, allowed: dict, what: str):
        super().__init__(io.BytesIO(archive.read(prefix + "data.pkl")))
        self._archive, self._prefix, self._storages = archive, prefix, {}
        self._allowed, self._what = allowed, what

    def find_class(self, module, name):       # every global a pickle names comes through here
        if (module, name) in self._allowed:
            return self._allowed[module, name]
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}: {self._what}")

    def persistent_load(self, pid):
        # ("storage", dtype, key, location, numel) -> the flat tensor of <archive>/data/<key>; torch.save's
        # legacy format adds a sixth item, the view of the storage, None when the whole storage is meant
        if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is None:
            pid = pid[:5]
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, dtype, numel)
        elif self._storages[key].dtype != dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as two dtypes")
        return self._storages[key]

    def _read_storage(self, key, dtype, numel):
        name, size = f"{self._prefix}data/{key}", numel * dtype.itemsize
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is not in the archive") from None
        if info.file_size != size:  # checked before reading: the zip directory may claim gigabytes
            raise pickle.UnpicklingError(f"storage {key} is {info.file_size} bytes in the zip, but its "
                                         f"tensors need {numel} x {dtype.itemsize} = {size}")
        data, filled = bytearray(size), 0       # the only copy: filled in place, a chunk at a time
        with self._archive.open(info) as f:
            while filled < size and (n := f.readinto(memoryview(data)[filled: filled + _READ_CHUNK])):
                filled += n
        if filled != size:
            raise pickle.UnpicklingError(f"storage {key} unpacks to {filled} bytes, not its entry's {size}")
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def open_zip(path) -> zipfile.ZipFile:
    """The zip archive at path, refused before any entry is read if it is a zip bomb."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"cannot read {path} as a zip archive ({e}): PyTorch has saved zip files since 1.6; "
                         "re-save an older file with a current torch.save") from None
    unpacked, size = sum(info.file_size for info in archive.infolist()), os.path.getsize(path)
    if unpacked > MAX_ZIP_RATIO * size:
        archive.close()
        raise ValueError(f"{path}: its zip entries unpack to {unpacked} bytes, over {MAX_ZIP_RATIO}x the "
                         f"file's {size}; PyTorch stores them uncompressed, so this is no checkpoint (a zip "
                         "bomb?)")
    return archive


def torchscript_prefix(archive: zipfile.ZipFile):
    """'<name>/' of a TorchScript zip (a data.pkl beside constants.pkl), else None."""
    names = set(archive.namelist())
    for name in names:
        prefix = name[: -len("data.pkl")]
        if name.endswith("/data.pkl") and prefix.count("/") == 1 and prefix + "constants.pkl" in names:
            return prefix
    return None


def load(path, allowed: dict, what: str):
    """The object a torch.save zip file holds, its globals restricted to `allowed`; `what` ends the
    message that refuses any other ("official checkpoints need only tensors, ...")."""
    with open_zip(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a torch.save file ({len(pickles)} <name>/data.pkl entries, "
                             "not 1)")
        if torchscript_prefix(archive) is not None:
            raise ValueError(f"{path} is a TorchScript archive (it holds code), not a torch.save checkpoint")
        try:
            return RestrictedUnpickler(archive, pickles[0][: -len("data.pkl")], allowed, what).load()
        except Exception as e:  # untrusted bytes: whatever breaks, the file is bad
            raise ValueError(f"cannot read {path}: {' '.join(str(e).split())[:300]}") from None
