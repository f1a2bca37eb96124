"""Model registry: `config.model_name` picks a module here, `config.model` holds its settings."""
import jax.numpy as jnp

from vit22b.models import vit

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


def vit_kwargs(model_cfg, num_classes):
    """Resolve a `config.model` dict into ViT constructor arguments.

    `variant` ('B/16', '22B/14', ...) fills width/depth/mlp_dim/num_heads/patch_size; explicit non-None
    values of those keys override it, so `variant=None` with all five given builds any shape.
    """
    cfg = dict(model_cfg)
    variant = cfg.pop("variant", None)
    shape = vit.decode_variant(variant) if variant else {}
    for key in SHAPE_KEYS:
        if cfg.get(key) is not None:
            shape[key] = cfg[key]
        elif key not in shape:
            raise ValueError(f"model.{key}: not set and no model.variant to take it from")
        cfg.pop(key, None)
    for key in ("dtype", "param_dtype"):
        if key in cfg:
            if cfg[key] not in DTYPES:
                raise ValueError(f"model.{key}: unknown dtype {cfg[key]!r}; expected one of {sorted(DTYPES)}")
            cfg[key] = DTYPES[cfg[key]]
    unknown = set(cfg) - set(vit.MODEL_FIELDS)
    if unknown:
        raise ValueError(f"model.{sorted(unknown)[0]}: unknown model key; known keys: "
                         f"{sorted(set(vit.MODEL_FIELDS) | {'variant'})}")
    return dict(num_classes=num_classes, **shape, **cfg)


def build(model_name, model_cfg, num_classes):
    if model_name != "vit":
        raise ValueError(f"model_name: unknown model {model_name!r}; expected 'vit'")
    return vit.ViT(**vit_kwargs(model_cfg, num_classes))
