"""ViT weights both ways: timm state dicts (classic ViTs and the `vit_*_xp_*` parallel-block models) and
big_vision / vision_transformer `.npz` files into our ViT, and our ViT back to a timm state dict with the
`timm.create_model` arguments that load it. The key maps are in the shared reference (weights.md, sections 1-3).

    module, params = load_vit("vit_base_patch16_224.safetensors", img_size=384)   # position embedding resampled
    state_dict, timm_args = to_timm(module, params)   # timm.create_model(**timm_args).load_state_dict(...)

Layouts: our position embedding covers the patches only and is added before the class token is prepended
(big_vision's layout, timm's `no_embed_class`); a timm class slot is folded into the class token
(cls + pos[0], exact for the forward) and written back as a zero slot. Our parallel block's fused kernels are
head-major (vit22b/models/vit.py `parallel_block_apply`); timm's `in_proj` rows are [mlp | q | k | v].
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b import models
from vit22b.models import vit
from vit22b.models.checkpoint_files import (CheckpointError, abstract_params, flax_weight, read_npz, read_state_dict,
                                             torch_weight)

# Position-embedding resampling as each source codebase does it (weights.md section 3): timm's state-dict filter
# (bicubic, antialiased), timm's npz loader (bilinear), big_vision's scipy zoom of order 1 (corners pinned).
RESAMPLE = ("bicubic", "bilinear", "big_vision")


# Our ViT's settings that a weight file determines (the rest: dtypes, scan, kernels, are the user's).
SETTINGS = ("width", "depth", "mlp_dim", "num_heads", "patch_size", "block", "norm", "qk_norm", "qkv_bias", "head",
            "posemb", "class_token", "pre_norm", "fc_norm", "gelu")


def _blocks(sd):
    return 1 + max((int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m), default=-1)


def timm_model_kw(sd, num_heads=None, head=None):
    """Our ViT settings for a timm state dict: shapes from the arrays, switches from the keys present."""
    if "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"no ViT patch embedding (patch_embed.proj.weight); first keys: {sorted(sd)[:3]}")
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    parallel = "blocks.0.in_proj.weight" in sd
    prefix = "blocks.0." if parallel else "blocks.0.attn."
    if f"{prefix}q_norm.weight" in sd:
        head_dim = sd[f"{prefix}q_norm.weight"].shape[0]
        num_heads = num_heads or width // head_dim
    if num_heads is None:  # not in the weights: the standard ViT of this width (vit.py's variants)
        by_width = {w: h for w, _, _, h in vit.VARIANTS.values()}
        if width not in by_width:
            raise CheckpointError(f"the number of heads of a width-{width} ViT is not in the file; pass num_heads")
        num_heads = by_width[width]
    mlp_dim = (sd["blocks.0.in_proj.weight"].shape[0] - 3 * width if parallel
               else sd["blocks.0.mlp.fc1.weight"].shape[0])
    if width % num_heads or (parallel and mlp_dim % num_heads):
        raise CheckpointError(f"num_heads {num_heads} does not divide the width {width}"
                              + (f" and the MLP's {mlp_dim} units" if parallel else ""))
    norm_key = "blocks.0.in_norm" if parallel else "blocks.0.norm1"
    if head is None:
        head = "map" if "attn_pool.latent" in sd else "token" if "cls_token" in sd and "fc_norm.weight" not in sd \
            else "gap"
    return dict(
        width=int(width), depth=_blocks(sd), mlp_dim=int(mlp_dim), num_heads=int(num_heads), patch_size=int(patch),
        block="parallel" if parallel else "sequential", norm="layernorm" if f"{norm_key}.bias" in sd else "rmsnorm",
        qk_norm=f"{prefix}q_norm.weight" in sd,
        qkv_bias=("blocks.0.in_proj.bias" in sd) if parallel else "blocks.0.attn.qkv.bias" in sd,
        head=head, posemb="learn", class_token="cls_token" in sd and head != "token",
        pre_norm="norm_pre.weight" in sd, fc_norm="fc_norm.weight" in sd, gelu="exact")


def _grid(n):
    g = int(round(n ** 0.5))
    if g * g != n:
        raise CheckpointError(f"position embedding of {n} patches is not a square grid")
    return g


def resample_posemb(pe, grid, method="bicubic"):
    """[1, g*g, D] -> [1, grid*grid, D], by `method` (RESAMPLE): 'bicubic' equals timm's
    resample_abs_pos_embed (antialiased), 'bilinear' its npz loader's, 'big_vision' scipy.ndimage.zoom(order=1)."""
    old = _grid(pe.shape[1])
    if old == grid:
        return pe
    x = jnp.asarray(pe, jnp.float32).reshape(old, old, -1)
    if method == "big_vision":  # linear with the corner pixel centres pinned (align_corners)
        c = jnp.linspace(0.0, old - 1.0, grid)
        yy, xx = jnp.meshgrid(c, c, indexing="ij")
        out = jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(ch, [yy, xx], order=1), in_axes=-1,
                       out_axes=-1)(x)
    elif method in ("bicubic", "bilinear"):
        out = jax.image.resize(x, (grid, grid, x.shape[-1]), "cubic" if method == "bicubic" else "linear",
                               antialias=method == "bicubic")
    else:
        raise CheckpointError(f"position-embedding resampling {method!r} is not one of {RESAMPLE}")
    return np.asarray(out.reshape(1, grid * grid, -1), np.float32)


def _norm(sd, key, kind):
    out = {"scale": sd.pop(f"{key}.weight")}
    if kind == "layernorm":
        out["bias"] = sd.pop(f"{key}.bias")
    return out


def timm_to_params(sd, kw, img_size, resample="bicubic"):
    """Our unscanned parameter tree (block_00, ...) from a timm state dict, for the ViT of settings `kw` at
    `img_size`; every key is consumed or named in an error."""
    sd = dict(sd)
    d, m, h, norm = kw["width"], kw["mlp_dim"], kw["num_heads"], kw["norm"]
    dh = d // h
    zeros = np.zeros(d, np.float32)
    p = {"embedding": {"kernel": torch_weight(sd.pop("patch_embed.proj.weight"))}}
    p["embedding"]["bias"] = sd.pop("patch_embed.proj.bias", np.zeros(d, np.float32))  # timm pre_norm: no bias
    pe = sd.pop("pos_embed")
    cls = sd.pop("cls_token", None)
    grid = img_size // kw["patch_size"]
    if cls is not None and not _is_square(pe.shape[1]) and _is_square(pe.shape[1] - 1):
        cls, pe = cls + pe[:, :1], pe[:, 1:]  # fold timm's class slot: the same forward
    p["pos_embedding"] = resample_posemb(pe, grid, resample)
    if cls is not None:
        p["cls"] = cls
    if kw["pre_norm"]:
        p["pre_norm"] = _norm(sd, "norm_pre", norm)
    for i in range(kw["depth"]):
        b = f"blocks.{i}."
        if kw["block"] == "parallel":
            w = sd.pop(b + "in_proj.weight")  # rows [mlp | q | k | v]
            mlp, q, k, v = w[:m], w[m:m + d], w[m + d:m + 2 * d], w[m + 2 * d:]
            per_head = [t.T.reshape(d, h, -1) for t in (q, k, v, mlp)]
            if b + "out_proj.weight" in sd:  # timm's fuse_out_proj: input columns [attention | MLP]
                fused = sd.pop(b + "out_proj.weight")
                attn_out, mlp_out = fused[:, :d], fused[:, d:]
                out_bias = sd.pop(b + "out_proj.bias", zeros)
            else:  # timm's proj_bias=False leaves the two biases out: zero
                attn_out, mlp_out = sd.pop(b + "attn_out_proj.weight"), sd.pop(b + "mlp_out_proj.weight")
                out_bias = sd.pop(b + "attn_out_proj.bias", zeros) + sd.pop(b + "mlp_out_proj.bias", zeros)
            blk = {"norm": _norm(sd, b + "in_norm", norm),
                   "in_kernel": np.concatenate(per_head, -1).reshape(d, -1),
                   "out_kernel": np.concatenate([attn_out.T.reshape(h, dh, d), mlp_out.T.reshape(h, m // h, d)],
                                                1).reshape(-1, d),
                   "out_bias": out_bias}
            if kw["qkv_bias"]:
                bias = sd.pop(b + "in_proj.bias")
                blk["mlp_bias"] = bias[:m]
                blk["qkv_bias"] = bias[m:].reshape(3, h, dh).transpose(1, 0, 2).reshape(-1)
            else:
                blk["mlp_bias"] = sd.pop(b + "mlp_bias")
            qk_norms = b
        else:
            blk = {"norm1": _norm(sd, b + "norm1", norm),
                   "qkv_kernel": torch_weight(sd.pop(b + "attn.qkv.weight")),
                   "attn_out_kernel": torch_weight(sd.pop(b + "attn.proj.weight")), "attn_out_bias": sd.pop(b + "attn.proj.bias"),
                   "norm2": _norm(sd, b + "norm2", norm),
                   "mlp_in_kernel": torch_weight(sd.pop(b + "mlp.fc1.weight")), "mlp_in_bias": sd.pop(b + "mlp.fc1.bias"),
                   "mlp_out_kernel": torch_weight(sd.pop(b + "mlp.fc2.weight")), "mlp_out_bias": sd.pop(b + "mlp.fc2.bias")}
            if kw["qkv_bias"]:
                blk["qkv_bias"] = sd.pop(b + "attn.qkv.bias")
            qk_norms = b + "attn."
        if kw["qk_norm"]:
            blk["q_norm"] = _norm(sd, qk_norms + "q_norm", norm)
            blk["k_norm"] = _norm(sd, qk_norms + "k_norm", norm)
        p[f"block_{i:02d}"] = blk
    p["fc_norm" if kw["fc_norm"] else "encoder_norm"] = _norm(sd, "fc_norm" if kw["fc_norm"] else "norm", norm)
    if kw["head"] == "map":
        kv = sd.pop("attn_pool.kv.weight")
        kv_bias = sd.pop("attn_pool.kv.bias")
        proj = lambda w: np.ascontiguousarray(w.T.reshape(d, h, dh))  # noqa: E731  [out, in] -> [in, heads, dh]
        p["map_head"] = {
            "probe": sd.pop("attn_pool.latent"),
            "attention": {"query": {"kernel": proj(sd.pop("attn_pool.q.weight")),
                                    "bias": sd.pop("attn_pool.q.bias").reshape(h, dh)},
                          "key": {"kernel": proj(kv[:d]), "bias": kv_bias[:d].reshape(h, dh)},
                          "value": {"kernel": proj(kv[d:]), "bias": kv_bias[d:].reshape(h, dh)},
                          "out": {"kernel": np.ascontiguousarray(sd.pop("attn_pool.proj.weight").T.reshape(h, dh, d)),
                                  "bias": sd.pop("attn_pool.proj.bias")}},
            "norm": _norm(sd, "attn_pool.norm", norm),
            "mlp_in": {"kernel": torch_weight(sd.pop("attn_pool.mlp.fc1.weight")), "bias": sd.pop("attn_pool.mlp.fc1.bias")},
            "mlp_out": {"kernel": torch_weight(sd.pop("attn_pool.mlp.fc2.weight")), "bias": sd.pop("attn_pool.mlp.fc2.bias")}}
    if "head.weight" in sd:
        p["head"] = {"kernel": torch_weight(sd.pop("head.weight")), "bias": sd.pop("head.bias")}
    if sd:
        raise CheckpointError(f"checkpoint parameters with no place in our ViT: {sorted(sd)[:6]}"
                              + (f" and {len(sd) - 6} more" if len(sd) > 6 else ""))
    return p


def _is_square(n):
    return n > 0 and int(round(n ** 0.5)) ** 2 == n


def params_to_timm(kw, p):
    """The timm state dict (numpy float32) of our unscanned parameter tree `p` of a ViT with settings `kw`."""
    d, m, h = kw["width"], kw["mlp_dim"], kw["num_heads"]
    dh = d // h
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    sd = {"patch_embed.proj.weight": flax_weight(p["embedding"]["kernel"])}
    if not kw["pre_norm"]:  # timm drops the patch bias with pre_norm
        sd["patch_embed.proj.bias"] = p["embedding"]["bias"]
    elif np.any(np.asarray(p["embedding"]["bias"])):
        raise CheckpointError("model.pre_norm: timm's pre-norm ViT has no patch-embedding bias, and this one's is "
                              "not zero")
    pe = f32(p["pos_embedding"])
    if kw["block"] == "sequential" and kw["head"] == "token":  # timm's classic layout: a (zero) class slot
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], 1)
    sd["pos_embed"] = pe
    if "cls" in p:
        sd["cls_token"] = p["cls"]

    def put_norm(key, q):
        sd[f"{key}.weight"] = q["scale"]
        if "bias" in q:
            sd[f"{key}.bias"] = q["bias"]

    if kw["pre_norm"]:
        put_norm("norm_pre", p["pre_norm"])
    for i in range(kw["depth"]):
        b, blk = f"blocks.{i}.", p[f"block_{i:02d}"]
        if kw["block"] == "parallel":
            cols = f32(blk["in_kernel"]).reshape(d, h, -1)
            q, k, v = (cols[..., s * dh:(s + 1) * dh].reshape(d, d) for s in range(3))
            mlp = cols[..., 3 * dh:].reshape(d, m)
            sd[b + "in_proj.weight"] = np.concatenate([mlp.T, q.T, k.T, v.T], 0)
            put_norm(b + "in_norm", blk["norm"])
            if kw["qkv_bias"]:
                qkv = f32(blk["qkv_bias"]).reshape(h, 3, dh).transpose(1, 0, 2).reshape(-1)
                sd[b + "in_proj.bias"] = np.concatenate([f32(blk["mlp_bias"]), qkv])
            else:
                sd[b + "mlp_bias"] = blk["mlp_bias"]
            rows = f32(blk["out_kernel"]).reshape(h, -1, d)
            sd[b + "attn_out_proj.weight"] = rows[:, :dh].reshape(d, d).T
            sd[b + "mlp_out_proj.weight"] = rows[:, dh:].reshape(m, d).T
            sd[b + "attn_out_proj.bias"] = blk["out_bias"]
            sd[b + "mlp_out_proj.bias"] = np.zeros(d, np.float32)
            qk_norms = b
        else:
            put_norm(b + "norm1", blk["norm1"])
            put_norm(b + "norm2", blk["norm2"])
            sd[b + "attn.qkv.weight"] = flax_weight(blk["qkv_kernel"])
            if kw["qkv_bias"]:
                sd[b + "attn.qkv.bias"] = blk["qkv_bias"]
            sd[b + "attn.proj.weight"] = flax_weight(blk["attn_out_kernel"])
            sd[b + "attn.proj.bias"] = blk["attn_out_bias"]
            for ours, theirs in (("mlp_in", "fc1"), ("mlp_out", "fc2")):
                sd[f"{b}mlp.{theirs}.weight"] = flax_weight(blk[f"{ours}_kernel"])
                sd[f"{b}mlp.{theirs}.bias"] = blk[f"{ours}_bias"]
            qk_norms = b + "attn."
        if kw["qk_norm"]:
            put_norm(qk_norms + "q_norm", blk["q_norm"])
            put_norm(qk_norms + "k_norm", blk["k_norm"])
    put_norm("fc_norm" if kw["fc_norm"] else "norm", p["fc_norm" if kw["fc_norm"] else "encoder_norm"])
    if kw["head"] == "map":
        a = p["map_head"]["attention"]
        flat = lambda t: f32(t["kernel"]).reshape(d, d).T  # noqa: E731  [in, heads, dh] -> [out, in]
        sd.update({"attn_pool.latent": p["map_head"]["probe"],
                   "attn_pool.q.weight": flat(a["query"]), "attn_pool.q.bias": f32(a["query"]["bias"]).reshape(d),
                   "attn_pool.kv.weight": np.concatenate([flat(a["key"]), flat(a["value"])], 0),
                   "attn_pool.kv.bias": np.concatenate([f32(a["key"]["bias"]).reshape(d),
                                                        f32(a["value"]["bias"]).reshape(d)]),
                   "attn_pool.proj.weight": f32(a["out"]["kernel"]).reshape(d, d).T,
                   "attn_pool.proj.bias": a["out"]["bias"],
                   "attn_pool.mlp.fc1.weight": flax_weight(p["map_head"]["mlp_in"]["kernel"]),
                   "attn_pool.mlp.fc1.bias": p["map_head"]["mlp_in"]["bias"],
                   "attn_pool.mlp.fc2.weight": flax_weight(p["map_head"]["mlp_out"]["kernel"]),
                   "attn_pool.mlp.fc2.bias": p["map_head"]["mlp_out"]["bias"]})
        put_norm("attn_pool.norm", p["map_head"]["norm"])
    if "head" in p:
        sd["head.weight"] = flax_weight(p["head"]["kernel"])
        sd["head.bias"] = p["head"]["bias"]
    return {k: f32(v) for k, v in sd.items()}


def timm_args(kw, img_size, num_classes):
    """`timm.create_model(**timm_args(...))` builds the timm model that our ViT of settings `kw` equals."""
    if kw.get("posemb", "learn") != "learn":
        raise CheckpointError("model.posemb: timm has no fixed sincos2d embedding for ViT; its values would be "
                              "exported as learned ones, which our loader reads back as posemb='learn'")
    mlp_ratio = kw["mlp_dim"] / kw["width"]
    if int(kw["width"] * mlp_ratio) != kw["mlp_dim"]:
        raise CheckpointError(f"model.mlp_dim: timm sizes the MLP as int(width * mlp_ratio), which cannot give "
                              f"{kw['mlp_dim']} at width {kw['width']}")
    parallel = kw["block"] == "parallel"
    classic_layout = not parallel and kw["head"] == "token"
    return {"model_name": "vit_base_patch16_xp_224" if parallel else "vit_base_patch16_224",
            "img_size": img_size, "patch_size": kw["patch_size"], "embed_dim": kw["width"], "depth": kw["depth"],
            "num_heads": kw["num_heads"], "mlp_ratio": mlp_ratio, "num_classes": num_classes,
            "qkv_bias": kw["qkv_bias"], "qk_norm": kw["qk_norm"], "norm_layer": kw["norm"],
            "class_token": kw["head"] == "token" or kw["class_token"], "no_embed_class": not classic_layout,
            "global_pool": {"token": "token", "gap": "avg", "map": "map"}[kw["head"]], "fc_norm": kw["fc_norm"],
            "pre_norm": kw["pre_norm"], "dynamic_img_size": False,
            "act_layer": "gelu_tanh" if kw.get("gelu") == "tanh" else "gelu"}


# ---- big_vision / vision_transformer .npz -> timm keys (weights.md section 3) ----

def npz_to_timm(npz):
    """A big_vision (linen, also scanned) or vision_transformer (pre-linen) parameter dict as timm state-dict keys:
    then one importer serves both."""
    npz = dict(npz)
    if "Transformer/encoderblock/LayerNorm_0/scale" in npz:  # scanned: depth on axis 0
        for k in [k for k in npz if k.startswith("Transformer/encoderblock/")]:
            v = npz.pop(k)
            for i in range(v.shape[0]):
                npz[k.replace("encoderblock/", f"encoderblock_{i}/")] = v[i]
    depth = 1 + max((int(m.group(1)) for k in npz for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m),
                    default=-1)
    if not depth:
        raise CheckpointError(f"no ViT encoder blocks (Transformer/encoderblock_N/...); first names: {sorted(npz)[:3]}")
    pop, sd = npz.pop, {}

    def dense(src, dst):  # kernel [in, out] (and bias) -> timm weight [out, in]
        sd[f"{dst}.weight"] = flax_weight(pop(f"{src}/kernel"))
        sd[f"{dst}.bias"] = pop(f"{src}/bias")

    def norm(src, dst):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = pop(f"{src}/scale"), pop(f"{src}/bias")

    def attention(src):  # flax MultiHeadDotProductAttention -> q, k, v weights and biases; out -> `proj`
        qkv = [pop(f"{src}/{n}/kernel") for n in ("query", "key", "value")]
        d = qkv[0].shape[0]
        biases = [pop(f"{src}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
        proj = (pop(f"{src}/out/kernel").reshape(-1, d).T, pop(f"{src}/out/bias"))
        return [t.reshape(d, -1).T for t in qkv], biases, proj

    sd["patch_embed.proj.weight"] = flax_weight(pop("embedding/kernel"))
    sd["patch_embed.proj.bias"] = pop("embedding/bias")
    for key in ("pos_embedding", "Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if key in npz:
            sd["pos_embed"] = pop(key)
    if "cls" in npz:
        sd["cls_token"] = pop("cls")
    pre_linen = any("MultiHeadDotProductAttention_1" in k for k in npz)
    mha, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if pre_linen
                     else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    for i in range(depth):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        norm(b + "LayerNorm_0", t + "norm1")
        norm(b + ln2, t + "norm2")
        (q, k, v), (qb, kb, vb), (sd[t + "attn.proj.weight"], sd[t + "attn.proj.bias"]) = attention(b + mha)
        sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"] = np.concatenate([q, k, v]), np.concatenate([qb, kb, vb])
        dense(f"{b}{mlp}/Dense_0", t + "mlp.fc1")
        dense(f"{b}{mlp}/Dense_1", t + "mlp.fc2")
    norm("Transformer/encoder_norm", "norm")
    for name in ("head", "pre_logits"):
        if f"{name}/kernel" in npz:
            dense(name, name)
    if "MAPHead_0/probe" in npz:
        sd["attn_pool.latent"] = pop("MAPHead_0/probe")
        (q, k, v), (qb, kb, vb), (sd["attn_pool.proj.weight"], sd["attn_pool.proj.bias"]) = attention(
            "MAPHead_0/MultiHeadDotProductAttention_0")
        sd.update({"attn_pool.q.weight": q, "attn_pool.q.bias": qb, "attn_pool.kv.weight": np.concatenate([k, v]),
                   "attn_pool.kv.bias": np.concatenate([kb, vb])})
        norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
        dense("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        dense("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    if npz:
        raise CheckpointError(f"npz parameters with no place in our ViT: {sorted(npz)[:6]}")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


# ---- one call from a file to (module, params) ----

def stack_blocks(module, p):
    """Our unscanned tree -> the module's layout (scanned modules hold the blocks stacked under `blocks`)."""
    if not module.scan:
        return p
    depth = sum(1 for k in p if k.startswith("block_"))
    out = {k: v for k, v in p.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[p[f"block_{i:02d}"] for i in range(depth)])
    return out


def unstack_blocks(p):
    if "blocks" not in p:
        return p
    out = {k: v for k, v in p.items() if k != "blocks"}
    depth = jax.tree.leaves(p["blocks"])[0].shape[0]
    for i in range(depth):
        out[f"block_{i:02d}"] = jax.tree.map(lambda x: np.asarray(x)[i], p["blocks"])
    return out


def load_vit(path, *, img_size=None, num_classes=None, num_heads=None, head=None, resample=None, state_dict=None,
             **model_kw):
    """(module, params) of our ViT from a timm state dict (.safetensors / .pth / .bin) or a big_vision /
    vision_transformer .npz (their tanh GELU: gelu='tanh'). Settings not given come from the file (`head`: 'token'
    where the file has a class token and no fc_norm: give head='gap' for a timm model that averages without one);
    model_kw sets the rest (dtype, param_dtype, scan, gelu='tanh' for timm's gelu_tanh models). img_size (default:
    the file's grid) resamples the position embedding as the source codebase does (`resample`, one of RESAMPLE:
    timm files bicubic, .npz files as big_vision); num_classes other than the file's replaces the head with a fresh
    zero-initialised one (0: no head, the model returns pre-logit features), as does dropping big_vision's
    pre_logits layer, which the old head was trained on. `state_dict`: the file's contents, already read.
    timm's parallel blocks are read as timm >= 1.0.25 computes them (earlier versions added mlp_bias to the wrong
    columns; shared reference weights.md section 2)."""
    path = str(path)
    npz = path.endswith(".npz")
    try:
        sd = dict(state_dict) if state_dict is not None else npz_to_timm(read_npz(path)) if npz else read_state_dict(path)
        if any(k.startswith("layers.") for k in sd):
            raise CheckpointError("this file holds a Swin model (layers.*), not a ViT")
        unknown = [k for k in sd if k == "reg_token" or re.search(r"\.(ls|ls1|ls2)\.gamma$", k)]
        if unknown:
            raise CheckpointError(f"{unknown[0]}: timm's register tokens and layer scale are not in our ViT")
        if "pre_logits.weight" in sd:
            if not num_classes:
                raise CheckpointError("pre_logits (big_vision's representation layer before the head) is not in our "
                                      "ViT; pass num_classes for a new head, which drops it with the old head")
            for k in ("pre_logits.weight", "pre_logits.bias", "head.weight", "head.bias"):
                sd.pop(k, None)
        kw = timm_model_kw(sd, num_heads, head) | ({"gelu": "tanh"} if npz else {}) | model_kw
        slot = "cls_token" in sd and not _is_square(sd["pos_embed"].shape[1])
        img_size = img_size or _grid(sd["pos_embed"].shape[1] - slot) * kw["patch_size"]
        file_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
        num_classes = file_classes if num_classes is None else num_classes
        if num_classes != file_classes:
            sd.pop("head.weight", None)
            sd.pop("head.bias", None)
        p = timm_to_params(sd, kw, img_size, resample or ("big_vision" if npz else "bicubic"))
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks {e.args[0]}, which a ViT with these settings has") from None
    except CheckpointError as e:
        raise CheckpointError(e.args[0] if e.args[0].startswith(path) else f"{path}: {e}") from None
    module = models.build("vit", kw, num_classes, img_size)
    if num_classes and "head" not in p:
        p["head"] = {"kernel": np.zeros((kw["width"], num_classes), np.float32),
                     "bias": np.full(num_classes, module.head_bias_init, np.float32)}
    params = stack_blocks(module, p)
    from vit22b.train.checkpointing import compare_trees
    expected = abstract_params(module, img_size, params["embedding"]["kernel"].shape[2])
    compare_trees(expected, params, path, CheckpointError)
    return module, jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)  # in model.param_dtype


def image_size(module, params):
    """The image size a ViT's parameters are for (its position-embedding grid times the patch)."""
    return _grid(np.shape(nn.meta.unbox(params)["pos_embedding"])[1]) * module.patch_size


def to_timm(module, params):
    """(timm state dict of float32 numpy arrays, timm.create_model keyword arguments) for our ViT `module`."""
    params = nn.meta.unbox(params)
    kw = {k: getattr(module, k) for k in SETTINGS}
    args = timm_args(kw, 0, module.num_classes)  # a model timm cannot express fails here, before anything is read
    args.update(img_size=image_size(module, params), in_chans=int(np.shape(params["embedding"]["kernel"])[2]))
    return params_to_timm(kw, unstack_blocks(jax.tree.map(np.asarray, params))), args
