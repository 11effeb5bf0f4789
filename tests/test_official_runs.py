"""coop_min.official_runs and summarize on the official CoOp/CoCoOp code's run folders (no training):
log.txt files written as Dassl's train.py writes them (the arguments, the config as yacs's
CfgNode.__str__ prints it, the system info, training lines, "Finish training", the result block) in
the folders the official scripts lay out, read back; means and stds against parse_test_res.py's
parse_function transcribed here; base-to-new and cross-dataset pairs; official rows beside coop_min's."""
import csv
import json
import os
import re

import numpy as np

from coop_min import official_runs, summarize
from coop_min.official_runs import folder_settings, read_log_config, read_result

CFG_COOP = "rn50"
CFG_COCOOP = "vit_b16_c4_ep10_batch1_ctxv1"


# ----------------------------------------------------------------------------------------------
# the independent references: yacs's printing and parse_test_res.py, transcribed


def _yacs_str(node):
    """yacs CfgNode.__str__, transcribed (a dict is a CfgNode)."""
    def _indent(s_, num_spaces):
        s = s_.split("\n")
        if len(s) == 1:
            return s_
        first = s.pop(0)
        s = [(num_spaces * " ") + line for line in s]
        s = "\n".join(s)
        s = first + "\n" + s
        return s

    s = []
    for k, v in sorted(node.items()):
        seperator = "\n" if isinstance(v, dict) else " "
        attr_str = "{}:{}{}".format(str(k), seperator, _yacs_str(v) if isinstance(v, dict) else str(v))
        attr_str = _indent(attr_str, 2)
        s.append(attr_str)
    return "\n".join(s)


def _parse_function(directory, end_signal, keyword="accuracy"):
    """parse_test_res.py's parse_function (Dassl's listdir_nohidden) and the summary line it prints."""
    regex = re.compile(fr"\* {keyword}: ([\.\deE+-]+)%")
    outputs = []
    for subdir in sorted(f for f in os.listdir(directory) if not f.startswith(".")):
        fpath = os.path.join(directory, subdir, "log.txt")
        assert os.path.isfile(fpath)
        good_to_go = False
        output = {}
        with open(fpath, "r") as f:
            for line in f.readlines():
                line = line.strip()
                if line == end_signal:
                    good_to_go = True
                match = regex.search(line)
                if match and good_to_go:
                    output[keyword] = float(match.group(1))
        if output:
            outputs.append(output)
    assert len(outputs) > 0, f"Nothing found in {directory}"
    values = [o[keyword] for o in outputs]
    return f"* {keyword}: {np.mean(values):.2f}% +- {np.std(values):.2f}%"


def _mean_std(printed):
    """("71.97", "1.14") of parse_test_res's "* accuracy: 71.97% +- 1.14%"."""
    return re.fullmatch(r"\* \w+: (\S+)% \+- (\S+)%", printed).groups()


# ----------------------------------------------------------------------------------------------
# log.txt as Dassl writes it


def _config(trainer, dataset, shots, seed, subsample="all", n_ctx=16, csc=False, ctp="end", ctx_init="",
            backbone="RN50", epochs=200, batch_size=32, root="/data"):
    """The config tree Dassl prints for CoOp's train.py (a part of Dassl's keys, every kind of value)."""
    return {
        "DATALOADER": {"NUM_WORKERS": 8, "TEST": {"BATCH_SIZE": 100, "SAMPLER": "SequentialSampler"},
                       "TRAIN_X": {"BATCH_SIZE": batch_size, "N_DOMAIN": 0, "SAMPLER": "RandomSampler"}},
        "DATASET": {"NAME": dataset, "NUM_SHOTS": shots, "ROOT": root, "SOURCE_DOMAINS": (),
                    "SUBSAMPLE_CLASSES": subsample},
        "INPUT": {"INTERPOLATION": "bicubic", "PIXEL_MEAN": [0.48145466, 0.4578275, 0.40821073],
                  "SIZE": (224, 224), "TRANSFORMS": ["random_resized_crop", "random_flip", "normalize"]},
        "MODEL": {"BACKBONE": {"NAME": backbone, "PRETRAINED": True}, "HEAD": {"NAME": ""},
                  "INIT_WEIGHTS": ""},
        "OPTIM": {"LR": 0.002, "MAX_EPOCH": epochs, "NAME": "sgd", "WARMUP_CONS_LR": 1e-05},
        "OUTPUT_DIR": "output/somewhere",
        "SEED": seed,
        "TEST": {"EVALUATOR": "Classification", "FINAL_MODEL": "last_step", "PER_CLASS_RESULT": False},
        "TRAINER": {"COCOOP": {"CTX_INIT": ctx_init if trainer == "CoCoOp" else "", "N_CTX": n_ctx,
                               "PREC": "fp16"},
                    "COOP": {"CLASS_TOKEN_POSITION": ctp, "CSC": csc,
                             "CTX_INIT": ctx_init if trainer == "CoOp" else "", "N_CTX": n_ctx,
                             "PREC": "fp16"},
                    "NAME": trainer},
        "USE_CUDA": True,
        "VERBOSE": True,
    }


def _log(config, accuracy, *, trained=True, model_dir="", macro_f1=None, before=(), after=()):
    """Dassl's log.txt: the arguments, the config, the system info, training (or loading the model of
    model_dir: an eval-only run), the result block; `before` and `after`: accuracy lines printed
    before "Finish training" and after the result."""
    args = {"backbone": "", "config_file": "configs/trainers/CoOp/rn50.yaml", "eval_only": not trained,
            "load_epoch": None if trained else 10, "model_dir": model_dir, "no_train": False,
            "opts": ["TRAINER.COOP.N_CTX", "16", "DATASET.NUM_SHOTS", "16"], "output_dir": "output/somewhere",
            "resume": "", "root": "/data", "seed": config["SEED"], "trainer": config["TRAINER"]["NAME"]}
    lines = ["***************", "** Arguments **", "***************",
             *(f"{k}: {v}" for k, v in sorted(args.items())),
             "************", "** Config **", "************", _yacs_str(config),
             "Collecting env info ...", "** System info **", "PyTorch version: 1.8.1+cu111",
             "Is debug build: False", "OS: Ubuntu 18.04.5 LTS (x86_64)", "", "",
             f"Loading trainer: {config['TRAINER']['NAME']}", f"Loading dataset: {config['DATASET']['NAME']}"]
    if trained:
        lines += ["epoch [1/2] batch [5/5] time 0.2 (0.3) data 0.0 (0.1) loss 1.2 (1.3) acc 70.0 (65.0) "
                  "lr 1.0000e-05 eta 0:00:03",
                  *(f"* accuracy: {a}%" for a in before),
                  "Checkpoint saved to output/somewhere/prompt_learner/model.pth.tar-2", "Finish training",
                  "Deploy the last-epoch model"]
    else:
        lines += [f"Loading weights to prompt_learner from \"{model_dir}/prompt_learner/model.pth.tar-10\" "
                  "(epoch = 10)"]
    lines += ["Evaluate on the *test* set", "=> result", "* total: 2,465", "* correct: 2,300",
              f"* accuracy: {accuracy}%", f"* error: {100 - accuracy:.1f}%"]
    lines += [f"* macro_f1: {macro_f1}%"] if macro_f1 is not None else []
    lines += [*(f"* accuracy: {a}%" for a in after), "Elapsed: 0:00:10"]
    return "\n".join(lines) + "\n"


def _write_log(folder, text):
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text(text)
    return folder / "log.txt"


def _coop_main(out, dataset, name, shots, seed, accuracy, cfg=CFG_COOP, csc=False, ctp="end"):
    """A run of scripts/coop/main.sh: output/<dataset>/CoOp/<cfg>_<K>shots/nctx16_csc<C>_ctp<P>/seed<S>."""
    folder = out / dataset / "CoOp" / f"{cfg}_{shots}shots" / f"nctx16_csc{csc}_ctp{ctp}" / f"seed{seed}"
    epochs = 50 if shots == 1 else 200
    config = _config("CoOp", name, shots, seed, csc=csc, ctp=ctp, epochs=epochs)
    return _write_log(folder, _log(config, accuracy))


def _base2new(out, dataset, name, seed, base, new):
    """A run of scripts/cocoop/base2new_train.sh and base2new_test.sh: train_base, then test_new."""
    common = os.path.join(dataset, "shots_16", "CoCoOp", CFG_COCOOP, f"seed{seed}")
    settings = dict(n_ctx=4, ctx_init="a photo of a", backbone="ViT-B/16", epochs=10, batch_size=1)
    _write_log(out / "base2new" / "train_base" / common,
               _log(_config("CoCoOp", name, 16, seed, subsample="base", **settings), base))
    _write_log(out / "base2new" / "test_new" / common,
               _log(_config("CoCoOp", name, 16, seed, subsample="new", **settings), new, trained=False,
                    model_dir=os.path.join("output", "base2new", "train_base", common)))


# ----------------------------------------------------------------------------------------------
# one log, one folder


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
    return out


def test_read_log_config_gives_every_printed_key_and_no_argument_or_system_line(tmp_path):
    config = _config("CoOp", "Caltech101", 16, 1, ctp="middle")
    log = _write_log(tmp_path / "run", _log(config, 71.9))
    read = read_log_config(log)
    assert read == _flat(config)
    assert read["TRAINER.COOP.CLASS_TOKEN_POSITION"] == "middle" and read["TRAINER.COOP.CTX_INIT"] == ""
    assert read["TRAINER.COOP.CSC"] == "False" and read["INPUT.SIZE"] == "(224, 224)"
    assert read["DATASET.NAME"] == "Caltech101" and read["SEED"] == "1" and read["TRAINER.NAME"] == "CoOp"
    assert "seed" not in read and "OS" not in read and "model_dir" not in read


def test_read_log_config_skips_list_items_and_is_empty_without_a_config(tmp_path):
    log = _write_log(tmp_path / "yaml_lists", "\n".join([
        "seed: 2", "DATASET:", "  NAME: EuroSAT", "INPUT:", "  TRANSFORMS:", "  - random_flip",
        "  - normalize", "  SIZE: (224, 224)", "- stray", "SEED: 2", "TRAINER:", "  NAME: CoOp",
        "Collecting env info ...", "OS: Ubuntu"]))
    assert read_log_config(log) == {"DATASET.NAME": "EuroSAT", "INPUT.TRANSFORMS": "",
                                    "INPUT.SIZE": "(224, 224)", "SEED": "2", "TRAINER.NAME": "CoOp"}
    own = _write_log(tmp_path / "coop_min_run", "step 10/40 loss 1.23 lr 0.002\ntest accuracy 71.9\n")
    assert read_log_config(own) == {}
    assert read_log_config(_write_log(tmp_path / "empty", "")) == {}


def test_folder_settings_of_the_official_folder_names():
    assert folder_settings("output/caltech101/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1") == {
        "seed": "1", "n_ctx": "16", "csc": "False", "class_token_position": "end", "shots": "16"}
    assert folder_settings("output/dtd/CoOp/vit_b16_ep50_2shots/nctx8_cscTrue_ctpmiddle/seed3") == {
        "seed": "3", "n_ctx": "8", "csc": "True", "class_token_position": "middle", "shots": "2"}
    assert folder_settings(f"output/base2new/test_new/eurosat/shots_16/CoCoOp/{CFG_COCOOP}/seed2") == {
        "seed": "2", "shots": "16"}
    assert folder_settings("output/evaluation/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1_16shots/imagenetv2") == {
        "shots": "16"}
    assert folder_settings("runs/my_experiment") == {}


def test_read_result_as_parse_test_res_reads_a_log(tmp_path):
    config = _config("CoOp", "Caltech101", 16, 1)
    cases = {   # name: (log, what parse_test_res reads: (end signal, accuracy))
        "plain": (_log(config, 71.9, macro_f1=70.2), ("Finish training", 71.9)),
        "last_wins": (_log(config, 71.9, before=[50.0], after=[72.5, 73.1]), ("Finish training", 73.1)),
        "eval_only": (_log(config, 64.3, trained=False, model_dir="output/x/seed1"), ("=> result", 64.3)),
        "exponent": (_log(config, 71.9, after=["7.25e+01"]), ("Finish training", 72.5)),
    }
    for name, (text, (signal, accuracy)) in cases.items():
        log = _write_log(tmp_path / name / "seed1", text)
        assert _parse_function(tmp_path / name, signal) == f"* accuracy: {accuracy:.2f}% +- 0.00%"
        assert read_result(log)["accuracy"] == accuracy, name
    assert read_result(tmp_path / "plain" / "seed1" / "log.txt") == {"accuracy": 71.9, "macro_f1": 70.2}
    assert "macro_f1" not in read_result(tmp_path / "last_wins" / "seed1" / "log.txt")
    # parse_test_res --test-log on a training log: its result block counts too
    assert read_result(tmp_path / "plain" / "seed1" / "log.txt", end_signal="=> result")["accuracy"] == 71.9
    stopped = _write_log(tmp_path / "stopped", _log(config, 71.9).split("Finish training")[0])
    assert read_result(stopped) is None and read_result(stopped, end_signal="Finish training") is None
    # accuracy only before the signal: none after it
    early = _write_log(tmp_path / "early", "* accuracy: 40.0%\nFinish training\nElapsed: 0:00:01\n")
    assert read_result(early) is None


def test_find_runs_uses_the_settings_as_the_official_trainers_do(tmp_path):
    """A CTX_INIT phrase sets the context length to its word count and turns CSC off (trainers/coop.py);
    CoCoOp has no CSC and the class token at the end; a coop_min run folder (config.json) is not one."""
    init = _config("CoOp", "OxfordPets", 4, 1, csc=True, ctx_init="a_photo_of_a", ctp="middle")
    _write_log(tmp_path / "init" / "seed1", _log(init, 88.0))
    cocoop = _config("CoCoOp", "DescribableTextures", 16, 1, n_ctx=4, csc=True, ctp="middle",
                     ctx_init="a photo of a")
    _write_log(tmp_path / "cocoop" / "seed1", _log(cocoop, 60.0))
    _write_log(tmp_path / "zeroshot", _log(_config("ZeroshotCLIP", "EuroSAT", -1, -1), 45.0, trained=False))
    _write_log(tmp_path / "coop_min", _log(_config("CoOp", "EuroSAT", 16, 1), 45.0))
    (tmp_path / "coop_min" / "config.json").write_text("{}")
    cocoop, init, zeroshot = official_runs.find_runs(tmp_path)          # sorted by folder
    assert (init.method, init.n_ctx, init.csc, init.ctx_init, init.class_token_position, init.shots) == (
        "coop", 4, False, "a photo of a", "middle", 4)
    assert (cocoop.method, cocoop.n_ctx, cocoop.csc, cocoop.class_token_position) == (
        "cocoop", 4, False, "end")
    assert (init.backbone, init.precision, init.epochs, init.batch_size, init.lr) == (
        "RN50", "fp16", 200, 32, 0.002)
    assert (zeroshot.method, zeroshot.seed, zeroshot.shots, zeroshot.trained, zeroshot.accuracy) == (
        "zeroshotclip", None, None, False, 45.0)


# ----------------------------------------------------------------------------------------------
# summarize


def test_official_few_shot_cells_equal_what_parse_test_res_prints(tmp_path):
    out = tmp_path / "output"
    for shots, accuracies in ((16, (71.9, 73.4, 70.6)), (1, (55.3, 58.8, 56.1))):
        for seed, accuracy in enumerate(accuracies, 1):
            cfg = "rn50_ep50" if shots == 1 else "rn50"          # the official configs' 50 epochs at 1 shot
            _coop_main(out, "caltech101", "Caltech101", shots, seed, accuracy, cfg=cfg)
    for seed, accuracy in ((1, 50.5), (2, 52.1)):
        _coop_main(out, "dtd", "DescribableTextures", 16, seed, accuracy)
    # a hidden copy of seed 1 (an editor's backup): parse_test_res skips it, and so must summarize
    _write_log(out / "caltech101" / "CoOp" / "rn50_16shots" / "nctx16_cscFalse_ctpend" / ".backup",
               _log(_config("CoOp", "Caltech101", 16, 1), 10.0))
    text, tables = summarize.summarize(str(out), str(tmp_path / "summary"))
    cells = {}
    for dataset, experiment in (("caltech101", "rn50_ep50_1shots"), ("caltech101", "rn50_16shots"),
                                ("dtd", "rn50_16shots")):
        directory = out / dataset / "CoOp" / experiment / "nctx16_cscFalse_ctpend"
        printed = _parse_function(directory, "Finish training")
        cells[dataset, experiment] = "{} ± {}".format(*_mean_std(printed))
    assert cells["caltech101", "rn50_16shots"] == "71.97 ± 1.14"        # 215.9 / 3; np.std by hand: 1.1441
    assert "### CoOp (official)\n" in text
    one_shot, sixteen_shots = cells["caltech101", "rn50_ep50_1shots"], cells["caltech101", "rn50_16shots"]
    assert f"| Caltech101 | - | {one_shot} | {sixteen_shots} |" in text, text
    assert f"| DescribableTextures | - | - | {cells['dtd', 'rn50_16shots']} (2/3) |" in text, text
    assert "left out" not in text
    [(setting, rows)] = tables["few_shot"].items()
    assert setting[:6] == ("coop-official", 16, "", False, "end", "RN50")
    assert rows["Caltech101"][16] == {1: 71.9, 2: 73.4, 3: 70.6}


def test_official_base_to_new_pairs_and_cross_dataset_evaluations(tmp_path):
    out = tmp_path / "output"
    for seed, base, new in ((1, 97.5, 93.2), (2, 97.9, 94.4), (3, 97.7, 94.0)):
        _base2new(out, "caltech101", "Caltech101", seed, base, new)
    _base2new(out, "eurosat", "EuroSAT", 1, 87.5, 60.0)
    orphan = f"dtd/shots_16/CoCoOp/{CFG_COCOOP}/seed1"                    # a test_new without its train_base
    _write_log(out / "base2new" / "test_new" / orphan,
               _log(_config("CoCoOp", "DescribableTextures", 16, 1, "new"), 50.0, trained=False,
                    model_dir=f"output/base2new/train_base/{orphan}"))
    settings = dict(n_ctx=4, ctx_init="a photo of a", backbone="ViT-B/16", epochs=10, batch_size=1)
    # xd_train.sh's run on ImageNet, xd_test.sh's evaluations of it
    source = os.path.join("imagenet", "CoCoOp", f"{CFG_COCOOP}_16shots", "seed1")
    _write_log(out / source, _log(_config("CoCoOp", "ImageNet", 16, 1, **settings), 71.0))
    for folder, name, accuracy in (("caltech101", "Caltech101", 94.4), ("imagenetv2", "ImageNetV2", 64.1)):
        _write_log(out / "evaluation" / "CoCoOp" / f"{CFG_COCOOP}_16shots" / folder / "seed1",
                   _log(_config("CoCoOp", name, -1, 1, **settings), accuracy, trained=False,
                        model_dir=os.path.join("output", source)))
    text, _ = summarize.summarize(str(out), str(tmp_path / "summary"))
    test_new = out / "base2new" / "test_new" / "caltech101" / "shots_16" / "CoCoOp" / CFG_COCOOP
    train_base = out / "base2new" / "train_base" / "caltech101" / "shots_16" / "CoCoOp" / CFG_COCOOP
    base = _mean_std(_parse_function(train_base, "Finish training"))
    new = _mean_std(_parse_function(test_new, "=> result"))
    assert (base, new) == (("97.70", "0.16"), ("93.87", "0.50"))            # by hand: 293.1 / 3, 281.6 / 3
    # H of the means: 2 * 97.7 * 93.8667 / 191.5667 = 95.7449
    cells = f"{base[0]} ± {base[1]} | {new[0]} ± {new[1]}"
    assert f"| Caltech101 | CoCoOp (official) | {cells} | 95.74 |" in text, text
    assert "| EuroSAT | CoCoOp (official) | 87.50 (1/3) | 60.00 (1/3) | 71.19 |" in text     # 10500 / 147.5
    assert "(1 official log.txt left out" in text                            # the orphan test_new
    # cross-dataset: the ImageNet run as the source, the evaluation of its prompts as a target
    assert "| CoCoOp (official) | 71.00 | 94.40 | 94.40 |" in text, text
    assert "| CoCoOp (official) | 71.00 | 64.10 | 64.10 |" in text, text


def _coop_min_run(folder, dataset, shots, seed, accuracy):
    """A coop_min run as the tests of tests/test_sweep.py write it: results.json and config.json (and
    a log.txt with a Dassl-looking config, which its config.json makes ours)."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(
        {"dataset": dataset, "method": "coop", "shots": shots, "seed": seed, "accuracy": accuracy,
         "subsample": "all", "zero_shot": {"accuracy": 58.0}}))
    (folder / "config.json").write_text(json.dumps(
        {"method": "coop", "n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end",
         "weights": "RN50", "precision": "fp16", "data": "/data", "epochs": 200, "batch_size": 32,
         "lr": 0.002}))
    (folder / "log.txt").write_text(_log(_config("CoOp", dataset, shots, seed), 1.0))


def test_official_rows_beside_coop_min_rows_in_one_tree(tmp_path):
    out = tmp_path / "runs"
    for seed, accuracy in ((1, 72.0), (2, 74.0)):
        folder = out / "caltech101" / "shots_16" / "coop" / "rn50" / f"seed{seed}"
        _coop_min_run(folder, "Caltech101", 16, seed, accuracy)
    for seed, accuracy in ((1, 71.9), (2, 73.4), (3, 70.6)):
        _coop_main(out / "official", "caltech101", "Caltech101", 16, seed, accuracy)
    _coop_main(out / "official", "caltech101", "Caltech101", 16, 1, 69.0, csc=True)
    text, tables = summarize.summarize(str(out), str(tmp_path / "summary"))
    assert "Rows differ in: csc." in text
    # ours: (72 + 74) / 2 = 73, std 1; the official's unified context: as test_official_few_shot_cells...
    assert "### CoOp\n\n| dataset | zero-shot CLIP | 16 shots |" in text
    assert "| Caltech101 | 58.00 | 73.00 ± 1.00 |" in text
    assert "### CoOp (official, csc False)\n\n| dataset | zero-shot CLIP | 16 shots |" in text
    assert "| Caltech101 | - | 71.97 ± 1.14 |" in text
    assert "### CoOp (official, csc True)\n" in text and "| Caltech101 | - | 69.00 |" in text
    assert text.index("### CoOp\n") < text.index("### CoOp (official, csc False)") < text.index(
        "### CoOp (official, csc True)")
    assert len(tables["few_shot"]) == 3 and "left out" not in text
    with open(tmp_path / "summary" / "few_shot.csv") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert methods == {"CoOp", "CoOp (official, csc False)", "CoOp (official, csc True)"}
