"""The fast path: `FastPromptedCLIP` computes what `prompts.PromptedCLIP` computes, faster.

Each technique is exact by construction, and tests compare this object with the method
(fp32 to ~1e-5, bf16 to ~1e-2):
- EOT truncation: the text transformer is causal and only the EOT row is read, so sequences are cut
  after the last EOT of the batch (no kept position attends to a cut one).
- Batched CoCoOp: every (image, class) prompt of a step goes through the text encoder as one batch,
  in chunks of at most `max_prompts_per_chunk`, instead of one image at a time.
- Prompts as the encoder reads them (class name at the end): SOS, the class tokens after the context
  and all their positional embeddings never change, so they are cast and summed once (`_tails`, cut
  after the longest prompt); a step adds the context's positions to the context and writes each
  chunk's prompts with one `cat`, reading the frozen part as a view where the chunk's prompts are a
  run (else gathered once per prompt set). The method gathers, concatenates, casts and adds each step.
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
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from coop_min import clip as clip_module
from coop_min.kernels import elementwise
from coop_min.kernels.attention import causal_attention_packed
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
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(B, L, 3, attn.heads, W // attn.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)                                    # (B, h, L, hs) views
    if isinstance(attn, _FusedAttention) and use_triton(x):                 # kernels/attention.py
        y = causal_attention_packed(qkv, *(prefix_kv or (None, None)), group)   # its backward writes dqkv packed
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


def encode_text_prefixed(clip, prefix, suffix, eot, group=None):
    """Text features of the sequences [prefix[group[n]], suffix[n]] -> (N, D).

    prefix (G, P, W) and suffix (N, S, W) are token embeddings; eot (N,) are EOT positions in the
    full sequence (>= P); group (N,) picks each row's prefix (None: G == 1). Each prefix goes through
    the transformer once and the suffixes, cut after the last EOT, attend to its keys/values.
    """
    P = prefix.shape[1]
    if int(eot.min()) < P:
        raise ValueError(f"an EOT position ({int(eot.min())}) lies inside the shared prefix of length {P}")
    S = int(eot.max()) + 1 - P                                               # EOT truncation
    x = suffix[:, :S].to(clip.dtype) + clip.positional_embedding[P:P + S].to(clip.dtype)
    return _encode_after_prefix(clip, x, eot - P, text_prefix_kvs(clip, prefix), group)


def _encode_after_prefix(clip, x, eot, kvs, group=None):
    """Features of suffixes x (N, S, W), positional embeddings added, that continue the prefixes whose
    keys/values are kvs; eot (N,) are positions in x."""
    return _text_head(clip, _text_blocks(clip, x, kvs, group)[0], eot)


def _encode_positioned(clip, x, eot):
    """encode_text_embeddings on prompts x (N, L, W) whose positional embeddings are already added."""
    return _text_head(clip, clip.transformer(x, causal=True), eot)


def _text_head(clip, x, eot):  # the last layer's output (N, L, W), EOT positions (N,) -> (N, D)
    x = x[torch.arange(x.shape[0], device=x.device), eot]                   # (N, W): only EOT rows
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


class _Chunk(NamedTuple):
    """One text-encoder batch, made once per prompt set (outside any capture): the frozen part of its
    prompts as the encoder reads it, and where each prompt reads its context and its EOT."""
    tails: torch.Tensor                 # (n, S, W) or, for a run of images x a run of classes, (ni, nc, S, W)
    ctx: slice | torch.Tensor | None    # rows of the context (CSC: classes, CoCoOp: images); None: shared
    eot: torch.Tensor                   # (n,) EOT positions
    group: torch.Tensor | None          # CoCoOp: (n,) each prompt's image (its prefix with --shared-prefix)


class FastPromptedCLIP(PromptedCLIP):
    """PromptedCLIP's numbers with the techniques of this file; shares `learner` (and the CLIP's
    weights) with whatever else holds them."""

    def __init__(self, clip, learner, config: FastConfig = FastConfig()):
        fused = config.fused_elementwise or config.fused_attention
        super().__init__(fused_copy(clip, config.fused_elementwise, config.fused_attention) if fused else clip, learner)
        self.config = config
        self._plans = {}                         # prompt set -> (chunks, permutation back), see _plan
        pos, dtype, M, L = self.clip.positional_embedding, self.clip.dtype, learner.n_ctx, max(learner.eot_list) + 1
        with torch.no_grad():                    # the sums encode_text_embeddings would form at every step
            self.register_buffer("_sos", learner.token_prefix[:1].to(dtype) + pos[:1].to(dtype), persistent=False)
            self.register_buffer("_ctx_pos", pos[1:1 + M].to(dtype), persistent=False)          # (M, W)
            self.register_buffer("_tails", learner.token_suffix[:, :L - 1 - M].to(dtype) + pos[1 + M:L].to(dtype),
                                 persistent=False)                                              # (C, L-1-M, W)

    def _plan(self, eots, rows, runs):
        """Chunks of the prompts with EOT positions `eots` (host ints) and the permutation back to prompt
        order (None: in order), made once per prompt set and device. rows(ids) -> (context rows, tail
        rows, images) of prompts `ids`; runs: the chunks without buckets, [(ids, length)]."""
        key = (tuple(eots), str(self._tails.device), self._tails.dtype)
        if key not in self._plans:
            limit = self.config.max_prompts_per_chunk
            cuts = bucket_cuts(eots, limit, CHUNK_COST) if self.config.length_buckets else runs
            device, chunks = self._tails.device, []
            for ids, length in cuts:
                ctx, tails, images = rows(ids)
                tails = self._tails[tails, :length - 1 - self.learner.n_ctx]          # a view, or gathered once
                if isinstance(ctx, slice) and images is not None:                 # a run of images x a run of classes
                    tails = tails.expand(ctx.stop - ctx.start, -1, -1, -1)
                group = None if images is None else torch.tensor(images, device=device)
                chunks.append(_Chunk(tails, ctx, torch.tensor([eots[i] for i in ids], device=device), group))
            order = [i for ids, _ in cuts for i in ids]
            inverse = None if order == list(range(len(eots))) else torch.tensor(order, device=device).argsort()
            self._plans[key] = chunks, inverse
        return self._plans[key]

    def _prefix_shared(self):
        lrn = self.learner
        return self.config.shared_prefix and lrn.ctx.dim() == 2 and getattr(lrn, "class_token_position", "end") == "end"

    def _prefix_kvs(self, ctx):  # fp32 contexts (G, M, W) -> each text layer's keys/values of [SOS, ctx]
        prefix = torch.cat([self._sos.expand(len(ctx), -1, -1), ctx.to(self.clip.dtype) + self._ctx_pos], 1)
        return _text_blocks(self.clip, prefix)[1]                           # (G, 1 + M, W) went in

    def _prompts(self, ctx, chunk):
        """One chunk's prompts (n, L, W) in the CLIP dtype, positions added: [SOS, context, tail].
        ctx: the fp32 context, (M, W) shared, (C, M, W) per class or (B, M, W) per image. Rows are
        gathered before the cast: a gather's backward adds its prompts' gradients one at a time, which
        in bf16 loses most of a sum over hundreds of prompts (an expand's backward is one reduction,
        accumulated in fp32)."""
        x = (ctx if chunk.ctx is None else ctx[chunk.ctx]).to(self.clip.dtype) + self._ctx_pos
        tails = chunk.tails
        if tails.dim() == 4:                                                # images x classes
            x = x[:, None].expand(-1, tails.shape[1], -1, -1)
        elif x.dim() == 2:
            x = x.expand(len(tails), -1, -1)
        sos = self._sos.expand(*tails.shape[:-2], 1, -1)
        return torch.cat([sos, x, tails], -2).flatten(0, -3)

    def text_features(self, image_features=None):
        if self.is_conditional:
            return self._cocoop_text_features(image_features)
        if image_features is not None:
            raise ValueError("CoOp text features do not depend on images; call text_features()")
        lrn, shard = self.learner, self.config.class_shard
        classes = range(lrn.n_cls) if shard is None else shard.classes         # host ints
        t = self._coop_end(classes) if lrn.class_token_position == "end" else self._coop_rearranged(classes)
        return t if shard is None else shard.gather(t)

    def _coop_end(self, classes):  # the class name at the end: (n, D) for classes (host ints)
        lrn = self.learner
        eots, limit = [lrn.eot_list[c] for c in classes], self.config.max_prompts_per_chunk
        runs = [(range(a, min(a + limit, len(eots))), max(eots) + 1) for a in range(0, len(eots), limit)]
        chunks, inverse = self._plan(eots, partial(self._coop_rows, classes), runs)
        if self._prefix_shared():                                           # one prefix for every class
            P = 1 + lrn.n_ctx
            kvs = self._prefix_kvs(lrn.ctx[None])
            t = [_encode_after_prefix(self.clip, c.tails, c.eot - P, kvs) for c in chunks]
        else:
            t = [_encode_positioned(self.clip, self._prompts(lrn.ctx, c), c.eot) for c in chunks]
        return torch.cat(t) if inverse is None else torch.cat(t)[inverse]

    def _coop_rows(self, classes, ids):  # prompts `ids` of the class list -> (context rows, tail rows, None)
        c = [classes[i] for i in ids]
        run = c == list(range(c[0], c[-1] + 1))
        rows = slice(c[0], c[-1] + 1) if run else torch.tensor(c, device=self._tails.device)
        return (rows if self.learner.ctx.dim() == 3 else None), rows, None

    def _coop_rearranged(self, classes):  # the class name in the middle or front: chunks of lrn(classes)
        lrn, limit, C = self.learner, self.config.max_prompts_per_chunk, len(classes)
        t = []
        for a in range(0, C, limit):
            c = torch.tensor(classes[a:a + limit], device=lrn.eot.device)
            t.append(self.clip.encode_text_embeddings(lrn(c)[:, :max(lrn.eot_list) + 1], lrn.eot[c]))
        return torch.cat(t)

    def _cocoop_text_features(self, image_features):  # (B, D) -> (B, C, D)
        lrn = self.learner
        f = self.meta_net_input(image_features)
        B, C, limit = len(f), lrn.n_cls, self.config.max_prompts_per_chunk
        ctx = lrn.shifted_ctx(f)                                            # (B, M, W) fp32
        L = max(lrn.eot_list) + 1
        if C <= limit:                           # without buckets: runs of whole images ...
            runs = [(range(b * C, min(b + limit // C, B) * C), L) for b in range(0, B, limit // C)]
        else:                                    # ... or runs of one image's classes
            runs = [(range(b * C + k, b * C + min(k + limit, C)), L) for b in range(B) for k in range(0, C, limit)]
        chunks, inverse = self._plan(lrn.eot_list * B, partial(self._cocoop_rows, C), runs)
        if self._prefix_shared():                                           # one prefix per image
            P = 1 + lrn.n_ctx
            kvs = self._prefix_kvs(ctx)
            t = [_encode_after_prefix(self.clip, c.tails.flatten(0, -3), c.eot - P, kvs, c.group) for c in chunks]
        else:
            t = [_encode_positioned(self.clip, self._prompts(ctx, c), c.eot) for c in chunks]
        t = torch.cat(t) if inverse is None else torch.cat(t)[inverse]
        return t.view(B, C, -1)

    def _cocoop_rows(self, C, ids):
        """Prompts `ids` (image * C + class) -> (context rows, tail rows, each prompt's image): slices
        where they are a run of images x a run of classes, else one row per prompt."""
        images, classes = [i // C for i in ids], [i % C for i in ids]
        i0, c0, ni, nc = images[0], classes[0], images[-1] + 1 - images[0], classes[-1] + 1 - classes[0]
        if list(ids) == [(i0 + a) * C + c0 + b for a in range(ni) for b in range(nc)]:
            return slice(i0, i0 + ni), slice(c0, c0 + nc), images
        device = self._tails.device
        return torch.tensor(images, device=device), torch.tensor(classes, device=device), images

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
