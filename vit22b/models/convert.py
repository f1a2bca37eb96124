"""Swin V2 weights from PyTorch into Flax: official Microsoft `.pth` (also SimMIM's `encoder.` checkpoints
with the legacy `rpe_mlp` name) and timm state dicts, read safely (safetensors, or `torch.load` with
`weights_only=True`: a pickle that would run code is refused).

From Python:   module, params = load_swinv2("swinv2_tiny_patch4_window8_256.pth", img_size=256, window_size=8)
From a shell:  python -m vit22b.models.convert --checkpoint F.pth --variant T --img 256 --window 8 --out DIR
               then train from it with --config.model_init=DIR.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b import models
from vit22b.models import swinv2

# Derived buffers: recomputed from the window sizes, so a checkpoint loads at any window or resolution.
BUFFERS = ("relative_coords_table", "relative_position_index", "attn_mask", "k_bias")


class CheckpointError(ValueError):
    pass


def read_state_dict(path):
    """{name: float32 numpy array} from a .safetensors file or a torch checkpoint (weights only)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        sd = load_file(path)
    else:
        import pickle

        import torch
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused to load: the file needs code beyond plain tensors to unpickle, which could run "
                f"anything. Convert it to safetensors in a sandbox you trust. ({str(e).splitlines()[0]})") from None
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except Exception as e:  # noqa: BLE001 - truncated or foreign files fail in many ways inside torch
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
                                  f"{' '.join(str(e).split())[:200]}") from None
        for key in ("model", "state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        sd = {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}
    return {k: np.asarray(v, np.float32) for k, v in sd.items()}


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
        if value.ndim == 4:
            return "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.ndim == 2:
            return "kernel", value.T
        return "scale", value  # LayerNorm
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


def _check_is_swinv2(sd, path):
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.attn\.logit_scale$", k) for k in sd):
        return
    vit = [k for k in ("cls_token", "pos_embed") if k in sd] + sorted(
        {re.sub(r"\.\d+\.", ".N.", k.rsplit(".", 1)[0]) for k in sd if re.match(r"blocks\.\d+\.attn\.qkv\.", k)})
    if vit:
        raise CheckpointError(f"{path}: this file holds a ViT ({', '.join(vit)}), not a Swin V2")
    layers = [k for k in sd if k.startswith("layers.")]
    what = "a Swin V1 (no logit_scale)" if layers else f"no Swin V2 parameters (first keys: {sorted(sd)[:3]})"
    raise CheckpointError(f"{path}: this file holds {what}, not a Swin V2")


def abstract_params(module, img_size, channels=3):
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, img_size, img_size, channels))))
    return nn.meta.unbox(boxed["params"])


def load_swinv2(path, *, variant=None, img_size=256, num_classes=None, **model_kw):
    """One call from a checkpoint file to a ready `(module, params)`; `module.apply({'params': params},
    images_nhwc)` gives logits. Settings not given (embed_dim, depths, heads, classes) come from the file;
    window_size and pretrained_window_sizes may differ from the checkpoint's (log-spaced CPB transfers)."""
    sd, _ = to_official_keys(read_state_dict(path))
    _check_is_swinv2(sd, path)
    cfg = dict(model_kw)
    if variant is None and "embed_dim" not in cfg:
        cfg["embed_dim"] = int(sd["patch_embed.proj.weight"].shape[0])
        stages = sorted({int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.blocks", k)] if m})
        cfg.setdefault("depths", [1 + max(int(m.group(1)) for k in sd
                                          for m in [re.match(rf"layers\.{i}\.blocks\.(\d+)\.", k)] if m)
                                  for i in stages])
        cfg.setdefault("num_heads", [int(sd[f"layers.{i}.blocks.0.attn.logit_scale"].shape[0]) for i in stages])
        cfg.setdefault("patch_size", int(sd["patch_embed.proj.weight"].shape[-1]))
    if variant is not None:
        cfg["variant"] = variant
    if num_classes is None:
        num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
    module = models.build("swinv2", cfg, num_classes, img_size)
    channels = int(sd["patch_embed.proj.weight"].shape[1]) if "patch_embed.proj.weight" in sd else 3
    return module, state_dict_to_params(sd, abstract_params(module, img_size, channels))


def main(argv=None):
    import argparse

    import orbax.checkpoint as ocp
    ap = argparse.ArgumentParser(description="Convert a PyTorch Swin V2 checkpoint into an Orbax checkpoint "
                                             "for config.model_init.")
    ap.add_argument("--checkpoint", required=True, help=".pth (official, SimMIM, timm) or .safetensors")
    ap.add_argument("--out", required=True, help="output folder (must not exist)")
    ap.add_argument("--variant", default=None, choices=sorted(swinv2.VARIANTS))
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--pretrained_window_sizes", default="0,0,0,0")
    ap.add_argument("--num_classes", type=int, default=None)
    args = ap.parse_args(argv)
    pws = [int(x) for x in args.pretrained_window_sizes.split(",")]
    try:
        module, params = load_swinv2(args.checkpoint, variant=args.variant, img_size=args.img,
                                     num_classes=args.num_classes, window_size=args.window,
                                     pretrained_window_sizes=pws)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    import os
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(args.out), params)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"wrote {args.out}: SwinTransformerV2 embed_dim={module.embed_dim} depths={tuple(module.depths)} "
          f"window={module.window_size} img={module.img_size} classes={module.num_classes}, {n:,} parameters")


if __name__ == "__main__":
    main()
