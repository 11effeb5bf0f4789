"""`python -m coop_min.export RUN --official OUT`: a coop_min run's learned prompt as the official code's
checkpoint, so the official `train.py --eval-only --model-dir OUT --load-epoch E` scores it.

The file is what Dassl's save_model writes for the official PromptLearner (coop_min/official.py):
`ctx`, the class names' token embeddings `token_prefix` (SOS) and `token_suffix` (name, ".", EOT,
padding) exactly as the official PromptLearner computes them, and CoCoOp's Meta-Net, all in the
official default training dtype fp16 (`--dtype fp32` for an official model run with PREC fp32 or amp).
The official loader deletes the token buffers and copies ctx (and the Meta-Net) into its
prompt learner; the class-token position and CSC are the official config's (TRAINER.COOP.*), so the
one line printed says which to set.
"""
import collections
import os

import torch

from coop_min import cli, inputs, official, runs
from coop_min.prompts import load_prompt

_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def official_state(learner, dtype=torch.float16) -> collections.OrderedDict:
    """The official prompt learner's state_dict for `learner`: ctx, token_prefix, token_suffix, then the
    Meta-Net, in `dtype`, on the CPU."""
    state = collections.OrderedDict(ctx=learner.ctx, token_prefix=learner.token_prefix,
                                    token_suffix=learner.token_suffix)
    for name, value in learner.state_dict().items():
        if name.startswith("meta_net."):
            state[name] = value
    return collections.OrderedDict((k, v.detach().to("cpu", dtype).contiguous()) for k, v in state.items())


def export(run, out, weights=None, dtype="fp16"):
    """Write the official checkpoint of `run` (a coop_min run folder) into `out`; returns its path and a
    line that says how to load it."""
    prompt = os.path.join(run, "prompt.safetensors")
    if not os.path.isfile(prompt):
        raise FileNotFoundError(f"{prompt} not found: pass a finished coop_min run folder")
    config = runs.read_config(run)
    clip, sha = inputs.load_weights(weights or config.get("weights"), "cpu")
    learner = load_prompt(prompt, clip, clip_sha256=sha).learner
    epoch = int(config.get("epochs") or 1)
    file = official.write_checkpoint(out, official_state(learner, _DTYPES[dtype]), epoch)
    c = learner.config
    trainer = "CoCoOp" if c.method == "cocoop" else "CoOp"
    settings = "" if c.method == "cocoop" else (f" TRAINER.COOP.N_CTX {c.n_ctx} TRAINER.COOP.CSC {c.csc} "
                                                f"TRAINER.COOP.CLASS_TOKEN_POSITION {c.class_token_position}")
    how = (f"wrote {file} ({len(learner.classnames)} classes, {dtype}); the official code loads it with "
           f"train.py --trainer {trainer} --eval-only --model-dir {out} --load-epoch {epoch}{settings}")
    return file, how


def main(argv=None):
    cli.exit_with(cli.run(_main, argv))


def _parser():
    p = cli.parser("python -m coop_min.export", description=(
        "Write a coop_min run's learned prompt as the official CoOp/CoCoOp code's checkpoint "
        "(OUT/prompt_learner/model.pth.tar-E and its checkpoint file)."))
    p.add_argument("run", metavar="RUN", help="a finished coop_min run folder (with prompt.safetensors)")
    p.add_argument("--official", metavar="OUT", required=True, help="the official run folder to write")
    p.add_argument("--weights", help="CLIP weights for the token buffers (default: the run's)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp16",
                   help="tensor dtype: fp16, the official default (PREC fp16), or fp32 (default fp16)")
    return p


def _main(argv):
    args = _parser().parse_args(argv)
    _, how = export(args.run, args.official, args.weights, args.dtype)
    print(how)


if __name__ == "__main__":
    main()
