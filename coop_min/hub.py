"""CLIP weights by name: downloaded once into the cache, converted, and found there afterwards.

    from coop_min.hub import resolve
    path = resolve("ViT-B/16")        # <cache>/clip/ViT-B-16.safetensors
    path = resolve("hf-hub:openai/clip-vit-base-patch16")    # .../hf-hub--openai--clip-vit-base-patch16.safetensors
    model = coop_min.clip.load_clip(path)

A name is one of OpenAI's (the `_MODELS` of openai/CLIP's clip/clip.py; each file is checked against
the sha256 in its URL) or `hf-hub:ORG/NAME`, a Hugging Face CLIPModel repository (config.json and
model.safetensors, else pytorch_model.bin; Hugging Face URLs carry no digest, so these are not
checked). The download is converted with coop_min.weights.convert and then deleted.

Cache layout, <cache> being cache_dir() ($COOP_MIN_CACHE, else $XDG_CACHE_HOME/coop_min, else
~/.cache/coop_min) or the `cache` argument:
    <cache>/clip/ViT-B-16.safetensors             converted weights (OpenAI's file name); their presence
    <cache>/clip/hf-hub--ORG--NAME.safetensors    is the cache hit, and the network is not used
    <cache>/clip/<file>.tmp<pid>                  a download in progress, renamed once complete and verified
    <cache>/clip/ViT-B-16.pt, hf-hub--ORG--NAME/  complete downloads, deleted once converted

Environment:
    COOP_MIN_OPENAI_BASE_URL   replaces https://openaipublic.azureedge.net in OpenAI's URLs (a mirror)
    HF_ENDPOINT                replaces https://huggingface.co, as in huggingface_hub
    http_proxy, https_proxy    honoured, as urllib always does
"""
import hashlib
import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request

from coop_min.files import atomic_write
from coop_min.weights.convert import convert

# openai/CLIP clip/clip.py, commit d05afc4; the path segment before the file name is its sha256
_MODELS = {
    "RN50": "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": "https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": "https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": "https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": "https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
NAMES = tuple(_MODELS)                                           # what --weights takes besides files
_OPENAI_HOST = "https://openaipublic.azureedge.net"
_HF_ENDPOINT = "https://huggingface.co"
_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")   # ORG/NAME, as the Hub allows them
_TIMEOUT_S = 60          # per socket operation, not for the whole download
_PROGRESS_EVERY_S = 0.25


def cache_dir():
    """$COOP_MIN_CACHE, else $XDG_CACHE_HOME/coop_min, else ~/.cache/coop_min (the demo data goes there too)."""
    if os.environ.get("COOP_MIN_CACHE"):
        return os.environ["COOP_MIN_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "coop_min")


class _NotFound(ValueError):
    """HTTP 404: for a Hugging Face repository, the cue to try the next weight file."""


def resolve(name_or_path, cache=None) -> str:
    """The path of a CLIP safetensors file for a file path (as is), an OpenAI name or hf-hub:ORG/NAME."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        return name_or_path
    repo = name_or_path.removeprefix("hf-hub:") if name_or_path.startswith("hf-hub:") else None
    if repo is not None and (not _HF_REPO.fullmatch(repo) or ".." in repo):
        raise ValueError(f"{name_or_path!r} is not hf-hub:ORG/NAME (letters, digits, '-', '_', '.')")
    if repo is None and name_or_path not in _MODELS:
        raise ValueError(f"unknown CLIP weights {name_or_path!r}: no such file, nor one of OpenAI's names "
                         f"({', '.join(_MODELS)}), nor hf-hub:ORG/NAME (a Hugging Face CLIPModel repository)")
    folder = os.path.join(cache or cache_dir(), "clip")
    os.makedirs(folder, exist_ok=True)
    safe = "hf-hub--" + repo.replace("/", "--") if repo else _MODELS[name_or_path].rsplit("/", 1)[1].removesuffix(".pt")
    dst = os.path.join(folder, safe + ".safetensors")
    if os.path.isfile(dst):
        return dst
    src = _fetch_hf(repo, folder, safe, dst) if repo else _fetch_openai(name_or_path, folder, dst)
    try:
        convert(src, dst)
    finally:   # only the safetensors file stays; a download that does not convert would not next time either
        if os.path.isdir(src):
            shutil.rmtree(src)
        else:
            os.remove(src)
    print(f"converted {name_or_path} to {dst}", file=sys.stderr)
    return dst


def _openai_url(name):
    base = os.environ.get("COOP_MIN_OPENAI_BASE_URL")
    return base.rstrip("/") + _MODELS[name].removeprefix(_OPENAI_HOST) if base else _MODELS[name]


def _fetch_openai(name, folder, dst):
    """Downloads OpenAI's archive for name into folder, verified against the sha256 in its URL."""
    url = _openai_url(name)
    sha256, file = url.rsplit("/", 2)[1:]
    manual = f"offline, fetch that file by hand as {file}, then run: " + _convert_command(file, dst)
    path = os.path.join(folder, file)
    _download(url, path, manual, sha256)
    return path


def _fetch_hf(repo, folder, safe, dst):
    """Downloads a Hugging Face CLIPModel repository's config.json and weights into folder/safe/."""
    base = f"{(os.environ.get('HF_ENDPOINT') or _HF_ENDPOINT).rstrip('/')}/{repo}/resolve/main/"
    directory = os.path.join(folder, safe)
    manual = (f"offline, fetch config.json and model.safetensors (or pytorch_model.bin) from {base} by hand "
              f"into a folder {safe}, then run: " + _convert_command(safe, dst))
    os.makedirs(directory, exist_ok=True)
    try:
        _download(base + "config.json", os.path.join(directory, "config.json"), manual)
        try:
            _download(base + "model.safetensors", os.path.join(directory, "model.safetensors"), manual)
        except _NotFound:   # older repositories hold only the pickled weights
            _download(base + "pytorch_model.bin", os.path.join(directory, "pytorch_model.bin"), manual)
    except BaseException:
        shutil.rmtree(directory)
        raise
    return directory


def _convert_command(src, dst):
    return f"python -m coop_min.weights.convert {src} {dst}, and pass --weights {dst}"


def _download(url, path, manual, sha256=None):
    """url -> path, atomically and checked against sha256 if given; every failure is one ValueError line."""
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        error = _NotFound if e.code == 404 else ValueError
        raise error(f"{url} answered HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:   # URLError (DNS, refused), a timeout, a closed socket
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"cannot reach {url} ({' '.join(str(reason).split())}); {manual}") from None

    def write(tmp):
        with response, open(tmp, "wb") as f:
            got = _copy(response, f, url)
        if sha256 is not None and got != sha256:
            raise ValueError(f"{url}: the download's sha256 is {got}, not the {sha256} in its URL; deleted it "
                             "(a corrupt transfer or a wrong mirror): run again to retry")
    atomic_write(path, write)   # a failed write removes the temporary file


def _copy(response, f, url):
    """The body of response into f, with a progress line on stderr; returns its sha256."""
    label = url.rsplit("/", 1)[1]
    total = int(response.headers.get("Content-Length") or 0) or None
    tty = sys.stderr.isatty()   # update in place on a terminal; a log gets the final line only
    h, done, start, shown = hashlib.sha256(), 0, time.monotonic(), 0.0
    try:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            h.update(chunk)
            done += len(chunk)
            if tty and time.monotonic() - shown >= _PROGRESS_EVERY_S:
                shown = time.monotonic()
                print(f"\r{label}: {_sizes(done, total)}", end="", file=sys.stderr, flush=True)
        if total is not None and done < total:   # http.client reads a closed connection as the end
            raise ConnectionError("the connection closed early")
    except (OSError, http.client.HTTPException) as e:
        if tty:
            print(file=sys.stderr)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"download of {url} broke off at {_sizes(done, total)} ({reason}); "
                         "nothing was kept: run again to retry") from None
    lead = "\r" if tty else ""
    print(f"{lead}{label}: {_sizes(done, total)} in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
    return h.hexdigest()


def _sizes(done, total):
    """'12.3 / 338.0 MB': the bytes done and, when known, the total, in the unit of the larger."""
    largest = max(done, total or 0)
    scale, unit = (1e9, "GB") if largest >= 1e9 else (1e6, "MB") if largest >= 1e6 else (1e3, "kB")
    return f"{done / scale:.1f} / {total / scale:.1f} {unit}" if total else f"{done / scale:.1f} {unit}"
