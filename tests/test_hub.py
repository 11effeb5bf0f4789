"""coop_min.hub: CLIP weights by name, from a local HTTP server standing in for OpenAI and Hugging Face.

The server serves a tiny random-init CLIP as OpenAI's plain state-dict .pt (under the sha256 that
hub's table is patched to name) and a tiny transformers.CLIPModel as a Hugging Face repository; the
converted files are compared tensor for tensor with what was served.
"""
import hashlib
import io
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from coop_min import hub
from coop_min.clip import CLIP, CLIPConfig, load_clip

TINY = CLIPConfig(32, 32, 1, 64, 8, 1, 77, 1000, 64, 1, 1)   # heads = width / 64, as convert infers them
NAME = "ViT-B/32"                                              # the OpenAI name the tests serve
HF_REPO = "org/tiny-clip"


class _Truncated(bytes):
    """A body served with a Content-Length larger than itself, then the connection closed."""


class _BrokenChunked(bytes):
    """A body served chunked, with the connection closed inside its first chunk."""


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


def _serve_openai(server, monkeypatch, data, sha256, body=None):
    """Serves data under OpenAI's path for NAME, with hub's table naming sha256; returns the path."""
    monkeypatch.setitem(hub._MODELS, NAME, f"https://openaipublic.azureedge.net/clip/models/{sha256}/ViT-B-32.pt")
    path = f"/clip/models/{sha256}/ViT-B-32.pt"
    server.routes[path] = data if body is None else body
    return path


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(model, directory) of a tiny transformers.CLIPModel saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1)
    config = transformers.CLIPConfig(text_config=dict(small, vocab_size=1000, max_position_embeddings=77),
                                     vision_config=dict(small, patch_size=8, image_size=32), projection_dim=32)
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


def test_openai_name_downloads_verifies_converts_and_loads(server, monkeypatch, openai_checkpoint, tmp_path, capsys):
    sd, data, sha256 = openai_checkpoint
    _serve_openai(server, monkeypatch, data, sha256)
    path = hub.resolve(NAME, cache=tmp_path)
    assert path == str(tmp_path / "clip" / "ViT-B-32.safetensors")
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["ViT-B-32.safetensors"]  # raw .pt deleted
    model = load_clip(path)
    assert model.config == TINY
    for key in ("token_embedding.weight", "visual.proj", "transformer.resblocks.0.attn.in_proj_weight"):
        torch.testing.assert_close(model.state_dict()[key], sd[key], rtol=0, atol=0)
    err = capsys.readouterr().err
    kb = f"{len(data) / 1e3:.1f}"                         # the tiny file is under 1 MB
    assert f"ViT-B-32.pt: {kb} / {kb} kB in " in err and "\r" not in err, err


def test_progress_updates_in_place_on_a_terminal_and_ends_with_one_line(server, monkeypatch, openai_checkpoint,
                                                                         tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    _, data, sha256 = openai_checkpoint
    _serve_openai(server, monkeypatch, data, sha256)
    monkeypatch.setattr("sys.stderr", Terminal())
    hub.resolve(NAME, cache=tmp_path)
    progress = hub.sys.stderr.getvalue().split("\n")[0]
    assert progress.startswith("\rViT-B-32.pt: ") and progress.endswith(" s"), progress


def test_second_call_uses_the_cache_without_network(server, monkeypatch, openai_checkpoint, tmp_path):
    _, data, sha256 = openai_checkpoint
    _serve_openai(server, monkeypatch, data, sha256)
    first = hub.resolve(NAME, cache=tmp_path)
    server.stop()
    assert hub.resolve(NAME, cache=tmp_path) == first
    assert len(server.hits) == 1


def test_digest_mismatch_deletes_the_download_and_says_so(server, monkeypatch, openai_checkpoint, tmp_path):
    _, data, _ = openai_checkpoint
    _serve_openai(server, monkeypatch, data, "0" * 64)
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    assert "sha256" in message and "0" * 64 in message and "deleted" in message, message
    assert list((tmp_path / "clip").iterdir()) == []


@pytest.mark.parametrize("broken", [_Truncated, _BrokenChunked])
def test_dropped_connection_leaves_nothing_and_the_next_call_retries(server, monkeypatch, openai_checkpoint,
                                                                      tmp_path, broken):
    _, data, sha256 = openai_checkpoint
    path = _serve_openai(server, monkeypatch, data, sha256, body=broken(data))
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(NAME, cache=tmp_path)
    message = _one_line(excinfo)
    assert "broke off" in message and "run again" in message and path in message, message
    assert list((tmp_path / "clip").iterdir()) == []
    server.routes[path] = data
    assert load_clip(hub.resolve(NAME, cache=tmp_path)).config == TINY


def _closed_port():
    with socket.socket() as s:   # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name, fetch", [(NAME, "ViT-B-32.pt"), (f"hf-hub:{HF_REPO}", "config.json")])
def test_no_network_names_the_url_the_file_and_the_convert_command(monkeypatch, tmp_path, name, fetch):
    base = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("COOP_MIN_OPENAI_BASE_URL", base)
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(name, cache=tmp_path)
    message = _one_line(excinfo)
    assert f"cannot reach {base}/" in message and fetch in message, message
    assert "python -m coop_min.weights.convert " in message and "--weights " in message, message
    assert list((tmp_path / "clip").iterdir()) == []


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


def test_openai_urls_are_openais_with_the_mirror_as_host(monkeypatch):
    monkeypatch.setenv("COOP_MIN_OPENAI_BASE_URL", "http://mirror.example/openai/")
    assert len(hub._MODELS) == 9
    for name, url in hub._MODELS.items():
        sha256, file = url.removeprefix("https://openaipublic.azureedge.net/clip/models/").split("/")
        assert len(sha256) == 64 and int(sha256, 16) >= 0 and file == name.replace("/", "-").replace("@", "-") + ".pt"
        assert hub._openai_url(name) == f"http://mirror.example/openai/clip/models/{sha256}/{file}"


def test_hf_hub_downloads_config_and_safetensors_converts_and_loads(server, hf_model, tmp_path):
    model, directory = hf_model
    for file in ("config.json", "model.safetensors"):
        server.routes[_hf_path(file)] = (directory / file).read_bytes()
    path = hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert path == str(tmp_path / "clip" / "hf-hub--org--tiny-clip.safetensors")
    assert [p.name for p in (tmp_path / "clip").iterdir()] == ["hf-hub--org--tiny-clip.safetensors"]
    assert not any("pytorch_model.bin" in hit for hit in server.hits)
    ours = load_clip(path).state_dict()
    torch.testing.assert_close(ours["token_embedding.weight"], model.text_model.embeddings.token_embedding.weight,
                               rtol=0, atol=0)
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


def test_hf_hub_repository_without_weights_is_one_line_and_leaves_nothing(server, hf_model, tmp_path):
    _, directory = hf_model
    server.routes[_hf_path("config.json")] = (directory / "config.json").read_bytes()
    with pytest.raises(ValueError) as excinfo:
        hub.resolve(f"hf-hub:{HF_REPO}", cache=tmp_path)
    assert "pytorch_model.bin answered HTTP 404" in _one_line(excinfo)
    assert list((tmp_path / "clip").iterdir()) == []
