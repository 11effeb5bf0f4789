"""coop_min: minimal CLIP, CoOp and CoCoOp in pure PyTorch.

    import coop_min
    clip, preprocess = coop_min.load("ViT-B/16")     # a file, one of OpenAI's names, or hf-hub:ORG/NAME
"""
import os

__version__ = "0.1.0"

# The wheel installs kernels/ and weights/ as coop_min.kernels and coop_min.weights. In a checkout
# they sit beside this folder instead, so the checkout's root joins this package's search path:
# the same sub-packages are found there, and the root never goes on sys.path, where kernels/ would
# shadow Hugging Face's `kernels` package (which transformers imports).
_here = os.path.dirname(os.path.realpath(__file__))
_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "kernels")) and os.path.isfile(os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)


def load(name_or_path, device=None):
    """(CLIP, preprocess) as OpenAI's clip.load: a converted file, one of OpenAI's nine model names
    (e.g. "ViT-B/16", downloaded once into the cache) or hf-hub:ORG/NAME; see coop_min.hub.load."""
    from coop_min import hub        # imported on use: `import coop_min.tokenizer` stays light
    return hub.load(name_or_path, device)
