"""Reading weight files safely, and what the converters (convert.py, vit_weights.py) share: one error type, the
model's expected parameter shapes, and PyTorch's weight layouts as Flax's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# Beside the arrays of a params checkpoint (python -m vit22b.models.convert): the model they belong to, as
# {"model_name", "model": settings, "image_size", "num_classes"}.
MODEL_FILE = "vit22b_model.json"
# ViT settings that change what the same parameters compute: a params checkpoint's must equal the run's.
SEMANTIC_SETTINGS = ("block", "norm", "qk_norm", "head", "posemb", "class_token", "pre_norm", "fc_norm", "gelu")


class CheckpointError(ValueError):
    """A weight file that cannot be read or does not fit the model; the message names the file or parameter."""


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


def read_npz(path):
    """{name: float32 array} of a big_vision / vision_transformer .npz (bfloat16 stored as |V2 viewed back; no
    pickles). Its parameters: under `params/` or `opt/target/` where the file also holds other state, and the
    image tower `img/` of a two-tower (SigLIP-style) file."""
    import zipfile

    import ml_dtypes
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {}
            for k in f.files:
                v = f[k]
                out[k] = np.asarray(v.view(ml_dtypes.bfloat16) if v.dtype == np.dtype("V2") else v, np.float32)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable .npz ({' '.join(str(e).split())[:200]})") from None
    for prefix in ("params/", "opt/target/", "img/"):
        if any(k.startswith(prefix) for k in out) and "embedding/kernel" not in out:
            out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    return out


def abstract_params(module, img_size, channels=3):
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, img_size, img_size, channels))))
    return nn.meta.unbox(boxed["params"])


def torch_weight(value):
    """A PyTorch weight as Flax's kernel: Linear [out, in] -> [in, out], Conv2d OIHW -> HWIO (the reverse:
    flax_weight). Transposes, never reshapes."""
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T)


def flax_weight(value):
    value = np.asarray(value, np.float32)
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
