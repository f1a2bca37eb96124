"""Models: the ViT family with every ViT-22B change as a switch (vit.py), Swin Transformer V2 (swinv2.py), the
reference layers they are built from (layers.py), the one attention entry point with its fused kernels
(attention.py), the opt-in XLA:CPU kernels (cpu/), SimMIM's masked-image modelling around either family
(simmim.py), and weights both ways with PyTorch and big_vision (convert.py, vit_weights.py, checkpoint_files.py).

This module is the registry: `config.model_name` picks a family, `config.model` holds its settings.

`resolve(name, model_cfg, num_classes, image_size)` turns a config into constructor kwargs and checks them,
raising ValueErrors that start with the config field (`model.width: ...`) before anything is traced.
"""
import dataclasses

import jax.numpy as jnp

from vit22b.models import attention, layers, swinv2, vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
VIT_SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
SWIN_SHAPE_KEYS = ("embed_dim", "depths", "num_heads", "drop_path_rate")
FAMILIES = {"vit": vit.ViT, "swinv2": swinv2.SwinTransformerV2}


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _check(cond, field, msg):
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _common(cfg, cls, name):
    for key in ("dtype", "param_dtype"):
        if key in cfg:
            _check(cfg[key] in DTYPES, f"model.{key}", f"unknown dtype {cfg[key]!r}; expected one of {sorted(DTYPES)}")
            cfg[key] = DTYPES[cfg[key]]
    unknown = set(cfg) - _fields(cls)
    _check(not unknown, f"model.{sorted(unknown)[0] if unknown else ''}",
           f"unknown {name} model key; known keys: {sorted(_fields(cls) | {'variant'})}")
    policy = cfg.get("remat_policy", "none")
    _check(policy in vit.REMAT_POLICIES, "model.remat_policy", f"{policy!r} is not one of {sorted(vit.REMAT_POLICIES)}")
    impl = cfg.get("impl", "reference")
    _check(isinstance(impl, str), "model.impl", f"expected 'reference' or 'cpu', got {impl!r}")
    if impl != "reference":
        from vit22b.models import cpu
        cpu.parse(impl)  # a ValueError naming model.impl
    _check(cfg.get("attention_impl", "auto") in attention.IMPLS, "model.attention_impl",
           f"{cfg.get('attention_impl')!r} is not one of {attention.IMPLS}")
    return cfg


def _check_attention(kw, head_dims, lengths, has_bias):
    """An explicit attention kernel that cannot run one of the model's attentions: an error before tracing."""
    dtype = kw.get("dtype", jnp.float32)
    for head_dim, (q_len, kv_len) in zip(head_dims, lengths):
        attention.check(kw.get("attention_impl", "auto"), dtype, head_dim, q_len, kv_len, has_bias)


def _vit(cfg, num_classes, image_size):
    variant = cfg.pop("variant", None)
    shape = vit.decode_variant(variant) if variant else {}
    for key in VIT_SHAPE_KEYS:
        if cfg.get(key) is not None:
            shape[key] = cfg[key]
        _check(key in shape, f"model.{key}", "not set and no model.variant to take it from")
        cfg.pop(key, None)
    kw = dict(num_classes=num_classes, **shape, **_common(cfg, vit.ViT, "vit"))
    for key, choices in (("block", vit.BLOCKS), ("norm", vit.NORMS), ("head", vit.HEADS), ("posemb", vit.POSEMBS),
                         ("parallel_linear", vit.PARALLEL_LINEAR), ("collective_ring", vit.COLLECTIVE_RINGS),
                         ("gelu", tuple(layers.GELUS))):
        _check(kw.get(key, getattr(vit.ViT, key)) in choices, f"model.{key}", f"{kw.get(key)!r} is not one of {choices}")
    layers.ops(kw.get("impl", "reference"), kw.get("attention_impl", "auto"), kw.get("gelu", "exact"))  # model.gelu
    for key in VIT_SHAPE_KEYS:
        _check(isinstance(kw[key], int) and kw[key] > 0, f"model.{key}", f"must be a positive integer, got {kw[key]!r}")
    _check(kw["width"] % kw["num_heads"] == 0, "model.width",
           f"width {kw['width']} is not divisible by model.num_heads = {kw['num_heads']}")
    if kw.get("block", vit.ViT.block) == "parallel":  # the fused layout is head-major: each head owns m/h units
        _check(kw["mlp_dim"] % kw["num_heads"] == 0, "model.mlp_dim",
               f"the parallel block needs mlp_dim {kw['mlp_dim']} divisible by model.num_heads = {kw['num_heads']}")
    elif kw.get("parallel_linear", "xla") == "collective":
        _check(False, "model.parallel_linear", "'collective' applies to model.block = 'parallel' only")
    _check(image_size % kw["patch_size"] == 0, "input.image_size",
           f"image size {image_size} is not divisible by model.patch_size = {kw['patch_size']}")
    if kw.get("posemb") == "sincos2d":
        _check(kw["width"] % 4 == 0, "model.width", "sincos2d position embedding needs width % 4 == 0")
    head = kw.get("head", vit.ViT.head)
    patches = (image_size // kw["patch_size"]) ** 2
    tokens = patches + (head == "token" or bool(kw.get("class_token")))
    lengths = [(tokens, tokens)] + ([(1, patches)] if head == "map" else [])
    _check_attention(kw, [kw["width"] // kw["num_heads"]] * len(lengths), lengths, has_bias=False)
    return kw


def _swinv2(cfg, num_classes, image_size):
    variant = cfg.pop("variant", None)
    if variant:
        _check(variant in swinv2.VARIANTS, "model.variant",
               f"unknown Swin V2 variant {variant!r}; expected one of {sorted(swinv2.VARIANTS)}")
        defaults = dict(zip(SWIN_SHAPE_KEYS, swinv2.VARIANTS[variant]),
                        extra_norm_every=swinv2.EXTRA_NORM_EVERY.get(variant, 0))
        for key, value in defaults.items():
            if cfg.get(key) is None:
                cfg[key] = value
    for key in ("depths", "num_heads", "pretrained_window_sizes"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    cfg = {k: v for k, v in cfg.items() if v is not None}
    kw = dict(num_classes=num_classes, img_size=image_size, **_common(cfg, swinv2.SwinTransformerV2, "swinv2"))
    m = swinv2.SwinTransformerV2(**kw)
    depths, heads = m.depths, m.num_heads
    for key, choices in (("norm_position", swinv2.NORM_POSITIONS), ("attention", swinv2.ATTENTIONS),
                         ("position_bias", swinv2.POSITION_BIASES)):  # Swin V1 / V2 switches
        _check(getattr(m, key) in choices, f"model.{key}", f"{getattr(m, key)!r} is not one of {choices}")
    _check(len(heads) == len(depths), "model.num_heads", f"{len(heads)} entries for {len(depths)} stages")
    _check(len(m.pretrained_window_sizes) == len(depths), "model.pretrained_window_sizes",
           f"{len(m.pretrained_window_sizes)} entries for {len(depths)} stages")
    _check(m.position_bias == "log_cpb" or not any(m.pretrained_window_sizes), "model.pretrained_window_sizes",
           f"{tuple(m.pretrained_window_sizes)} rescales the log-spaced coordinates of position_bias 'log_cpb'; "
           f"the learned table of position_bias 'table' has none (use zeros)")
    reduction = m.patch_size * 2 ** (len(depths) - 1)
    _check(image_size % reduction == 0, "input.image_size",
           f"image size {image_size} is not divisible by patch_size * 2^{len(depths) - 1} = {reduction} "
           f"(patch {m.patch_size} and {len(depths) - 1} patch merges)")
    for i, (res, h) in enumerate(zip(m.stage_resolutions(), heads)):
        dim = m.embed_dim * 2 ** i
        _check(dim % h == 0, "model.num_heads", f"stage {i} width {dim} is not divisible by {h} heads")
        window, _ = swinv2.effective_window((res, res), m.window_size, m.window_size // 2)
        _check(res % window == 0, "model.window_size",
               f"stage {i} is {res}x{res} tokens at image size {image_size}, not divisible by window {window}")
        windows = (res // window) ** 2
        if i < m.attn_chunk_stages and m.attn_chunks > 1:
            _check(windows % m.attn_chunks == 0, "model.attn_chunks",
                   f"{m.attn_chunks} chunks do not divide the {windows} windows of stage {i}")
        _check_attention(kw, [dim // h], [(window * window,) * 2], has_bias=True)
    return kw


RESOLVERS = {"vit": _vit, "swinv2": _swinv2}


def resolve(model_name, model_cfg, num_classes, image_size):
    _check(model_name in RESOLVERS, "model_name", f"unknown model {model_name!r}; expected one of {sorted(RESOLVERS)}")
    return RESOLVERS[model_name](dict(model_cfg), num_classes, image_size)


def build(model_name, model_cfg, num_classes, image_size=224):
    return FAMILIES[model_name](**resolve(model_name, model_cfg, num_classes, image_size))
