"""The official CoOp/CoCoOp code's run folders: its log.txt and folder names, read as its tools read them.

The official scripts run Dassl's train.py once per folder, which writes log.txt: the command-line
arguments (`model_dir: ...`), the yacs config (`KEY: value`, two spaces per nesting level, keys
sorted), training lines, "Finish training", then the result block ("=> result", "* accuracy: 71.9%",
"* macro_f1: 70.2%"). An eval-only run (--eval-only --model-dir) has the result without "Finish
training". The folders the scripts lay out:
    coop/main.sh            <dataset>/CoOp/<cfg>_<K>shots/nctx<M>_csc<C>_ctp<P>/seed<S>
    coop/eval.sh            evaluation/CoOp/<cfg>_<K>shots/nctx<M>_csc<C>_ctp<P>/<dataset>/seed<S>
    cocoop/base2new_*.sh    base2new/{train_base,test_new}/<dataset>/shots_<K>/<trainer>/<cfg>/seed<S>
    cocoop/xd_*.sh          imagenet/<trainer>/<cfg>_<K>shots/seed<S>,
                            evaluation/<trainer>/<cfg>_<K>shots/<dataset>/seed<S>
A result is what parse_test_res.py reads: after the line "Finish training" (a log without it: after
"=> result", its --test-log), the last "* accuracy: X%". An eval-only run's trained run is the folder
its --model-dir names, found by the end of that path, so an output folder that moved still pairs.

Settings are the config's, as the official trainers use them: with CTX_INIT set, the context length
is its word count and CSC is ignored (trainers/coop.py); CoCoOp has no CSC and the class token at the
end. DATASET.NAME is Dassl's dataset class name, which is coop_min's name too (DescribableTextures).
"""
import os
import re
from dataclasses import dataclass, replace

TRAINED = "Finish training"                  # parse_test_res.py's end signal
TESTED = "=> result"                         # ... and its --test-log one
_METRICS = {name: re.compile(rf"\* {name}: ([\.\deE+-]+)%") for name in ("accuracy", "macro_f1")}
_KEY = re.compile(r"( *)([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?$")      # yacs: `  KEY: value`, `  KEY:`
_FOLDER_SETTINGS = (
    (re.compile(r"nctx(\d+)_csc(\w+?)_ctp(\w+)$"), ("n_ctx", "csc", "class_token_position")),
    (re.compile(r".+_(\d+)shots$"), ("shots",)),
    (re.compile(r"shots_(\d+)$"), ("shots",)),
    (re.compile(r"seed(\d+)$"), ("seed",)),
)


@dataclass(frozen=True)
class OfficialRun:
    """One official run folder: its settings under coop_min's names, and its result."""
    folder: str
    method: str                  # TRAINER.NAME lower-cased: "coop", "cocoop" (or another trainer's)
    dataset: str                 # DATASET.NAME: Caltech101, DescribableTextures, ImageNet, ...
    shots: int | None
    seed: int | None
    subsample: str               # DATASET.SUBSAMPLE_CLASSES: all, base, new
    n_ctx: int
    ctx_init: str
    csc: bool
    class_token_position: str
    backbone: str                # MODEL.BACKBONE.NAME: RN50, ViT-B/16 (coop_min's --weights names)
    precision: str               # TRAINER.<COOP|COCOOP>.PREC
    data_root: str               # DATASET.ROOT
    epochs: int | None           # OPTIM.MAX_EPOCH
    batch_size: int | None       # DATALOADER.TRAIN_X.BATCH_SIZE
    lr: float | None             # OPTIM.LR
    accuracy: float | None       # None: no result after the end signal
    macro_f1: float | None
    trained: bool                # the log says "Finish training"; else an eval-only run
    source: str | None = None    # eval-only: the trained run folder below the root it loaded


# ----------------------------------------------------------------------------------------------
# one log.txt


def _lines(log_path):
    with open(log_path, errors="replace") as f:
        return [line.rstrip() for line in f]


def _config_entries(lines):
    """(indent, key, value) of each line yacs printed: from Dassl's "** Config **" banner (else from the
    first unindented upper-case key: the argument lines before it are lower-case) to the first unindented
    line that is not `KEY: value`; list items and other indented lines are skipped."""
    if "** Config **" in lines:
        lines = lines[lines.index("** Config **") + 1:]
    entries = []
    for line in lines:
        m = _KEY.match(line)
        if not entries and not (m and not m.group(1) and m.group(2).isupper()):
            continue
        if m:
            entries.append((len(m.group(1)), m.group(2), (m.group(3) or "").strip()))
        elif line.strip() and not line[0].isspace() and not line.startswith("- "):
            break
    return entries


def _config(lines):
    config, parents = {}, []                 # parents: [(indent, key)] of the nodes above this line
    entries = _config_entries(lines)
    for i, (indent, key, value) in enumerate(entries):
        while parents and parents[-1][0] >= indent:
            parents.pop()
        if value == "" and i + 1 < len(entries) and entries[i + 1][0] > indent:
            parents.append((indent, key))    # a node: its keys follow, indented
        else:
            config[".".join([*(k for _, k in parents), key])] = value
    return config


def read_log_config(log_path) -> dict[str, str]:
    """The config Dassl printed at the top of log.txt, as flat dotted keys and the values as printed
    ({"TRAINER.COOP.N_CTX": "16", "TRAINER.COOP.CTX_INIT": "", "DATASET.NAME": "Caltech101", ...});
    {} when the log has none."""
    return _config(_lines(log_path))


def _arguments(lines):
    """The command-line arguments Dassl printed before the config (`model_dir: output/...`): the
    lower-case `key: value` lines before the "** Config **" banner or the first upper-case key."""
    out = {}
    for line in lines:
        m = _KEY.match(line)
        if line == "** Config **" or (m and m.group(2).isupper()):
            break
        if m and not m.group(1):
            out[m.group(2)] = (m.group(3) or "").strip()
    return out


def _number(text, kind, where):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number; fix or remove that log") from None


def _result(lines, end_signal, log_path):
    found, started = {}, False
    for line in (line.strip() for line in lines):
        started = started or line == end_signal
        for name, regex in _METRICS.items():
            if started and (m := regex.search(line)):
                found[name] = _number(m.group(1), float, log_path)     # the last one wins
    return found if "accuracy" in found else None


def read_result(log_path, end_signal=None) -> dict[str, float] | None:
    """{"accuracy": %, "macro_f1": % when printed} of one log as parse_test_res.py reads it: the last
    values after the line `end_signal` (default: "Finish training", or "=> result" in a log without
    it, an eval-only run); None when there is none."""
    lines = _lines(log_path)
    if end_signal is None:
        end_signal = TRAINED if TRAINED in (line.strip() for line in lines) else TESTED
    return _result(lines, end_signal, log_path)


# ----------------------------------------------------------------------------------------------
# folders


def folder_settings(path) -> dict[str, str]:
    """The settings in the official folder names of `path` and its ancestors, the nearest first:
    nctx16_cscFalse_ctpend -> n_ctx, csc, class_token_position; rn50_16shots or shots_16 -> shots;
    seed1 -> seed. Only what is there."""
    out = {}
    path = os.path.abspath(path)
    while os.path.basename(path):
        for pattern, names in _FOLDER_SETTINGS:
            if m := pattern.match(os.path.basename(path)):
                for name, value in zip(names, m.groups()):
                    out.setdefault(name, value)
        path = os.path.dirname(path)
    return out


def prompt_settings(config) -> dict[str, str]:
    """What an official config says of the prompt, as trainers/coop.py and cocoop.py read it, each only
    where the config states it: "method" (TRAINER.NAME lower-cased), "ctx_init" ("_" read as a space),
    "class_token_position" (CoCoOp: always "end")."""
    if "TRAINER.NAME" not in config:
        return {}
    method = config["TRAINER.NAME"].lower()
    block = "TRAINER.COCOOP." if method == "cocoop" else "TRAINER.COOP."
    out = {"method": method}
    if block + "CTX_INIT" in config:
        out["ctx_init"] = config[block + "CTX_INIT"].replace("_", " ")
    if method == "cocoop":
        out["class_token_position"] = "end"
    elif block + "CLASS_TOKEN_POSITION" in config:
        out["class_token_position"] = config[block + "CLASS_TOKEN_POSITION"]
    return out


def _optional(config, key, kind, where):
    return _number(config[key], kind, where) if key in config else None


def _count(config, key, folder_value, where):
    """An int of the config, else of the folder name (Dassl's default -1: not set), else None."""
    value = _number(config.get(key, "-1"), int, where)
    if value >= 0:
        return value
    return None if folder_value is None else int(folder_value)


def _run(folder, lines, config):
    """OfficialRun of a folder whose log.txt is `lines` and printed `config` (no source yet)."""
    where = os.path.join(folder, "log.txt")
    prompt = prompt_settings(config)
    method, ctx_init = prompt["method"], prompt.get("ctx_init", "")
    block = "TRAINER.COCOOP." if method == "cocoop" else "TRAINER.COOP."
    n_ctx = len(ctx_init.split(" ")) if ctx_init else _number(config.get(block + "N_CTX", "16"), int, where)
    named = folder_settings(folder)
    trained = TRAINED in (line.strip() for line in lines)
    result = _result(lines, TRAINED if trained else TESTED, where) or {}
    return OfficialRun(
        folder=folder,
        method=method,
        dataset=config.get("DATASET.NAME", ""),
        shots=_count(config, "DATASET.NUM_SHOTS", named.get("shots"), where),
        seed=_count(config, "SEED", named.get("seed"), where),
        subsample=config.get("DATASET.SUBSAMPLE_CLASSES", "all"),
        n_ctx=n_ctx,
        ctx_init=ctx_init,
        csc=method != "cocoop" and not ctx_init and config.get(block + "CSC") == "True",
        class_token_position=prompt.get("class_token_position", "end"),
        backbone=config.get("MODEL.BACKBONE.NAME", ""),
        precision=config.get(block + "PREC", ""),
        data_root=config.get("DATASET.ROOT", ""),
        epochs=_optional(config, "OPTIM.MAX_EPOCH", int, where),
        batch_size=_optional(config, "DATALOADER.TRAIN_X.BATCH_SIZE", int, where),
        lr=_optional(config, "OPTIM.LR", float, where),
        accuracy=result.get("accuracy"),
        macro_f1=result.get("macro_f1"),
        trained=trained)


def _parts(path):
    return [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]


def _source(model_dir, trained, root):
    """The trained run folder whose path below `root` ends `model_dir` (the longest such), or None."""
    wanted = _parts(model_dir)
    best, best_length = None, 0
    for folder in trained:
        rel = _parts(os.path.relpath(folder, root))
        if len(rel) > best_length and wanted[-len(rel):] == rel:
            best, best_length = folder, len(rel)
    return best


def find_runs(root) -> list[OfficialRun]:
    """Every official run folder below `root` (sorted; hidden folders skipped, as parse_test_res.py
    does): one holding a log.txt whose config names a trainer (TRAINER.NAME) and no coop_min
    config.json. An eval-only run's source is the trained run below `root` that its --model-dir names."""
    found = []                               # [(OfficialRun, its --model-dir)]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "log.txt" not in files or "config.json" in files:
            continue
        lines = _lines(os.path.join(folder, "log.txt"))
        config = _config(lines)
        if "TRAINER.NAME" in config:
            run = _run(os.path.normpath(folder), lines, config)
            found.append((run, _arguments(lines).get("model_dir", "")))
    trained = [run.folder for run, _ in found if run.trained]
    runs = []
    for run, model_dir in found:
        if not run.trained and model_dir:
            run = replace(run, source=_source(model_dir, trained, root))
        runs.append(run)
    return runs
