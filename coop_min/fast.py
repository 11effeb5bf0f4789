"""The fast path: `FastPromptedCLIP` computes what `prompts.PromptedCLIP` computes, faster.

Each technique is exact by construction, and tests compare this object with the method
(fp32 to ~1e-5, bf16 to ~1e-2):
- EOT truncation: the text transformer is causal and only the EOT row is read, so sequences are cut
  after the last EOT of the batch (no kept position attends to a cut one).
- Batched CoCoOp: every (image, class) prompt of a step goes through the text encoder as one batch,
  in chunks of at most `max_prompts_per_chunk`, instead of one image at a time.
- Fused head: `kernels/cosine_ce.py` normalises, computes the logits and the cross-entropy with its
  gradient in one pass.
- Fused elementwise (`fused_elementwise=True`): on CUDA the frozen CLIP's LayerNorms and QuickGELUs
  run as `kernels/elementwise.py`; the object swaps them in a copy of the CLIP that shares its
  weights (the caller's CLIP is unchanged), as Liger-Kernel patches a model's modules.
- Fused attention (`fused_attention=True`): on CUDA the text encoder's causal attention, with or
  without a shared prefix, runs as `kernels/attention.py` (one program per sequence and head holds
  the whole short L x L tile), swapped in the same copy.
- Shared prefix (`shared_prefix=True`; unified context with the class name at the end, and CoCoOp):
  [SOS, ctx] is the same for every class (CoCoOp: for every class of one image), so it goes through
  the text encoder once and every class suffix attends to its cached keys and values. Less
  activation memory and fewer tokens, but twice the kernel launches: it pays when launches are cheap
  (a CUDA graph, `coop_min/cuda_graph.py`).
- Length buckets (`length_buckets=True`): prompts sorted by length and cut into chunks, each padded
  to its own longest prompt (padding after EOT is never read). Again fewer tokens for more launches.
- Class sharding (`class_shard`, data-parallel CoOp): this process encodes only its classes and a
  gather gives every process all the features (coop_min/distributed.py builds it).

No step reads a device value on the host (EOT positions are kept on the host), so a step can be
captured as a CUDA graph. The settings are a `FastConfig`, fixed when the object is built.
"""
import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from coop_min import clip as clip_module
from coop_min.kernels import elementwise
from coop_min.kernels.attention import causal_attention
from coop_min.kernels.cosine_ce import cosine_ce, cosine_logits, cosine_logits_reference, use_triton
from coop_min.prompts import PromptedCLIP

# What one more length bucket costs, in tokens of text-encoder work (bucket_cuts trades it against
# padding): a chunk runs every text layer's kernels once more, forward and backward, a few hundred
# launches; replayed from a CUDA graph (where buckets are on by default: train.py --cuda-graph) each
# costs about a microsecond of GPU time whatever its size, about what a token costs through the layers.
CHUNK_COST = 512


class ClassShard(NamedTuple):
    """Data-parallel CoOp (coop_min/distributed.py makes one): the classes this process encodes, as
    host ints, and the gather that gives every process all (C, D) features, gradients flowing back."""
    classes: Sequence[int]
    gather: Callable


@dataclass(frozen=True)
class FastConfig:
    max_prompts_per_chunk: int = 4096   # text-encoder batch limit (memory)
    fused_elementwise: bool = True      # LayerNorm / QuickGELU as Triton kernels where Triton runs
    fused_attention: bool = True        # the text's causal attention as a Triton kernel where Triton runs
    shared_prefix: bool = False         # [SOS, ctx] encoded once (unified context at the end; CoCoOp)
    length_buckets: bool = False        # chunks padded to their own longest prompt
    class_shard: ClassShard | None = None   # CoOp under torchrun: encode only this process's classes


# ----------------------------------------------------------------------------------------------
# fused LayerNorm, QuickGELU and causal attention in a copy of the CLIP


class _FusedLayerNorm(clip_module.LayerNorm):
    def forward(self, x):
        if use_triton(x):
            return elementwise.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class _FusedQuickGELU(clip_module.QuickGELU):
    def forward(self, x):
        return elementwise.quick_gelu(x) if use_triton(x) else super().forward(x)


class _FusedAttention(clip_module.Attention):
    def forward(self, x, causal=False):
        return _attention(self, x)[0] if causal and use_triton(x) else super().forward(x, causal)


def fused_copy(clip, elementwise=True, attention=True):
    """A copy of `clip` sharing its parameters and buffers whose LayerNorms and QuickGELUs
    (elementwise) and causal attentions (attention) run the fused kernels where Triton runs (CUDA
    tensors, or TRITON_INTERPRET=1) and their plain selves elsewhere. Make it after casting the CLIP
    (convert_dtype replaces buffers)."""
    swaps = {**({clip_module.LayerNorm: _FusedLayerNorm, clip_module.QuickGELU: _FusedQuickGELU} if elementwise
                else {}), **({clip_module.Attention: _FusedAttention} if attention else {})}
    shared = {id(t): t for t in [*clip.parameters(), *clip.buffers()]}
    fused = copy.deepcopy(clip, memo=shared)          # new modules, the same tensors
    for module in fused.modules():
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]        # same parameters and names, other forward
    return fused


def encode_text(clip, tokens):
    """CLIP.encode_text cut after the last EOT (exact): tokens (N, L) long -> (N, D)."""
    eot = tokens.argmax(dim=-1)
    return clip.encode_text_embeddings(clip.token_embedding(tokens[:, :int(eot.max()) + 1]), eot)


# ----------------------------------------------------------------------------------------------
# the text encoder on sequences that share a prefix


def _attention(attn, x, prefix_kv=None, group=None):
    """Causal self-attention of clip.Attention `attn` on x (B, L, W) -> (output (B, L, W), its (k, v)).

    prefix_kv: keys/values (G, h, P, hs) of a prefix that every row continues; row b uses prefix
    group[b] (prefix 0 for all when group is None), exactly as if it had been prepended to the row."""
    B, L, W = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)                # (B, L, 3W)
    q, k, v = qkv.view(B, L, 3, attn.heads, W // attn.heads).permute(2, 0, 3, 1, 4)   # (B, h, L, hs)
    if isinstance(attn, _FusedAttention) and use_triton(x):                 # kernels/attention.py
        y = causal_attention(q, k, v, *(prefix_kv or (None, None)), group)
    elif prefix_kv is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        pk, pv = prefix_kv
        if group is None:                        # backward sums over the rows with fp32 accumulation
            pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
        else:  # gathered in fp32: backward index-adds hundreds of rows into each prefix, which bf16 would lose
            pk, pv = pk.float()[group].to(pk.dtype), pv.float()[group].to(pv.dtype)
        P = pk.shape[2]
        mask = torch.ones(L, P + L, dtype=torch.bool, device=x.device).tril(diagonal=P)  # row j sees <= P + j
        y = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)
    return attn.out_proj(y.transpose(1, 2).reshape(B, L, W)), (k, v)


def _text_blocks(clip, x, prefix_kvs=None, group=None):
    """The text transformer's blocks on x (B, L, W) -> (x, each layer's (k, v))."""
    kvs = []
    for i, block in enumerate(clip.transformer.resblocks):
        a, kv = _attention(block.attn, block.ln_1(x), None if prefix_kvs is None else prefix_kvs[i], group)
        x = x + a
        x = x + block.mlp(block.ln_2(x))
        kvs.append(kv)
    return x, kvs


def text_prefix_kvs(clip, prefix):
    """Each text layer's keys and values (G, h, P, hs) for prefixes (G, P, W) of token embeddings."""
    P = prefix.shape[1]
    return _text_blocks(clip, prefix.to(clip.dtype) + clip.positional_embedding[:P].to(clip.dtype))[1]


def encode_text_prefixed(clip, prefix, suffix, eot, group=None, length=None, kvs=None):
    """Text features of the sequences [prefix[group[n]], suffix[n]] -> (N, D).

    prefix (G, P, W) and suffix (N, S, W) are token embeddings; eot (N,) are EOT positions in the
    full sequence (>= P); group (N,) picks each row's prefix (None: G == 1). Each prefix goes through
    the transformer once (kvs: text_prefix_kvs(clip, prefix), computed here unless given) and the
    suffixes attend to its keys/values. length: where to cut (> max(eot)) when the caller knows it
    on the host; else it is read from the device.
    """
    P = prefix.shape[1]
    if length is None:
        if int(eot.min()) < P:
            raise ValueError(f"an EOT position ({int(eot.min())}) lies inside the shared prefix of length {P}")
        length = int(eot.max()) + 1
    S = length - P                                                           # EOT truncation
    kvs = text_prefix_kvs(clip, prefix) if kvs is None else kvs
    x = suffix[:, :S].to(clip.dtype) + clip.positional_embedding[P:P + S].to(clip.dtype)
    x = _text_blocks(clip, x, kvs, group)[0]
    x = x[torch.arange(x.shape[0], device=x.device), eot - P]                # (N, W)
    return clip.ln_final(x) @ clip.text_projection.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# length buckets


def bucket_cuts(eots, max_per_chunk, chunk_cost=CHUNK_COST):
    """Chunks of prompts with EOT positions `eots` (host ints), sorted by length: [(their indices,
    padded length)], at most max_per_chunk prompts each, with the least padded tokens + chunk_cost
    per chunk.

    Exact: a chunk that ends inside a run of equal lengths, not full, could take more of that run at
    no cost to itself and with less for the next; so some best plan cuts only at run ends and after
    full chunks, and a dynamic program over those cut points (from the back) finds it."""
    order = sorted(range(len(eots)), key=eots.__getitem__)
    n, pad = len(order), [eots[i] + 1 for i in order]           # a chunk ending at j pads to pad[j - 1]
    ends = [j for j in range(1, n + 1) if j == n or pad[j] > pad[j - 1]]
    starts = {b + k * max_per_chunk for b in (0, *ends) for k in range(n // max_per_chunk + 1)}
    best = {n: (0, n)}                                           # start -> (cost from there, its chunk's end)
    for a in sorted((s for s in starts if s < n), reverse=True):
        stops = [j for j in ends if a < j <= a + max_per_chunk] + ([a + max_per_chunk] if a + max_per_chunk < n else [])
        cost = {j: (j - a) * pad[j - 1] + chunk_cost + best[j][0] for j in stops}
        j = min(reversed(stops), key=cost.get)                    # on a tie, the longer chunk
        best[a] = cost[j], j
    chunks, a = [], 0
    while a < n:
        chunks.append((order[a:best[a][1]], pad[best[a][1] - 1]))
        a = best[a][1]
    return chunks


# ----------------------------------------------------------------------------------------------
# the fast prompted classifier


class FastPromptedCLIP(PromptedCLIP):
    """PromptedCLIP's numbers with the techniques of this file; shares `learner` (and the CLIP's
    weights) with whatever else holds them."""

    def __init__(self, clip, learner, config: FastConfig = FastConfig()):
        fused = config.fused_elementwise or config.fused_attention
        super().__init__(fused_copy(clip, config.fused_elementwise, config.fused_attention) if fused else clip, learner)
        self.config = config
        self._plans = {}                         # (EOT positions, device) -> chunks, see _chunks
        self._indices = {}                       # host index lists -> device tensors

    def _chunks(self, eots, device):
        """[(prompt indices (n,) long, padded length)] and the permutation back to prompt order
        (None when plain chunks in order), built once per prompt set and device (outside any capture)."""
        key = (tuple(eots), str(device))
        if key not in self._plans:
            n, limit = len(eots), self.config.max_prompts_per_chunk
            cuts = bucket_cuts(eots, limit, CHUNK_COST) if self.config.length_buckets else [
                (list(range(a, min(a + limit, n))), max(eots) + 1) for a in range(0, n, limit)]
            order = [i for idx, _ in cuts for i in idx]
            in_order = order == list(range(n))
            whole = len(cuts) == 1 and in_order      # one chunk in order: index itself, no gather
            chunks = [(None if whole else torch.tensor(idx, device=device), length) for idx, length in cuts]
            inverse = None if in_order else torch.tensor(order, device=device).argsort()
            self._plans[key] = chunks, inverse
        return self._plans[key]

    def _encode_chunks(self, encode, index, eots):
        """encode(index part, length) -> features, over `index` (N,) in chunks, in index order."""
        chunks, inverse = self._chunks(eots, index.device)
        t = torch.cat([encode(index if i is None else index[i], length) for i, length in chunks])
        return t if inverse is None else t[inverse]

    def _prefix_shared(self):
        lrn = self.learner
        return self.config.shared_prefix and lrn.ctx.dim() == 2 and getattr(lrn, "class_token_position", "end") == "end"

    def text_features(self, image_features=None):
        if self.is_conditional:
            return self._cocoop_text_features(image_features)
        if image_features is not None:
            raise ValueError("CoOp text features do not depend on images; call text_features()")
        lrn, shard = self.learner, self.config.class_shard
        classes = range(lrn.n_cls) if shard is None else shard.classes         # host ints
        if self._prefix_shared():                                           # one prefix for every class
            prefix = torch.cat([lrn.token_prefix[:1], lrn.ctx[None].to(lrn.token_prefix.dtype)], 1)
            kvs = text_prefix_kvs(self.clip, prefix)

            def encode(c, length):
                return encode_text_prefixed(self.clip, prefix, lrn.token_suffix[c], lrn.eot[c], length=length, kvs=kvs)
        elif lrn.class_token_position == "end":                             # only the first `length` tokens built
            def encode(c, length):
                ctx = (lrn.ctx[c] if lrn.ctx.dim() == 3 else lrn.ctx.expand(len(c), -1, -1)).to(lrn.token_prefix.dtype)
                prompts = torch.cat([lrn.token_prefix[c], ctx, lrn.token_suffix[c, :length - 1 - lrn.n_ctx]], 1)
                return self.clip.encode_text_embeddings(prompts, lrn.eot[c])
        else:
            def encode(c, length):
                return self.clip.encode_text_embeddings(lrn(c)[:, :length], lrn.eot[c])
        t = self._encode_chunks(encode, self._index(classes), [lrn.eot_list[c] for c in classes])
        return t if shard is None else shard.gather(t)

    def _index(self, items):  # host ints -> a long tensor on the learner's device, made once
        key = items if isinstance(items, range) else tuple(items)   # a range hashes in O(1) each step
        if key not in self._indices:
            self._indices[key] = torch.tensor(list(key), device=self.learner.eot.device)
        return self._indices[key]

    def _cocoop_text_features(self, image_features):  # (B, D) -> (B, C, D)
        lrn = self.learner
        f = self.meta_net_input(image_features)
        B, C, dtype = len(f), lrn.n_cls, lrn.token_prefix.dtype
        # (B, M, W) fp32, cast after the gather: the backward sums each image's C class gradients, and
        # in bf16 that sum over hundreds of classes loses most of the gradient
        ctx = lrn.shifted_ctx(f)
        pairs = self._index(range(B * C))                                  # (image, class) = divmod(pair, C)
        if self._prefix_shared():                                           # one prefix per image
            prefix = torch.cat([lrn.token_prefix[:1].expand(B, -1, -1), ctx.to(dtype)], 1)
            kvs = text_prefix_kvs(self.clip, prefix)

            def encode(i, length):
                c = i % C
                return encode_text_prefixed(self.clip, prefix, lrn.token_suffix[c], lrn.eot[c], i // C, length, kvs)
        else:
            def encode(i, length):
                c = i % C
                suffix = lrn.token_suffix[c, :length - 1 - lrn.n_ctx]
                prompts = torch.cat([lrn.token_prefix[c], ctx[i // C].to(dtype), suffix], 1)
                return self.clip.encode_text_embeddings(prompts, lrn.eot[c])
        return self._encode_chunks(encode, pairs, lrn.eot_list * B).view(B, C, -1)

    def logits_from_features(self, image_features, text=None):  # (B, D) -> (B, C) fp32
        t = self.text_features(image_features if self.is_conditional else None) if text is None else text
        dtype = torch.promote_types(image_features.dtype, t.dtype)
        f, t = image_features.to(dtype), t.to(dtype)
        if torch.is_grad_enabled() and t.requires_grad:                     # the logits kernel has no backward
            return cosine_logits_reference(f, t, self.scale())
        return cosine_logits(f, t, self.scale())

    def loss(self, images_or_features, labels, text=None, check_labels=True):
        """check_labels=False: the labels were checked on the host (cosine_ce skips its one sync)."""
        x = images_or_features
        f = self.encode_images(x) if x.dim() == 4 else x
        t = self.text_features(f if self.is_conditional else None) if text is None else text
        dtype = torch.promote_types(f.dtype, t.dtype)
        return cosine_ce(f.to(dtype), t.to(dtype), self.scale(), labels, check_labels=check_labels)
