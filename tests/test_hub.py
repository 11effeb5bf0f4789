"""coop_min.hub: CLIP weights by name, from a local HTTP server standing in for Hugging Face and OpenAI.

The server serves a tiny random-init CLIP as the Hub serves timm's mirror of an OpenAI model (a redirect
carrying the file's sha256 in X-Linked-Etag, then the bytes), as OpenAI's plain state-dict .pt (under the
sha256 that hub's table is patched to name), and a tiny transformers.CLIPModel as a Hugging Face repository;
the converted files are compared tensor for tensor with what was served. The name tables are compared with
literal copies of their upstream sources, so that a changed digit fails.
"""
import dataclasses
import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from coop_min import hub
from coop_min.clip import CLIP, CLIPConfig, load_clip
from coop_min.weights.convert import convert

TINY = CLIPConfig(32, 32, 1, 64, 8, 1, 77, 1000, 64, 1, 1)   # heads = width / 64, as convert infers them
NAME = "ViT-B/32"                                              # the OpenAI name the tests serve
HF_REPO = "org/tiny-clip"
SAFETENSORS, BIN = "open_clip_model.safetensors", "open_clip_pytorch_model.bin"

# openai/CLIP clip/clip.py at commit d05afc4, `_MODELS` copied literally
OPENAI_MODELS = {
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

# mlfoundations/open_clip src/open_clip/pretrained.py at commit 89fb801: the hf_hub of each model's
# "openai" tag, copied literally (open_clip's model names), and OpenAI's name for each of those models
OPEN_CLIP_OPENAI_HF_HUB = {
    "RN50": "timm/resnet50_clip.openai/",
    "RN101": "timm/resnet101_clip.openai/",
    "RN50x4": "timm/resnet50x4_clip.openai/",
    "RN50x16": "timm/resnet50x16_clip.openai/",
    "RN50x64": "timm/resnet50x64_clip.openai/",
    "ViT-B-32": "timm/vit_base_patch32_clip_224.openai/",
    "ViT-B-16": "timm/vit_base_patch16_clip_224.openai/",
    "ViT-L-14": "timm/vit_large_patch14_clip_224.openai/",
    "ViT-L-14-336": "timm/vit_large_patch14_clip_336.openai/",
}
OPEN_CLIP_NAME = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16",
                  "RN50x64": "RN50x64", "ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16",
                  "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}

# (revision, sha256 of open_clip_model.safetensors) as public projects pin them (the sources are named in
# hub._MIRRORS), copied; the other names are unpinned: main, checked by X-Linked-Etag alone
PINNED = {
    "RN50": ("ec3d92cf63a5f9d591f0d611b736895966c73076",
             "da0baa37fb2211eee5729ab69ed587eb10d48f5b7076ceeed01552fc3d4cb4ee"),
    "ViT-B/32": ("a6f597a30f7b82c51704746581f9a4e41421e878",
                 "e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31"),
    "ViT-B/16": ("977e3dd0ec55ab8da155f2fbeb6b5f54948b6e3d",
                 "4b8699299b1e8997753c64b052ba32031449d5d853f55a039148560ee02b820f"),
    "ViT-L/14": ("18d0535469bb561bf468d76c1d73aa35156c922b",
                 "9ce2e8a8ebfff3793d7d375ad6d3c35cb9aebf3de7ace0fc7308accab7cd207e"),
    "ViT-L/14@336px": ("81e38efc4637de5023b10e75a7f9bd1c6fa6b010",
                       "fbc415c3d0d7b79faed8f5ccfb740c32b7c4f5ffe7283b851f89c6231c01a8e0"),
}


class _Truncated(bytes):
    """A body served with a Content-Length larger than itself, then the connection closed."""


class _BrokenChunked(bytes):
    """A body served chunked, with the connection closed inside its first chunk."""


@dataclasses.dataclass
class _Redirect:
    """A 302 to location carrying X-Linked-Etag: "<sha256>", as the Hub answers a resolve of an LFS file."""
    location: str
    sha256: str


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server behind both COOP_MIN_OPENAI_BASE_URL and HF_ENDPOINT: .routes and .hits."""
    routes, hits = {}, []

    class Handler(BaseHTTPRequestHandler):   # HTTP/1.0: one request per connection, closed after it
        def do_GET(self):
            hits.append(self.path)
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            if isinstance(body, _Redirect):
                self.send_response(302)
                self.send_header("Location", body.location)
                self.send_header("X-Linked-Etag", f'"{body.sha256}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            if isinstance(body, _BrokenChunked):
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(body) + body[: len(body) // 2])
                return
            self.send_header("Content-Length", str(len(body) + (1000 if isinstance(body, _Truncated) else 0)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if isinstance(body, _Truncated) else body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    monkeypatch.setenv("COOP_MIN_OPENAI_BASE_URL", url)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("no_proxy", "127.0.0.1")           # a proxy in the environment must not see these

    def stop():
        httpd.shutdown()
        httpd.server_close()

    yield SimpleNamespace(routes=routes, hits=hits, url=url, stop=stop)
    if httpd.socket.fileno() != -1:
        stop()


@pytest.fixture(scope="module")
def openai_checkpoint():
    """(state dict, its torch.save bytes, their sha256) of a tiny random-init CLIP."""
    torch.manual_seed(0)
    sd = CLIP(TINY).state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    data = buffer.getvalue()
    return sd, data, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def mirror_checkpoint(openai_checkpoint):
    """(state dict, safetensors bytes, their sha256): the same tiny CLIP as open_clip_model.safetensors."""
    sd = openai_checkpoint[0]
    data = safetensors_bytes({k: v.contiguous() for k, v in sd.items()})
    return sd, data, hashlib.sha256(data).hexdigest()


def _serve_openai(server, monkeypatch, data, sha256, body=None):
    """Serves data under OpenAI's path for NAME, with hub's table naming sha256; returns the path."""
    monkeypatch.setitem(hub._MODELS, NAME, f"https://openaipublic.azureedge.net/clip/models/{sha256}/ViT-B-32.pt")
    path = f"/clip/models/{sha256}/ViT-B-32.pt"
    server.routes[path] = data if body is None else body
    return path


def _mirror_path(file, name=NAME):
    repo, revision, _ = hub._MIRRORS[name]
    return f"/{repo}/resolve/{revision}/{file}"


def _pin(monkeypatch, sha256):
    """hub's table pins sha256 for NAME's safetensors (the published digest is not the tiny CLIP's)."""
    repo, revision, _ = hub._MIRRORS[NAME]
    monkeypatch.setitem(hub._MIRRORS, NAME, (repo, revision, sha256))


def _serve_lfs(server, path, data, sha256):
    """Serves data at path as the Hub serves an LFS file: a redirect with X-Linked-Etag, then the storage."""
    server.routes[path] = _Redirect("/storage" + path, sha256)
    server.routes["/storage" + path] = data


def _serve_mirror(server, monkeypatch, mirror_checkpoint):
    """Serves the tiny CLIP as NAME's mirror safetensors (pinned, linked to its sha256); returns the path."""
    _, data, sha256 = mirror_checkpoint
    _pin(monkeypatch, sha256)
    path = _mirror_path(SAFETENSORS)
    _serve_lfs(server, path, data, sha256)
    return path


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(model, directory) of a tiny transformers.CLIPModel saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1)
    config = transformers.CLIPConfig(text_config=dict(small, vocab_size=1000, max_position_embeddings=77),
                                     vision_config=dict(small, patch_size=8, image_size=32),
                                     projection_dim=32)
    model = transformers.CLIPModel._from_config(config).eval()
    directory = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(directory)
    return model, directory


def _hf_path(file):
    return f"/{HF_REPO}/resolve/main/{file}"


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _files(tmp_path):
    return sorted(p.name for p in (tmp_path / "clip").iterdir())


def _assert_same_weights(path, sd):
    model = load_clip(path)
    assert model.config == TINY
    for key in ("token_embedding.weight", "visual.proj", "transformer.resblocks.0.attn.in_proj_weight"):
        torch.testing.assert_close(model.state_dict()[key], sd[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# the tables


def test_openai_urls_are_openais_with_the_mirror_as_host(monkeypatch):
    assert hub._MODELS == OPENAI_MODELS
    monkeypatch.setenv("COOP_MIN_OPENAI_BASE_URL", "http://mirror.example/openai/")
    for name, url in OPENAI_MODELS.items():
        path = url.removeprefix("https://openaipublic.azureedge.net")
        assert hub._openai_url(name) == "http://mirror.example/openai" + path


def test_mirrors_are_open_clips_repositories_for_openais_weights():
    assert hub.NAMES == tuple(OPENAI_MODELS) and set(hub._MIRRORS) == set(OPENAI_MODELS)
    repos = {OPEN_CLIP_NAME[name]: repo + "/" for name, (repo, _, _) in hub._MIRRORS.items()}
    assert repos == OPEN_CLIP_OPENAI_HF_HUB


def test_mirror_revisions_and_digests_are_the_published_ones_else_main():
    pinned = {name: (revision, sha256) for name, (_, revision, sha256) in hub._MIRRORS.items() if sha256}
    assert pinned == PINNED
    assert all(revision == "main" for name, (_, revision, _) in hub._MIRRORS.items() if name not in PINNED)


@pytest.mark.parametrize("name", list(OPENAI_MODELS))
def test_each_name_asks_its_mirror_then_the_bin_then_openai_and_fails_in_one_line(server, tmp_path, name):
    repo = OPEN_CLIP_OPENAI_HF_HUB[OPEN_CLIP_NAME[name]].removesuffix("/")
    revision = PINNED.get(name, ("main",))[0]
    mirror = f"/{repo}/resolve/{revision}/{SAFETENSORS}"
    openai = OPENAI_MODELS[name].removeprefix("https://openaipublic.azureedge.net")
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(name, cache=tmp_path)
    assert server.hits == [mirror, f"/{repo}/resolve/{revision}/{BIN}", openai]
    message = _one_line(excinfo)
    assert f"fetch by hand {server.url}{mirror} (or OpenAI's {server.url}{openai})" in message, message
    dst = tmp_path / "clip" / (openai.rsplit("/", 1)[1].removesuffix(".pt") + ".safetensors")
    assert f"python -m coop_min.weights.convert {SAFETENSORS} {dst} --quickgelu" in message, message
    assert f"--weights {dst}" in message, message
    both = f"{mirror} answered HTTP 404 Not Found, and so did the {BIN} beside it; and {server.url}{openai} "
    assert both + "answered HTTP 404 Not Found" in message, message
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# a name, from its mirror


def test_a_name_comes_from_its_mirror_verified_converted_and_loads(server, monkeypatch, mirror_checkpoint,
                                                                   tmp_path, capsys):
    path = _serve_mirror(server, monkeypatch, mirror_checkpoint)
    dst = hub.resolve(NAME, cache=tmp_path)
    assert dst == str(tmp_path / "clip" / "ViT-B-32.safetensors")
    assert server.hits == [path, "/storage" + path]          # neither the .bin nor OpenAI is asked
    assert _files(tmp_path) == ["ViT-B-32.safetensors"]       # the download is deleted once converted
    _assert_same_weights(dst, mirror_checkpoint[0])
    err = capsys.readouterr().err
    kb = f"{len(mirror_checkpoint[1]) / 1e3:.1f}"            # the tiny file is under 1 MB
    assert f"ViT-B-32.{SAFETENSORS}: {kb} / {kb} kB in " in err and "\r" not in err, err
    assert "warning" not in err, err


def test_progress_updates_in_place_on_a_terminal_and_ends_with_one_line(server, monkeypatch,
                                                                         mirror_checkpoint, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    _serve_mirror(server, monkeypatch, mirror_checkpoint)
    monkeypatch.setattr("sys.stderr", Terminal())
    hub.resolve(NAME, cache=tmp_path)
    progress = hub.sys.stderr.getvalue().split("\n")[0]
    assert progress.startswith(f"\rViT-B-32.{SAFETENSORS}: ") and progress.endswith(" s"), progress


def test_second_call_uses_the_cache_without_network(server, monkeypatch, mirror_checkpoint, tmp_path):
    _serve_mirror(server, monkeypatch, mirror_checkpoint)
    first = hub.resolve(NAME, cache=tmp_path)
    hits = len(server.hits)
    server.stop()
    assert hub.resolve(NAME, cache=tmp_path) == first
    assert len(server.hits) == hits


def test_a_wrong_pinned_sha256_deletes_the_download_and_says_so(server, monkeypatch, mirror_checkpoint,
                                                                tmp_path):
    _, data, sha256 = mirror_checkpoint
    _pin(monkeypatch, "0" * 64)
    _serve_lfs(server, _mirror_path(SAFETENSORS), data, sha256)   # the Hub's own digest is right
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    assert f"sha256 is {sha256}, not the {'0' * 64} recorded for it in coop_min/hub.py; deleted it" in message
    assert _files(tmp_path) == []


def test_a_wrong_x_linked_etag_deletes_the_download_and_says_so(server, monkeypatch, mirror_checkpoint,
                                                                tmp_path):
    _, data, sha256 = mirror_checkpoint
    _pin(monkeypatch, None)                                       # as for the names no project pins
    _serve_lfs(server, _mirror_path(SAFETENSORS), data, "1" * 64)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    wrong = f"sha256 is {sha256}, not the {'1' * 64} the server sent with it (X-Linked-Etag); deleted it"
    assert wrong in message, message
    assert _files(tmp_path) == []


def test_a_404_for_the_safetensors_falls_back_to_the_bin(server, openai_checkpoint, tmp_path):
    sd, data, sha256 = openai_checkpoint          # torch.save of the state dict, as open_clip's .bin
    path = _mirror_path(BIN)
    _serve_lfs(server, path, data, sha256)
    dst = hub.resolve(NAME, cache=tmp_path)
    assert server.hits == [_mirror_path(SAFETENSORS), path, "/storage" + path]
    assert _files(tmp_path) == ["ViT-B-32.safetensors"]
    _assert_same_weights(dst, sd)


def test_a_404_at_the_mirror_falls_back_to_openais_url(server, monkeypatch, openai_checkpoint, tmp_path,
                                                       capsys):
    sd, data, sha256 = openai_checkpoint
    path = _serve_openai(server, monkeypatch, data, sha256)
    dst = hub.resolve(NAME, cache=tmp_path)
    assert server.hits == [_mirror_path(SAFETENSORS), _mirror_path(BIN), path]
    assert dst == str(tmp_path / "clip" / "ViT-B-32.safetensors")
    assert _files(tmp_path) == ["ViT-B-32.safetensors"]       # raw .pt deleted
    _assert_same_weights(dst, sd)
    err = capsys.readouterr().err
    assert f"answered HTTP 404 Not Found, and so did the {BIN} beside it; trying OpenAI's URL" in err, err
    kb = f"{len(data) / 1e3:.1f}"
    assert f"ViT-B-32.pt: {kb} / {kb} kB in " in err, err


def test_a_wrong_openai_digest_deletes_the_download_and_says_so(server, monkeypatch, openai_checkpoint,
                                                                tmp_path):
    _, data, _ = openai_checkpoint
    _serve_openai(server, monkeypatch, data, "0" * 64)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    assert f"not the {'0' * 64} recorded for it in coop_min/hub.py; deleted it" in message, message
    assert _files(tmp_path) == []


def test_a_failed_conversion_keeps_the_download_and_the_next_call_converts_it_offline(
        server, monkeypatch, mirror_checkpoint, tmp_path):
    _serve_mirror(server, monkeypatch, mirror_checkpoint)
    calls = []

    def disk_full_once(src, dst, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return convert(src, dst, **kwargs)

    monkeypatch.setattr(hub, "convert", disk_full_once)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    kept = tmp_path / "clip" / f"ViT-B-32.{SAFETENSORS}"
    message = _one_line(excinfo)
    assert f"cannot convert {kept} ([Errno 28] No space left on device); kept it" in message, message
    dst = kept.parent / "ViT-B-32.safetensors"
    assert f"python -m coop_min.weights.convert {kept} {dst} --quickgelu" in message, message
    assert _files(tmp_path) == [kept.name]
    server.stop()                                                 # the second call must not need the network
    _assert_same_weights(hub.resolve(NAME, cache=tmp_path), mirror_checkpoint[0])
    assert _files(tmp_path) == ["ViT-B-32.safetensors"]
    assert calls == [{"gelu": False}] * 2       # QuickGELU, stated: the converter does not warn


def test_load_gives_the_model_and_a_preprocess_at_its_resolution(server, monkeypatch, mirror_checkpoint,
                                                                  tmp_path):
    _serve_mirror(server, monkeypatch, mirror_checkpoint)
    monkeypatch.setenv("COOP_MIN_CACHE", str(tmp_path))
    model, preprocess = hub.load(NAME)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.config == TINY and next(model.parameters()).device.type == device
    image = preprocess(Image.new("RGB", (50, 40), (200, 30, 90)))
    assert image.shape == (3, TINY.image_resolution, TINY.image_resolution) and image.dtype == torch.float32
    assert model.encode_image(image[None].to(device)).shape == (1, TINY.embed_dim)
    same, _ = hub.load(tmp_path / "clip" / "ViT-B-32.safetensors", "cpu")   # a file is taken as it is
    assert same.config == TINY and next(same.parameters()).device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# failures that leave nothing behind


@pytest.mark.parametrize("broken", [_Truncated, _BrokenChunked])
def test_dropped_connection_leaves_nothing_and_the_next_call_retries(server, monkeypatch, openai_checkpoint,
                                                                      tmp_path, broken):
    _, data, sha256 = openai_checkpoint
    path = _serve_openai(server, monkeypatch, data, sha256, body=broken(data))
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    assert "broke off" in message and "run again" in message and path in message, message
    assert _files(tmp_path) == []
    server.routes[path] = data
    assert load_clip(hub.resolve(NAME, cache=tmp_path)).config == TINY


def _closed_port():
    with socket.socket() as s:   # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name, fetch", [(NAME, (_mirror_path(SAFETENSORS), "/clip/models/")),
                                         (f"hf-hub:{HF_REPO}", (_hf_path("config.json"),))])
def test_no_network_names_the_urls_the_files_and_the_convert_command(monkeypatch, tmp_path, name, fetch):
    base = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("COOP_MIN_OPENAI_BASE_URL", base)
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(name, cache=tmp_path)
    message = _one_line(excinfo)
    assert all(f"cannot reach {base}{path}" in message for path in fetch), message
    assert "python -m coop_min.weights.convert " in message and "--weights " in message, message
    assert _files(tmp_path) == []


def test_unknown_name_lists_the_known_names_and_the_hf_hub_form(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        hub.resolve("ViT-B/8", cache=tmp_path)
    message = _one_line(excinfo)
    assert all(name in message for name in hub._MODELS) and "hf-hub:ORG/NAME" in message, message


def test_an_existing_file_is_returned_as_is(tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"")
    assert hub.resolve(str(path), cache=tmp_path / "cache") == str(path)
    assert not (tmp_path / "cache").exists()


def test_sizes_are_shown_in_the_unit_of_the_larger():
    assert hub._sizes(12_300_000, 338_000_000) == "12.3 / 338.0 MB"
    assert hub._sizes(1_700_000_000, None) == "1.7 GB"
    assert hub._sizes(500, 760_400) == "0.5 / 760.4 kB"


# ----------------------------------------------------------------------------------------------
# hf-hub:ORG/NAME


def test_hf_hub_downloads_config_and_safetensors_converts_and_loads(server, hf_model, tmp_path):
    model, directory = hf_model
    for file in ("config.json", "model.safetensors"):
        server.routes[_hf_path(file)] = (directory / file).read_bytes()
    path = hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert path == str(tmp_path / "clip" / "hf-hub--org--tiny-clip.safetensors")
    assert _files(tmp_path) == ["hf-hub--org--tiny-clip.safetensors"]
    assert not any("pytorch_model.bin" in hit for hit in server.hits)
    ours = load_clip(path).state_dict()
    token_embedding = model.text_model.embeddings.token_embedding.weight
    torch.testing.assert_close(ours["token_embedding.weight"], token_embedding, rtol=0, atol=0)
    torch.testing.assert_close(ours["visual.proj"], model.visual_projection.weight.t(), rtol=0, atol=0)


def test_hf_hub_falls_back_to_pytorch_model_bin_on_404(server, hf_model, tmp_path):
    model, directory = hf_model
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    server.routes[_hf_path("config.json")] = (directory / "config.json").read_bytes()
    server.routes[_hf_path("pytorch_model.bin")] = buffer.getvalue()
    ours = load_clip(hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)).state_dict()
    assert server.hits == [_hf_path(f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
    torch.testing.assert_close(ours["text_projection"], model.text_projection.weight.t(), rtol=0, atol=0)


def test_hf_hub_weights_are_checked_against_their_x_linked_etag(server, hf_model, tmp_path):
    _, directory = hf_model
    server.routes[_hf_path("config.json")] = (directory / "config.json").read_bytes()
    weights = (directory / "model.safetensors").read_bytes()
    _serve_lfs(server, _hf_path("model.safetensors"), weights, "2" * 64)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert f"not the {'2' * 64} the server sent with it (X-Linked-Etag); deleted it" in _one_line(excinfo)
    assert _files(tmp_path) == []


def test_hf_hub_download_that_fails_to_convert_is_kept_for_the_next_call(server, monkeypatch, hf_model,
                                                                          tmp_path):
    _, directory = hf_model
    for file in ("config.json", "model.safetensors"):
        server.routes[_hf_path(file)] = (directory / file).read_bytes()
    def broken(src, dst, **kwargs):
        raise ValueError("broken")

    monkeypatch.setattr(hub, "convert", broken)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert "(broken); kept it" in _one_line(excinfo)
    assert _files(tmp_path) == ["hf-hub--org--tiny-clip"]
    assert sorted(p.name for p in (tmp_path / "clip" / "hf-hub--org--tiny-clip").iterdir()) == \
        ["config.json", "model.safetensors"]
    monkeypatch.setattr(hub, "convert", convert)
    server.stop()
    assert load_clip(hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)).config.embed_dim == 32
    assert _files(tmp_path) == ["hf-hub--org--tiny-clip.safetensors"]


def test_hf_hub_repository_without_weights_is_one_line_and_leaves_nothing(server, hf_model, tmp_path):
    _, directory = hf_model
    server.routes[_hf_path("config.json")] = (directory / "config.json").read_bytes()
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert "pytorch_model.bin answered HTTP 404" in _one_line(excinfo)
    assert _files(tmp_path) == []
