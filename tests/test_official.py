"""Official CoOp/CoCoOp checkpoints: read without running their pickles, and written for the official loader.

The checkpoints are written here as Dassl's `save_model` writes them (`_dassl_save`): the prompt
learner's state dict in fp16 with its token buffers, SGD's state dict, and the state dict of Dassl's
ConstantWarmupScheduler (transcribed below), which holds the pickled CosineAnnealingLR object and,
inside that, the pickled SGD object. The reference for the logits is coop_min's own learner with the
same context values; the reference for export is the official `load_model` logic transcribed.
"""
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

from coop_min import evaluate, export, official
from coop_min.clip import CLIP, CLIPConfig
from coop_min.prompts import PromptConfig, build_prompted_clip, load_prompt, save_prompt
from coop_min.tokenizer import token_text, tokenize

NAMES = ["dog", "golden_retriever", "2012 Tesla Model S", "cat"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    config = CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                        vision_patch_size=16, vision_heads=2, context_length=77, vocab_size=49408,
                        text_width=64, text_heads=2, text_layers=1)
    return CLIP(config).eval().requires_grad_(False)


class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """dassl/optim/lr_scheduler.py's ConstantWarmupScheduler, transcribed."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)


def _learner(clip, method="coop", csc=False, position="end", n_ctx=4, seed=0):
    """coop_min's model whose learned tensors are fp16 values (so an fp16 checkpoint holds them exactly)."""
    config = PromptConfig(method=method, n_ctx=n_ctx, ctx_init="", csc=csc, class_token_position=position)
    model = build_prompted_clip(clip, NAMES, config, seed=seed)
    with torch.no_grad():
        for p in model.learner.parameters():
            p.copy_(p.half().float() * 4)
    return model


def _dassl_save(learner, folder, epoch=10, best=False):
    """trainer.save_model + torchtools.save_checkpoint: the fp16 prompt learner (ctx, token buffers,
    Meta-Net), the optimizer's state and Dassl's scheduler state (a pickled scheduler and optimizer)."""
    state = OrderedDict(ctx=learner.ctx.detach().half())
    state["token_prefix"], state["token_suffix"] = learner.token_prefix.half(), learner.token_suffix.half()
    state.update({k: v.half() for k, v in learner.state_dict().items() if k.startswith("meta_net.")})
    params = [torch.nn.Parameter(v.clone()) for k, v in state.items() if not k.startswith("token_")]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epoch)
    scheduler = ConstantWarmupScheduler(optimizer, cosine, 1, 1e-5)
    directory = os.path.join(folder, "prompt_learner")
    os.makedirs(directory, exist_ok=True)
    name = "model-best.pth.tar" if best else f"model.pth.tar-{epoch}"
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "val_result": None}, os.path.join(directory, name))
    if not best:
        with open(os.path.join(directory, "checkpoint"), "w+") as f:
            f.write(f"{name}\n")
    return os.path.join(directory, name)


def _log(folder, position="end", trainer="CoOp", ctx_init=""):
    """The top of the log.txt Dassl writes: the arguments, then the config as nested KEY: value lines."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write(f"Setting fixed seed: 1\n***************\n** Arguments **\n***************\ntrainer: {trainer}\n"
                f"************\n** Config **\n************\nDATASET:\n  NAME: Caltech101\n  NUM_SHOTS: 16\n"
                f"MODEL:\n  BACKBONE:\n    NAME: RN50\nSEED: 1\nTRAINER:\n  COCOOP:\n    CTX_INIT: a photo of a\n"
                f"    N_CTX: 4\n    PREC: fp16\n  COOP:\n    CLASS_TOKEN_POSITION: {position}\n    CSC: False\n"
                f"    CTX_INIT: {ctx_init}\n    N_CTX: 16\n    PREC: fp16\n  NAME: {trainer}\nUSE_CUDA: True\n"
                "Loading trainer: CoOp\nepoch [1/10] batch [1/1] loss 1.0\nFinish training\n")


def _logits(model, seed=1):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.logits(images)


# ----------------------------------------------------------------------------------------------
# reading


@pytest.mark.parametrize("method,csc,position", [("coop", False, "end"), ("coop", True, "middle"),
                                                 ("coop", False, "front"), ("cocoop", False, "end")])
def test_official_checkpoint_gives_the_logits_of_our_learner_with_the_same_context(clip, tmp_path, method, csc,
                                                                                  position):
    ours = _learner(clip, method, csc, position)
    run = tmp_path / "output" / "caltech101" / "CoOp" / "rn50_16shots" / f"nctx4_csc{csc}_ctp{position}" / "seed1"
    file = _dassl_save(ours.learner, run)
    _log(run, position, "CoCoOp" if method == "cocoop" else "CoOp")
    expected = _logits(ours)
    for path in (file, run / "prompt_learner", run):
        loaded = load_prompt(str(path), clip, NAMES)
        assert loaded.learner.config.method == method and loaded.learner.config.csc == csc
        assert loaded.learner.config.class_token_position == position
        assert torch.equal(_logits(loaded), expected), path


def test_settings_come_from_log_then_folder_then_flag_then_default_and_the_line_says_where(clip, tmp_path):
    ours = _learner(clip, position="middle")
    logged = tmp_path / "a" / "nctx4_cscFalse_ctpfront" / "seed1"           # log.txt wins over the folder name
    _dassl_save(ours.learner, logged)
    _log(logged, "middle", ctx_init="a_photo_of_a")                        # "_" reads as a space, as coop.py
    found = official.read_prompt(logged)
    assert found.class_token_position == "middle" and "class token middle (log.txt)" in found.origin
    assert "init 'a photo of a' (log.txt)" in found.origin and "RN50 on Caltech101" in found.origin
    named = tmp_path / "b" / "nctx4_cscFalse_ctpfront" / "seed1"            # no log.txt: the folder name
    _dassl_save(ours.learner, named)
    assert official.read_prompt(named).origin.count("class token front (the folder name)") == 1
    bare = tmp_path / "c"                                                  # nothing says: the flag, else end
    file = _dassl_save(ours.learner, bare)
    assert official.read_prompt(file, "middle").class_token_position == "middle"
    found = official.read_prompt(file)
    assert found.class_token_position == "end" and "paper default" in found.origin
    with pytest.raises(ValueError, match="says the class token is at the middle.*drop the flag"):
        official.read_prompt(logged, "end")
    _log(logged, "middle", trainer="CoCoOp")                               # a CoOp prompt in a CoCoOp run
    with pytest.raises(ValueError, match="names the trainer cocoop .* holds a coop prompt"):
        official.read_prompt(logged)


def test_checkpoint_file_named_by_checkpoint_then_highest_epoch_then_best(clip, tmp_path):
    early, late = _learner(clip, seed=1), _learner(clip, seed=2)
    _dassl_save(late.learner, tmp_path, epoch=50)
    _dassl_save(early.learner, tmp_path, epoch=5)                          # `checkpoint` now names epoch 5
    assert official.checkpoint_file(tmp_path).name == "model.pth.tar-5"
    os.remove(tmp_path / "prompt_learner" / "checkpoint")
    assert official.checkpoint_file(tmp_path).name == "model.pth.tar-50"
    best = tmp_path / "best"
    _dassl_save(early.learner, best, best=True)
    assert official.checkpoint_file(best / "prompt_learner").name == "model-best.pth.tar"
    assert torch.equal(_logits(load_prompt(str(best), clip, NAMES)), _logits(early))


def test_csc_class_count_and_missing_class_names_are_refused_in_one_line(clip, tmp_path):
    file = _dassl_save(_learner(clip, csc=True).learner, tmp_path)
    with pytest.raises(ValueError, match="class-specific contexts for 4 classes, the data has 3"):
        load_prompt(file, clip, NAMES[:3])
    with pytest.raises(ValueError, match="holds no class names"):
        load_prompt(file, clip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no official checkpoint"):
        official.checkpoint_file(tmp_path / "empty")


def _torch_zip(path, pickled: bytes):
    """A file laid out as torch.save's zip with `pickled` as its data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


class _Call:
    """Pickles as a call of `fn(*args)`: what a hostile checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile(sentinel):
    touch = f"open({str(sentinel)!r}, 'w').close()"
    shell = f"touch {sentinel}"
    import builtins
    import functools
    import operator
    return {
        "os.system": _Call(os.system, shell),
        "builtins.eval": _Call(builtins.eval, touch),
        "builtins.exec": _Call(builtins.exec, touch),
        "subprocess.Popen": _Call(subprocess.Popen, ["touch", str(sentinel)]),
        "subprocess.call": _Call(subprocess.call, ["touch", str(sentinel)]),
        "builtins.__import__": _Call(builtins.__import__, "os"),
        "getattr chain": _Call(builtins.getattr, _Call(builtins.__import__, "os"), "system"),
        "functools.partial": _Call(functools.partial, os.system, shell),
        "operator.methodcaller": _Call(operator.methodcaller, "system", shell),
        "pickle.loads": _Call(pickle.loads, pickle.dumps(_Call(os.system, shell))),
        "torch.load of bytes": _Call(torch.storage._load_from_bytes, b"x"),
        "nested in the scheduler": {"state_dict": {"ctx": torch.zeros(2, 64)},
                                    "scheduler": {"successor": [OrderedDict(a=_Call(os.system, shell))]}},
    }


@pytest.mark.parametrize("case", list(_hostile("x")))
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, clip, case):
    sentinel = tmp_path / "sentinel"
    payload = _hostile(sentinel)[case]
    obj = payload if isinstance(payload, dict) else {"state_dict": {"ctx": payload}, "epoch": 1}
    path = _torch_zip(tmp_path / "model.pth.tar-1", pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match="refused to load the global .*nothing in it was run") as e:
        load_prompt(str(path), clip, NAMES)
    assert "\n" not in str(e.value)
    assert not sentinel.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")     # the TorchScript file is made here
def test_protocol_0_globals_and_torchscript_and_non_zip_files_are_refused(tmp_path, clip):
    sentinel = tmp_path / "sentinel"
    old = _torch_zip(tmp_path / "a.pth.tar", f"cos\nsystem\n(S'touch {sentinel}'\ntR.".encode())
    with pytest.raises(ValueError, match="refused to load the global os.system"):
        official.read_checkpoint(old)
    scripted = tmp_path / "model.pth.tar-2"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    with pytest.raises(ValueError, match="TorchScript"):
        load_prompt(str(scripted), clip, NAMES)
    legacy = tmp_path / "model.pth.tar-3"
    with open(legacy, "wb") as f:
        pickle.dump(_Call(os.system, f"touch {sentinel}"), f)
    with pytest.raises(ValueError, match="not .*zip"):
        load_prompt(str(legacy), clip, NAMES)
    assert not sentinel.exists()


def test_allowed_classes_load_as_inert_stand_ins(clip, tmp_path):
    """The pickled scheduler and optimizer come back as objects that keep their state and do nothing."""
    model_dir = tmp_path / "run"
    ctx = _learner(clip).learner.ctx.detach().half()
    _dassl_save(_learner(clip).learner, model_dir)
    checkpoint = official.read_checkpoint(official.checkpoint_file(model_dir))
    successor = checkpoint["scheduler"]["successor"]
    assert type(successor).__name__ == "CosineAnnealingLR" and not hasattr(successor, "step")
    assert type(successor.state["optimizer"]).__name__ == "SGD"
    group = checkpoint["optimizer"]["param_groups"][0]
    assert (group["lr"], group["initial_lr"]) == (1e-5, 0.002)          # the warm-up lr, the base lr
    assert checkpoint["state_dict"]["ctx"].dtype == torch.float16
    assert torch.equal(checkpoint["state_dict"]["ctx"], ctx)


# ----------------------------------------------------------------------------------------------
# writing


def _official_load_model(model_dir, epoch, prompt_learner):
    """dassl trainer.load_model as the official CoOp/CoCoOp trainers override it, transcribed: the
    checkpoint of `epoch`, its token buffers deleted, the rest copied in with strict=False."""
    path = os.path.join(model_dir, "prompt_learner", f"model.pth.tar-{epoch}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict, loaded_epoch = checkpoint["state_dict"], checkpoint["epoch"]
    del state_dict["token_prefix"], state_dict["token_suffix"]
    prompt_learner.load_state_dict(state_dict, strict=False)
    return checkpoint, loaded_epoch


class _OfficialPromptLearner(torch.nn.Module):
    """The parameters and buffers of the official PromptLearner (fp16, as with PREC fp16)."""

    def __init__(self, clip, n_ctx, csc, cocoop):
        super().__init__()
        names = [n.replace("_", " ") for n in NAMES]
        W = clip.config.text_width
        self.ctx = torch.nn.Parameter(torch.zeros((len(NAMES), n_ctx, W) if csc else (n_ctx, W)).half())
        if cocoop:
            D = clip.config.embed_dim
            self.meta_net = torch.nn.Sequential(OrderedDict(
                linear1=torch.nn.Linear(D, D // 16), relu=torch.nn.ReLU(), linear2=torch.nn.Linear(D // 16, W))).half()
        prompts = [" ".join(["X"] * n_ctx) + " " + name + "." for name in names]
        tokenized = torch.cat([tokenize(p) for p in prompts])
        with torch.no_grad():
            embedding = clip.token_embedding(tokenized).half()
        self.register_buffer("token_prefix", embedding[:, :1, :])
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :])


@pytest.mark.parametrize("method,csc", [("coop", False), ("coop", True), ("cocoop", False)])
def test_export_round_trips_through_the_official_loader(clip, tmp_path, monkeypatch, method, csc):
    ours = _learner(clip, method, csc, "end")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"weights": "W", "epochs": 7}')
    save_prompt(run / "prompt.safetensors", ours, "")

    def load_weights(path, device):                   # the run's CLIP: the fixture's
        assert path == "W"
        return clip, ""
    monkeypatch.setattr(export.inputs, "load_weights", load_weights)
    file, how = export.export(str(run), str(tmp_path / "official"))
    assert file == tmp_path / "official" / "prompt_learner" / "model.pth.tar-7"
    assert (file.parent / "checkpoint").read_text() == "model.pth.tar-7\n"
    assert "--load-epoch 7" in how
    official_learner = _OfficialPromptLearner(clip, 4, csc, method == "cocoop")
    buffers = {k: v.clone() for k, v in official_learner.named_buffers()}
    checkpoint, epoch = _official_load_model(tmp_path / "official", 7, official_learner)
    assert epoch == 7
    state = torch.load(file, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(state["token_prefix"], buffers["token_prefix"])       # the buffers the official code makes
    assert torch.equal(state["token_suffix"], buffers["token_suffix"])
    for name, value in ours.learner.state_dict().items():                   # ctx and Meta-Net, fp16, exact
        got = dict(official_learner.named_parameters())[name]
        assert got.dtype == torch.float16 and torch.equal(got.float(), value), name
    assert torch.equal(_logits(load_prompt(str(tmp_path / "official"), clip, NAMES)), _logits(ours))
    with pytest.raises(FileExistsError, match="already exists"):
        official.write_checkpoint(tmp_path / "official", state, 7)


# ----------------------------------------------------------------------------------------------
# interpretation


def test_token_text_reads_as_words():
    assert token_text(1125) == "photo"                                     # 'photo</w>'
    assert token_text(49406) == "<|startoftext|>"
    piece = next(i for i in range(300, 49000) if token_text(i).endswith("-") and token_text(i)[:-1].isalpha())
    assert not token_text(piece).endswith("</w>")
    assert token_text(36222) == "\N{LARGE ORANGE DIAMOND}"                  # 'ðŁĶ¶</w>', bytes f0 9f 94 b6
    assert token_text(172) == "<f0>-"                                      # 'ð': a lone UTF-8 lead byte


def test_interpret_prints_decoded_tokens_with_a_labelled_distance_column_the_same_every_run(clip, tmp_path):
    ours = _learner(clip)
    file = _dassl_save(ours.learner, tmp_path)
    lines = []
    evaluate._interpret(official.read_prompt(file).tensors["ctx"], None, clip.token_embedding.weight, 3,
                        lines.append)
    again, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)                        # another thread count: the same digits
    evaluate._interpret(ours.learner.ctx, None, clip.token_embedding.weight, 3, again.append)
    torch.set_num_threads(threads)
    assert lines == again and "distance" in lines[1] and "token" in lines[1]
    assert len(lines) == 2 + 4 and "</w>" not in "".join(lines) and "['" not in "".join(lines)
    d = torch.cdist(ours.learner.ctx.double(), clip.token_embedding.weight.double())
    nearest = d[0].argmin()
    assert lines[2].split()[1] == token_text(int(nearest))[:14] and float(lines[2].split()[2]) == pytest.approx(
        float(d[0, nearest].detach()), abs=1e-4)


def test_evaluate_cli_scores_an_official_checkpoint_and_says_where_its_settings_came_from(tmp_path):
    from coop_min.inputs import DEMO_WEIGHTS, load_weights

    clip_ = load_weights(DEMO_WEIGHTS, "cpu").clip
    from coop_min import data, inputs
    names = data.load_dataset(inputs.data_root(None)).classnames
    model = build_prompted_clip(clip_, names, PromptConfig(method="coop", n_ctx=4, ctx_init="", csc=False,
                                                           class_token_position="middle"))
    run = tmp_path / "seed1"
    _dassl_save(model.learner, run)
    _log(run, "middle")
    out = subprocess.run([sys.executable, "-m", "coop_min.evaluate", "--prompt", str(run), "--interpret", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "class token middle (log.txt)" in out.stdout and "distance" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "coop_min.evaluate", "--class-token-position", "front"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "official checkpoint" in bad.stderr and bad.stderr.count("\n") == 1


def test_export_cli_refuses_a_folder_without_a_prompt_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coop_min.export", str(tmp_path), "--official", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "prompt.safetensors not found" in r.stderr
    assert not (tmp_path / "o").exists()
