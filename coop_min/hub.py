"""CLIP weights by name: downloaded once into the cache, verified, converted, and found there afterwards.

    from coop_min import hub
    clip, preprocess = hub.load("ViT-B/16")   # as OpenAI's clip.load (also coop_min.load)
    path = hub.resolve("ViT-B/16")            # <cache>/clip/ViT-B-16.safetensors, for clip.load_clip
    path = hub.resolve("hf-hub:openai/clip-vit-base-patch16")
                                              # <cache>/clip/hf-hub--openai--clip-vit-base-patch16.safetensors

A name is one of OpenAI's nine, as openai/CLIP's clip.load names them (RN50 ... ViT-L/14@336px). OpenAI's
own URLs (`_MODELS`) answer HTTP 404 now (openai/CLIP issue #516), so a name comes, as open_clip's "openai"
weights do, from timm's Hugging Face mirror of it (`_MIRRORS`): open_clip_model.safetensors, else (HTTP 404)
open_clip_pytorch_model.bin, at the revision public projects pin where they do (else main), in OpenAI's key
layout and converted as QuickGELU. OpenAI's URL stays the fallback when the mirror fails. `hf-hub:ORG/NAME`
is a Hugging Face CLIPModel repository (config.json and model.safetensors, else pytorch_model.bin, at main).

Verification: a file from the Hub is checked against the sha256 the Hub sends with every LFS file (the
X-Linked-Etag of its resolve response), and a name's file also against the sha256 recorded here (in
OpenAI's URL; in `_MIRRORS` where one is published). A mismatch deletes the download and says so.

By hand (offline, or where the Hub is blocked): every error names the URLs for its name, e.g. for ViT-B/16
   https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/<revision>/open_clip_model.safetensors
(or OpenAI's ViT-B-16.pt); convert it, then pass the result as --weights or put it in <cache>/clip/:
   python -m coop_min.weights.convert open_clip_model.safetensors ViT-B-16.safetensors --quickgelu

Cache layout, <cache> being cache_dir() ($COOP_MIN_CACHE, else $XDG_CACHE_HOME/coop_min, else
~/.cache/coop_min) or the `cache` argument:
    <cache>/clip/ViT-B-16.safetensors             converted weights (OpenAI's file name); their presence
    <cache>/clip/hf-hub--ORG--NAME.safetensors    is the cache hit, and the network is not used
    <cache>/clip/<download>.tmp<pid>              a download in progress, renamed once complete and verified
    <cache>/clip/<download>                       a complete download: ViT-B-16.open_clip_model.safetensors,
                                                  ViT-B-16.open_clip_pytorch_model.bin, ViT-B-16.pt (OpenAI's)
                                                  or hf-hub--ORG--NAME/; deleted once converted, kept when the
                                                  conversion fails (the next call converts it, offline)

Environment:
    HF_ENDPOINT                replaces https://huggingface.co, as in huggingface_hub (a mirror)
    COOP_MIN_OPENAI_BASE_URL   replaces https://openaipublic.azureedge.net in OpenAI's URLs (a mirror)
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

import torch

from coop_min.cli import one_line
from coop_min.clip import load_clip
from coop_min.files import atomic_write
from coop_min.transforms import image_transform
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

# The same weights where open_clip loads them now (mlfoundations/open_clip src/open_clip/pretrained.py,
# commit 89fb801: the hf_hub of each model's "openai" tag, all quick_gelu=True).
# name: (repository, revision, sha256 of open_clip_model.safetensors at that revision, or None).
# Revisions and digests as public projects on GitHub pin them (found by searching their code for these
# repositories and digests); each digest is the Hub's LFS sha256, by which a Hub cache names the file's
# blob. Where none is published: main, and the X-Linked-Etag alone checks the file.
_MIRRORS = {
    # two projects' download specs (resolve/<revision>/open_clip_model.safetensors, 408,291,932 bytes)
    "RN50": ("timm/resnet50_clip.openai", "ec3d92cf63a5f9d591f0d611b736895966c73076",
             "da0baa37fb2211eee5729ab69ed587eb10d48f5b7076ceeed01552fc3d4cb4ee"),
    "RN101": ("timm/resnet101_clip.openai", "main", None),          # none published
    "RN50x4": ("timm/resnet50x4_clip.openai", "main", None),        # none published
    "RN50x16": ("timm/resnet50x16_clip.openai", "main", None),      # none published
    "RN50x64": ("timm/resnet50x64_clip.openai", "main", None),      # none published
    # a project's record of the Hub API at this revision (lfs.sha256, 605,143,284 bytes), and others
    "ViT-B/32": ("timm/vit_base_patch32_clip_224.openai", "a6f597a30f7b82c51704746581f9a4e41421e878",
                 "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31"),
    # several projects' pinned model specs and reports (598,516,980 bytes)
    "ViT-B/16": ("timm/vit_base_patch16_clip_224.openai", "977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
                 "4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f"),
    # a Hub cache listing (blobs/<sha256> beside snapshots/<revision>/open_clip_model.safetensors), and others
    "ViT-L/14": ("timm/vit_large_patch14_clip_224.openai", "18d0535469bb561bf468d76c1d73aa35156c922b",
                 "9ce2e8a8ebfff3793d7d375ad6d3c35cb9aebf3de7ace0fc7308accab7cd207e"),
    # a setup script laying the Hub cache out as blobs/<sha256>, and a pinned spec (1,711,828,444 bytes)
    "ViT-L/14@336px": ("timm/vit_large_patch14_clip_336.openai", "81e38efc4637de5023b10e75a7f9bd1c6fa6b010",
                       "fbc415c3d0d7b79faed8f5ccfb740c32b7c4f5ffe7283b851f89c6231c01a8e0"),
}
_MIRROR_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")   # the .bin on HTTP 404
NAMES = tuple(_MODELS)                                           # what --weights takes besides files
_OPENAI_HOST = "https://openaipublic.azureedge.net"
_HF_ENDPOINT = "https://huggingface.co"
_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")   # ORG/NAME, as the Hub allows them
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TIMEOUT_S = 60          # per socket operation, not for the whole download
_PROGRESS_EVERY_S = 0.25


def cache_dir():
    """$COOP_MIN_CACHE, else $XDG_CACHE_HOME/coop_min, else ~/.cache/coop_min (the demo data's too)."""
    if os.environ.get("COOP_MIN_CACHE"):
        return os.environ["COOP_MIN_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "coop_min")


class _NotFound(ValueError):
    """HTTP 404: for a Hugging Face repository, the cue to try the next weight file."""


def load(name_or_path, device=None):
    """(CLIP, preprocess) as OpenAI's clip.load: a converted file, one of OpenAI's names or hf-hub:ORG/NAME.

    device None is "cuda" when available, else "cpu"; preprocess is image_transform at the model's
    input resolution."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_clip(resolve(name_or_path), device)
    return model, image_transform(model.config.image_resolution)


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
    if repo:
        safe = "hf-hub--" + repo.replace("/", "--")
    else:   # OpenAI's file name: ViT-B-16, ViT-L-14-336px
        safe = os.path.basename(_openai_path(name_or_path, folder)).removesuffix(".pt")
    dst = os.path.join(folder, safe + ".safetensors")
    if os.path.isfile(dst):
        return dst
    if repo:
        _convert(_fetch_hf(repo, folder, safe, dst), dst, gelu=None)   # config.json states the activation
    else:
        _convert(_fetch_name(name_or_path, folder, safe, dst), dst, gelu=False)   # OpenAI's: QuickGELU
    print(f"converted {name_or_path} to {dst}", file=sys.stderr)
    return dst


def _convert(src, dst, gelu):
    """src -> dst, then src is deleted; a src that fails to convert is kept, and the next call converts it
    again without downloading (whatever failed, e.g. a full disk, may be gone by then)."""
    flag = " --quickgelu" if gelu is False else ""
    try:
        convert(src, dst, gelu=gelu)
    except Exception as e:   # the converter's errors are many; each is this download's, said in one line
        reason = one_line(e)
        raise ValueError(f"cannot convert {src} ({reason}); kept it, so the next run converts it without "
                         "downloading (delete it to download again), or run: "
                         + _convert_command(src, dst, flag)) from e
    if os.path.isdir(src):
        shutil.rmtree(src)
    else:
        os.remove(src)


def _fetch_name(name, folder, safe, dst):
    """A complete, verified download of name's weights in folder: one kept from a call whose conversion
    failed, else the mirror's (its safetensors, else its .bin), else OpenAI's archive."""
    kept = [os.path.join(folder, f"{safe}.{file}") for file in _MIRROR_FILES] + [_openai_path(name, folder)]
    for path in kept:
        if os.path.isfile(path):   # only complete, verified downloads have their final name
            return path
    try:
        return _fetch_mirror(name, folder, safe)
    except ValueError as e:
        mirror_error = one_line(e)
    print(f"{name}: {mirror_error}; trying OpenAI's URL", file=sys.stderr)
    try:
        return _download(_openai_url(name), _openai_path(name, folder), _MODELS[name].rsplit("/", 2)[1])
    except ValueError as e:
        mirror, openai = _mirror_url(name, _MIRROR_FILES[0]), _openai_url(name)
        command = _convert_command(_MIRROR_FILES[0], dst, " --quickgelu")
        raise ValueError(f"cannot download {name}: {mirror_error}; and {e}; fetch by hand {mirror} "
                         f"(or OpenAI's {openai}), then run: {command}") from None


def _fetch_mirror(name, folder, safe):
    """Downloads name's weights from its Hugging Face mirror: the safetensors file, or on HTTP 404 the .bin
    (some repositories hold only the pickled state dict; the digest in _MIRRORS is the safetensors')."""
    _, _, sha256 = _MIRRORS[name]
    safetensors, pickled = _MIRROR_FILES
    path = os.path.join(folder, f"{safe}.{safetensors}")
    try:
        return _download(_mirror_url(name, safetensors), path, sha256)
    except _NotFound as e:
        missing = e
    try:
        return _download(_mirror_url(name, pickled), os.path.join(folder, f"{safe}.{pickled}"))
    except _NotFound:
        raise _NotFound(f"{missing}, and so did the {pickled} beside it") from None


def _hf_endpoint():
    return (os.environ.get("HF_ENDPOINT") or _HF_ENDPOINT).rstrip("/")


def _mirror_url(name, file):
    repo, revision, _ = _MIRRORS[name]
    return f"{_hf_endpoint()}/{repo}/resolve/{revision}/{file}"


def _openai_url(name):
    base = os.environ.get("COOP_MIN_OPENAI_BASE_URL")
    return base.rstrip("/") + _MODELS[name].removeprefix(_OPENAI_HOST) if base else _MODELS[name]


def _openai_path(name, folder):
    return os.path.join(folder, _MODELS[name].rsplit("/", 1)[1])


def _fetch_hf(repo, folder, safe, dst):
    """A Hugging Face CLIPModel repository's config.json and weights in folder/safe/: kept from a call whose
    conversion failed, else downloaded into a temporary folder that is renamed once complete."""
    directory = os.path.join(folder, safe)
    if os.path.isdir(directory):
        return directory
    base = f"{_hf_endpoint()}/{repo}/resolve/main/"
    tmp = f"{directory}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        _download(base + "config.json", os.path.join(tmp, "config.json"))
        try:
            _download(base + "model.safetensors", os.path.join(tmp, "model.safetensors"))
        except _NotFound:   # older repositories hold only the pickled weights
            _download(base + "pytorch_model.bin", os.path.join(tmp, "pytorch_model.bin"))
        os.replace(tmp, directory)
    except ValueError as e:
        raise ValueError(f"{e}; fetch config.json and model.safetensors (or pytorch_model.bin) from {base} "
                         f"by hand into a folder {safe}, then run: {_convert_command(safe, dst)}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return directory


def _convert_command(src, dst, flags=""):
    return f"python -m coop_min.weights.convert {src} {dst}{flags}, and pass --weights {dst}"


class _LinkedEtag(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, keeping the sha256 the Hub sends with an LFS file: the X-Linked-Etag
    header of its resolve response, a redirect to the storage (whose own response does not carry it)."""

    def __init__(self):
        self.sha256 = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.sha256 = _linked_sha256(headers) or self.sha256
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _linked_sha256(headers):
    """The sha256 in an X-Linked-Etag header ("<sha256>" or W/"<sha256>"), else None (e.g. a non-LFS file)."""
    etag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"').lower()
    return etag if _SHA256.fullmatch(etag) else None


def _download(url, path, sha256=None):
    """url -> path, atomically, checked against sha256 if given and against the X-Linked-Etag if the server
    sends one; returns path. Every failure is one ValueError line and leaves no file behind."""
    linked = _LinkedEtag()
    try:
        response = urllib.request.build_opener(linked).open(url, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        error = _NotFound if e.code == 404 else ValueError
        raise error(f"{url} answered HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:   # URLError (DNS, refused), a timeout, a closed socket
        reason = getattr(e, "reason", None) or e
        raise ValueError(f"cannot reach {url} ({one_line(reason)})") from None
    linked_sha256 = _linked_sha256(response.headers) or linked.sha256   # a server that did not redirect
    expected = [(sha256, "recorded for it in coop_min/hub.py"),
                (linked_sha256, "the server sent with it (X-Linked-Etag)")]

    def write(tmp):
        with response, open(tmp, "wb") as f:
            got = _copy(response, f, url, os.path.basename(path))
        for want, where in expected:
            if want is not None and got != want:
                raise ValueError(f"{url}: the download's sha256 is {got}, not the {want} {where}; deleted it "
                                 "(a corrupt transfer or a wrong mirror): run again to retry")
    atomic_write(path, write)   # a failed write or check removes the temporary file
    return path


def _copy(response, f, url, label):
    """The body of response into f, with a progress line on stderr; returns its sha256."""
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
        reason = one_line(e)
        raise ValueError(f"download of {url} broke off at {_sizes(done, total)} ({reason}); "
                         "nothing was kept: run again to retry") from None
    lead = "\r" if tty else ""
    seconds = time.monotonic() - start
    print(f"{lead}{label}: {_sizes(done, total)} in {seconds:.1f} s", file=sys.stderr, flush=True)
    return h.hexdigest()


def _sizes(done, total):
    """'12.3 / 338.0 MB': the bytes done and, when known, the total, in the unit of the larger."""
    largest = max(done, total or 0)
    scale, unit = (1e9, "GB") if largest >= 1e9 else (1e6, "MB") if largest >= 1e6 else (1e3, "kB")
    return f"{done / scale:.1f} / {total / scale:.1f} {unit}" if total else f"{done / scale:.1f} {unit}"
