"""Weights both ways between PyTorch and our models, and parameters-only exports of training checkpoints.

Import (--to=ours, the default): Swin V2 from official Microsoft `.pth` (also SimMIM's `encoder.` checkpoints with
the legacy `rpe_mlp` name) and timm state dicts, and Swin V1 (told by its `relative_position_bias_table`s) from
both layouts as well, into SwinTransformerV2's V1 switches (here); ViTs from timm state dicts and big_vision /
vision_transformer `.npz` (vit22b/models/vit_weights.py). Files are read safely (safetensors, `.npz` without
pickles, or `torch.load` with `weights_only=True`: a pickle that would run code is refused).
Export (--to=timm): our parameters as a timm state dict (`.safetensors`, or `.pth`) and the `timm.create_model`
arguments that load it (beside it as JSON). --to=params: a training checkpoint's parameters alone (no optimizer
state, optionally cast to bfloat16), for config.model_init and for sharing.

From Python:   module, params = load_swinv2("swinv2_tiny_patch4_window8_256.pth", img_size=256, window_size=8)
               module, params = load_swinv2("swin_tiny_patch4_window7_224.pth", img_size=224)  # V1: window from file
               module, params = vit_weights.load_vit("vit_base_patch16_224.safetensors", img_size=384)
From a shell:  python -m vit22b.models.convert --checkpoint F.pth --variant T --img 256 --window 8 --out DIR
               python -m vit22b.models.convert --checkpoint vit_base_patch16_224.safetensors --out DIR
               python -m vit22b.models.convert --to=timm --checkpoint WORKDIR/checkpoints/STEP --out F.safetensors
               python -m vit22b.models.convert --to=params --checkpoint WORKDIR/checkpoints/STEP --out DIR
                   [--dtype=bfloat16]
               then train from DIR with --config.model_init=DIR.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b import models
from vit22b.models import swinv2
from vit22b.models.checkpoint_files import (MODEL_FILE, CheckpointError, abstract_params, flax_weight,
                                             read_state_dict, torch_weight)

# Derived buffers: recomputed from the window sizes, so a checkpoint loads at any window or resolution.
BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask", "k_bias")


def to_official_keys(sd):
    """Normalise SimMIM and timm key layouts to the official one. Returns (state dict, dropped keys)."""
    out, dropped = {}, []
    simmim = any(k.startswith("encoder.") for k in sd)
    for k, v in sd.items():
        if simmim:
            if not k.startswith("encoder.") or k == "encoder.mask_token":
                dropped.append(k)  # the SimMIM decoder and mask token are not part of the classifier
                continue
            k = k[len("encoder."):]
        k = k.replace(".rpe_mlp.", ".cpb_mlp.")
        if k.rsplit(".", 1)[-1] in BUFFERS:
            dropped.append(k)
            continue
        out[k] = v
    timm = "head.fc.weight" in out or (
        "layers.0.downsample.reduction.weight" not in out and "layers.1.downsample.reduction.weight" in out)
    if timm:  # timm downsamples at the start of stages 1..3 and nests the classifier in head.fc
        out = {re.sub(r"^layers\.(\d+)\.downsample",
                      lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k).replace("head.fc.", "head."): v
               for k, v in out.items()}
    return out, dropped


def flax_path(key):
    """'layers.0.blocks.1.attn.cpb_mlp.0.weight' -> ('layers_0_blocks_1', 'attn', 'cpb_mlp_0', 'kernel')."""
    k = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.", r"layers_\1_blocks_\2.", key)
    k = re.sub(r"^layers\.(\d+)\.downsample\.", r"layers_\1_downsample.", k)
    k = k.replace("patch_embed.proj.", "patch_embed_proj.").replace("patch_embed.norm.", "patch_embed_norm.")
    k = re.sub(r"cpb_mlp\.(\d+)\.", r"cpb_mlp_\1.", k)
    return tuple(k.split("."))


def _to_flax_array(name, value):
    if name == "weight":
        return ("kernel", torch_weight(value)) if value.ndim in (2, 4) else ("scale", value)  # else LayerNorm
    return name, value


def _place(path, expected):
    """Where an unscanned path lives in `expected`: (path, index) — scanned stages keep blocks stacked under
    `layers_i_blocks/blocks_k` with block m at index m // group, position k = m % group."""
    if path in expected:
        return path, None
    stage, rest = path[0], path[1:]
    if "_blocks_" in stage:
        prefix, m = stage.rsplit("_", 1)
        group = sum(1 for p in expected if p[0] == prefix and p[2:] == rest and p[1].startswith("blocks_"))
        if group:
            candidate = (prefix, f"blocks_{int(m) % group}") + rest
            if candidate in expected:
                return candidate, int(m) // group
    return None, None


def state_dict_to_params(sd, abstract_params):
    """Map an official-layout state dict onto a Flax parameter tree shaped like `abstract_params`."""
    expected = {tuple(str(getattr(p, "key", p)) for p in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    buffers = {path: np.zeros(leaf.shape, np.float32) for path, leaf in expected.items()}
    filled = {path: 0 for path in expected}
    for key, value in sd.items():
        *module, leaf = flax_path(key)
        leaf, value = _to_flax_array(leaf, value)
        path, index = _place(tuple(module) + (leaf,), expected)
        if path is None:
            raise CheckpointError(f"checkpoint parameter {key!r} has no place in the model "
                                  f"(as {'/'.join(module + [leaf])})")
        want = expected[path].shape if index is None else expected[path].shape[1:]
        if value.shape != tuple(want):
            raise CheckpointError(f"checkpoint parameter {key!r}: shape {tuple(value.shape)} does not fit the "
                                  f"model's {'/'.join(path)} {tuple(want)}")
        if index is None:
            buffers[path] = value
            filled[path] = 1
        else:
            buffers[path][index] = value
            filled[path] += 1
    missing = sorted("/".join(p) for p, n in filled.items()
                     if n != (expected[p].shape[0] if p[0].endswith("_blocks") else 1))  # scanned: one per block
    if missing:
        raise CheckpointError(f"checkpoint lacks parameters for {len(missing)} model entries, e.g. {missing[:3]}")
    tree = {}
    for path, value in buffers.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, expected[path].dtype)
    return tree


V1_SWITCHES = dict(norm_position="pre", attention="dot", position_bias="table")
V2_SWITCHES = dict(norm_position="post", attention="cosine", position_bias="log_cpb")


def swin_version(sd, path):
    """1 or 2 for an official-layout Swin state dict, told by its attention parameters; else a CheckpointError
    saying what the file holds."""
    for version, name in ((2, "logit_scale"), (1, "relative_position_bias_table")):
        if any(re.match(rf"layers\.\d+\.blocks\.\d+\.attn\.{name}$", k) for k in sd):
            return version
    vit = [k for k in ("cls_token", "pos_embed") if k in sd] + sorted(
        {re.sub(r"\.\d+\.", ".N.", k.rsplit(".", 1)[0]) for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.", k)})
    if vit:
        raise CheckpointError(f"{path}: this file holds a ViT ({', '.join(vit)}), not a Swin")
    layers = [k for k in sd if k.startswith("layers.")]
    what = ("Swin-like layers.* keys without a logit_scale (V2) or relative_position_bias_table (V1)" if layers
            else f"no Swin parameters (first keys: {sorted(sd)[:3]})")
    raise CheckpointError(f"{path}: this file holds {what}, not a Swin V1 or V2")


def load_swinv2(path, *, variant=None, img_size=256, num_classes=None, state_dict=None, **model_kw):
    """One call from a checkpoint file to a ready `(module, params)`; `module.apply({'params': params},
    images_nhwc)` gives logits. Settings not given (embed_dim, depths, heads, classes) come from the file;
    window_size and pretrained_window_sizes may differ from the checkpoint's (log-spaced CPB transfers).
    A Swin V1 file gives a SwinTransformerV2 with the V1 switches (norm_position 'pre', attention 'dot',
    position_bias 'table') and, unless given, the window of its bias tables, which do not transfer to another
    window. `state_dict`: the file's contents, already read."""
    sd, _ = to_official_keys(read_state_dict(path) if state_dict is None else state_dict)
    v1 = swin_version(sd, path) == 1
    cfg = {k: v for k, v in model_kw.items() if v is not None}
    if v1:
        for key, value in V1_SWITCHES.items():
            cfg.setdefault(key, value)
        tables = [v.shape[0] for k, v in sd.items() if k.endswith(".attn.relative_position_bias_table")]
        # (2W - 1)^2 entries; a stage no larger than the window has a smaller (clamped) one.
        cfg.setdefault("window_size", (round(max(tables) ** 0.5) + 1) // 2)
    if variant is None and "embed_dim" not in cfg:
        cfg["embed_dim"] = int(sd["patch_embed.proj.weight"].shape[0])
        stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.blocks", k)] if m})
        cfg.setdefault("depths", [1 + max(int(m.group(1)) for k in sd
                                          for m in [re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k)] if m)
                                  for i in stages])
        cfg.setdefault("num_heads", [int(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) if v1
                                     else int(sd[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in stages])
        cfg.setdefault("patch_size", int(sd["patch_embed.proj.weight"].shape[-1]))
    if variant is not None:
        cfg["variant"] = variant
    if num_classes is None:
        num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    module = models.build("swinv2", cfg, num_classes, img_size)
    channels = int(sd["patch_embed.proj.weight"].shape[1]) if "patch_embed.proj.weight" in sd else 3
    return module, state_dict_to_params(sd, abstract_params(module, img_size, channels))


def swin_version_of(module):
    """1 or 2: which timm / official Swin the module's switches make; a mix of the two has none."""
    switches = {k: getattr(module, k) for k in V2_SWITCHES}
    for version, want in ((1, V1_SWITCHES), (2, V2_SWITCHES)):
        if switches == want:
            return version
    odd = V1_SWITCHES if sum(switches[k] == v for k, v in V1_SWITCHES.items()) > 1 else V2_SWITCHES
    key = next(k for k in odd if switches[k] != odd[k])  # the one switch off the majority's version
    raise CheckpointError(f"model.{key}: {switches} mixes Swin V1 {V1_SWITCHES} and V2 {V2_SWITCHES}; neither "
                          f"timm nor the official code has such a model")


def swinv2_to_state_dict(module, params, layout="timm"):
    """Our Swin V2 (or V1) parameters as a PyTorch state dict (float32 numpy) in timm's key layout (downsample at
    the start of stages 1..3, head.fc) or the official one (downsample at the end of stages 0..2, head)."""
    if layout not in ("timm", "official"):
        raise CheckpointError(f"--layout: {layout!r} is not 'timm' or 'official'")
    params = nn.meta.unbox(params)
    swin_version_of(module)
    if module.extra_norm_every:
        raise CheckpointError("model.extra_norm_every: SwinV2-H/G's extra main-branch norms have no place in "
                              "timm's or the official Swin V2")
    sd = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(p, "key", p)) for p in path]
        value = np.asarray(leaf, np.float32)
        stage = re.fullmatch(r"layers_(\d+)_blocks", names[0])
        if stage:  # scanned: [groups, ...] under blocks_k, block m = group index * group size + k
            group = sum(1 for k in params[names[0]] if k.startswith("blocks_"))
            k = int(names[1].split("_")[1])
            items = [(f"layers_{stage.group(1)}_blocks_{g * group + k}", names[2:], value[g])
                     for g in range(value.shape[0])]
        else:
            items = [(names[0], names[1:], value)]
        for first, rest, v in items:
            key = re.sub(r"^layers_(\d+)_blocks_(\d+)$", r"layers.\1.blocks.\2", first)
            down = re.fullmatch(r"layers_(\d+)_downsample", first)
            if down:
                key = f"layers.{int(down.group(1)) + (layout == 'timm')}.downsample"
            key = {"patch_embed_proj": "patch_embed.proj", "patch_embed_norm": "patch_embed.norm",
                   "head": "head.fc" if layout == "timm" else "head"}.get(key, key)
            rest = [re.sub(r"^cpb_mlp_(\d+)$", r"cpb_mlp.\1", r) for r in rest]
            name = rest[-1]
            if name == "kernel":
                name, v = "weight", flax_weight(v)
            elif name == "scale":
                name = "weight"
            sd[".".join([key] + rest[:-1] + [name])] = np.ascontiguousarray(v)
    return sd


def swinv2_timm_args(module, in_chans=3):
    """timm.create_model arguments: timm's SwinTransformerV2, or its SwinTransformer for a V1."""
    v1 = swin_version_of(module) == 1
    args = {"model_name": "swin_tiny_patch4_window7_224" if v1 else "swinv2_tiny_window8_256",
            "img_size": module.img_size, "patch_size": module.patch_size,
            "embed_dim": module.embed_dim, "depths": list(module.depths), "num_heads": list(module.num_heads),
            "window_size": module.window_size, "mlp_ratio": module.mlp_ratio, "num_classes": module.num_classes,
            "pretrained_window_sizes": list(module.pretrained_window_sizes), "in_chans": in_chans}
    if v1:
        del args["pretrained_window_sizes"]
    return args


def to_timm(module, params):
    """(state dict, timm.create_model arguments) of either family."""
    from vit22b.models import vit_weights
    params = nn.meta.unbox(params)
    if isinstance(module, swinv2.SwinTransformerV2):
        in_chans = int(np.shape(params["patch_embed_proj"]["kernel"])[2])
        return swinv2_to_state_dict(module, params), swinv2_timm_args(module, in_chans)
    return vit_weights.to_timm(module, params)


def save_params(out, params, spec):
    """An Orbax params checkpoint (what config.model_init reads) plus MODEL_FILE: model_name, model settings,
    image_size, num_classes."""
    import json
    import os

    import orbax.checkpoint as ocp
    out = os.path.abspath(out)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out, params)
    with open(os.path.join(out, MODEL_FILE), "w") as f:
        json.dump(spec, f, indent=1)


def load_checkpoint(path):
    """(module, params, spec) from a training checkpoint step folder (WORKDIR/checkpoints/STEP: its parameters
    alone, without the optimizer state, and the model of the config in its run info) or a params checkpoint
    written here (MODEL_FILE)."""
    import json
    import os

    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, MODEL_FILE)):
        with open(os.path.join(path, MODEL_FILE)) as f:
            spec = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path)
    elif os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "run")):
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            config = ckptr.restore(os.path.join(path, "run"))["config"]
        with ocp.PyTreeCheckpointer() as ckptr:
            stored = ckptr.metadata(os.path.join(path, "state"))
            stored = getattr(stored, "item_metadata", stored)
            # Only the parameters: restoring the optimizer state too would need its memory (Adam: twice more).
            want = {"params": jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), stored["params"])}
            params = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
                item=want, restore_args=want, partial_restore=True))["params"]
        head = params.get("head", {}).get("kernel")
        spec = {"model_name": config.get("model_name", "vit"), "model": config["model"],
                "image_size": config["input"]["image_size"],
                "num_classes": 0 if head is None else int(np.shape(head)[-1]), "run_config": config}
    else:
        raise CheckpointError(f"{path}: neither a training checkpoint step (with state/ and run/) nor a params "
                              f"checkpoint written by this command (with {MODEL_FILE})")
    model_cfg = {k: v for k, v in spec["model"].items() if k != "model_init"}
    module = models.build(spec["model_name"], model_cfg, spec["num_classes"], spec["image_size"])
    return module, params, spec


def _import(args):
    from vit22b.models import vit_weights
    path = args.checkpoint
    sd = None if path.endswith(".npz") else read_state_dict(path)  # read once, handed to the loader
    if sd is not None and any(re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.", k) for k in sd):
        pws = [int(x) for x in args.pretrained_window_sizes.split(",")] if args.pretrained_window_sizes else None
        module, params = load_swinv2(path, variant=args.variant, img_size=args.img or 256,
                                     num_classes=args.num_classes, window_size=args.window,
                                     pretrained_window_sizes=pws, state_dict=sd)
        name, img = "swinv2", module.img_size
        settings = {k: getattr(module, k) for k in ("patch_size", "embed_dim", "depths", "num_heads", "window_size",
                                                     "pretrained_window_sizes")}
        v1 = swin_version_of(module) == 1
        if v1:  # the switches, for config.model_init and re-export
            settings.update(V1_SWITCHES)
        what = (f"SwinTransformerV2{' (Swin V1 switches)' if v1 else ''} embed_dim={module.embed_dim} "
                f"depths={tuple(module.depths)} window={module.window_size} img={img}")
    else:
        model_kw = {"gelu": args.gelu} if args.gelu else {}
        module, params = vit_weights.load_vit(path, img_size=args.img, num_classes=args.num_classes,
                                              num_heads=args.num_heads, head=args.head, resample=args.resample,
                                              state_dict=sd, **model_kw)
        name, img = "vit", vit_weights.image_size(module, params)
        settings = {k: getattr(module, k) for k in vit_weights.SETTINGS}
        what = (f"ViT width={module.width} depth={module.depth} heads={module.num_heads} patch={module.patch_size} "
                f"block={module.block} head={module.head} gelu={module.gelu} img={img}")
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    save_params(args.out, params, {"model_name": name, "model": settings, "image_size": img,
                                   "num_classes": module.num_classes})
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"wrote {args.out}: {what} classes={module.num_classes}, {n:,} parameters")


def _export(args):
    import json
    import os
    module, params, spec = load_checkpoint(args.checkpoint)
    if args.to == "params":
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
        save_params(args.out, params, spec)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        print(f"wrote {args.out}: {n:,} parameters in {args.dtype}, no optimizer state")
        return
    if args.layout == "official" and spec["model_name"] != "swinv2":
        raise CheckpointError("--layout=official: only a Swin V2 has an official (Microsoft) key layout")
    sd, timm_args = to_timm(module, params) if args.layout == "timm" else (
        swinv2_to_state_dict(module, params, args.layout), None)
    if args.out.endswith(".pth"):
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, args.out)
    else:
        from safetensors.numpy import save_file
        save_file(sd, args.out)
    hint = ""
    if timm_args:
        args_file = os.path.splitext(args.out)[0] + ".json"
        with open(args_file, "w") as f:
            json.dump(timm_args, f, indent=1)
        load = (f"torch.load({args.out!r})" if args.out.endswith(".pth")
                else f"safetensors.torch.load_file({args.out!r})")
        hint = (f"; in PyTorch: model = timm.create_model(**json.load(open({args_file!r}))); "
                f"model.load_state_dict({load})")
    print(f"wrote {args.out}: {len(sd)} tensors{hint}")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--to", default="ours", choices=["ours", "timm", "params"],
                    help="ours: import a PyTorch / npz file; timm: export ours to PyTorch; params: params-only export")
    ap.add_argument("--checkpoint", required=True, help="import: .pth, .bin, .safetensors or .npz; export: a "
                    "training checkpoint step folder (WORKDIR/checkpoints/STEP) or a folder written here")
    ap.add_argument("--out", required=True, help="import and params: a folder (must not exist); timm: a "
                    ".safetensors (default) or .pth file, with the timm.create_model arguments beside it as .json")
    ap.add_argument("--variant", default=None, choices=sorted(swinv2.VARIANTS), help="Swin V2 import")
    ap.add_argument("--img", type=int, default=None, help="image size (default: the file's; Swin V2: 256)")
    ap.add_argument("--window", type=int, default=None,
                    help="Swin import: window size (default: V2 8, V1 the file's)")
    ap.add_argument("--pretrained_window_sizes", default=None, help="Swin V2 import (default: 0 per stage)")
    ap.add_argument("--num_classes", type=int, default=None, help="import: a new head of this size (0: none)")
    ap.add_argument("--num_heads", type=int, default=None, help="ViT import: heads, where the file cannot say")
    ap.add_argument("--head", default=None, choices=["token", "gap", "map"],
                    help="ViT import: the pooling, where the file's guess (class token: 'token') is wrong")
    ap.add_argument("--resample", default=None, help="ViT import: position-embedding resampling (bicubic, "
                    "bilinear, big_vision; default: as the file's codebase does)")
    ap.add_argument("--gelu", default=None, choices=["exact", "tanh"],
                    help="ViT import: GELU (default: exact, tanh for .npz files as big_vision)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params: stored dtype")
    ap.add_argument("--layout", default="timm", choices=["timm", "official"],
                    help="--to=timm of a Swin V2: timm's keys or the official Microsoft ones")
    args = ap.parse_args(argv)
    try:
        (_import if args.to == "ours" else _export)(args)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
