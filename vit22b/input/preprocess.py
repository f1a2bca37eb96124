"""Per-example preprocessing as a configurable chain, written as big_vision-style strings:

  config.input.pp_train = "decode|inception_crop(224)|flip_lr|randaug(2, 9)|value_range(-1, 1)"
  config.input.pp_eval  = "decode|resize_small(256, 'bicubic')|central_crop(224)|value_range(-1, 1)"

Every op is `fn(example, rng) -> example` on numpy: `image` is HWC (uint8 0..255 after `decode`, or float in
[0, 1] from in-memory sources), `label` an int or a multi-hot vector. Randomness comes only from `rng`, which the
pipeline derives from (seed, example position), so results do not depend on worker processes or threads.
Batch-level mixup / cutmix live in `mix_batch`.
"""
import ast
import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # on the [0, 1] scale (torchvision / official Swin)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodeError(ValueError):
    """A record whose image cannot be decoded or has the wrong shape."""


def _pil(image):
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _back(pil, like):
    out = np.asarray(pil)
    out = out[..., None] if out.ndim == 2 else out
    return out if like.dtype == np.uint8 else out.astype(np.float32) / 255.0


def _resized(img, size_wh, method, box=None):
    """PIL resize keeping the dtype: uint8 images as such, float images per channel in 32-bit float mode."""
    if img.dtype == np.uint8:
        return _back(_pil(img).resize(size_wh, RESAMPLE[method], box=box), img)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], np.float32)).resize(
        size_wh, RESAMPLE[method], box=box)) for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1)


def decode(channels=None, shape=None):
    """Encoded bytes (JPEG, PNG, ...) -> uint8 HWC with `channels` (1 or 3; RGB if None); arrays pass through.
    An image with other channels than `channels` (when given), or another (H, W) than `shape`, is a bad record."""
    if channels not in (None, 1, 3):
        raise ValueError(f"decode: channels must be 1 or 3, got {channels!r}")
    mode = "L" if channels == 1 else "RGB"

    def fn(ex, rng):
        img = ex["image"]
        if isinstance(img, (bytes, bytearray, memoryview)):
            try:
                with Image.open(io.BytesIO(bytes(img))) as pil:
                    img = np.asarray(pil.convert(mode))
            except Exception as e:  # PIL raises several types for corrupt data
                raise DecodeError(f"undecodable image ({type(e).__name__}: {e})") from None
        img = np.asarray(img)
        img = img[..., None] if img.ndim == 2 else img
        if img.ndim != 3 or (channels is not None and img.shape[-1] != channels):
            raise DecodeError(f"image has shape {img.shape}, expected HxWx{channels or 'C'}")
        if shape is not None and tuple(img.shape[:2]) != tuple(shape):
            raise DecodeError(f"image is {img.shape[0]}x{img.shape[1]}, expected {shape[0]}x{shape[1]}")
        return dict(ex, image=img)
    return fn


def resize(size, method="bilinear"):
    size = (size, size) if isinstance(size, int) else tuple(size)

    def fn(ex, rng):
        img = ex["image"]
        if tuple(img.shape[:2]) == size:
            return ex
        return dict(ex, image=_resized(img, size[::-1], method))
    return fn


def resize_small(size, method="bicubic"):
    """Shorter side to `size`, keeping the aspect ratio (the first step of the standard evaluation crop);
    sizes and, with central_crop, offsets as torchvision computes them (official Swin evaluation)."""
    def fn(ex, rng):
        img = ex["image"]
        h, w = img.shape[:2]  # the long side is truncated, as torchvision's Resize(int) does
        new = (size, max(1, int(size * h / w))) if w <= h else (max(1, int(size * w / h)), size)
        return dict(ex, image=_resized(img, new, method))
    return fn


def central_crop(size):
    def fn(ex, rng):
        img = ex["image"]
        h, w = img.shape[:2]
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))  # torchvision's CenterCrop
        if top < 0 or left < 0:
            raise DecodeError(f"central_crop({size}) of a {h}x{w} image")
        return dict(ex, image=img[top:top + size, left:left + size])
    return fn


def inception_crop(size, area_min=0.08, area_max=1.0, ratio=(3 / 4, 4 / 3), method="bilinear"):
    """Random-resized crop (Inception / torchvision RandomResizedCrop): area fraction and log-uniform aspect
    ratio, ten tries, then the central crop at the nearest allowed ratio; resized to size x size."""
    def fn(ex, rng):
        img = ex["image"]
        h, w = img.shape[:2]
        for _ in range(10):
            area = h * w * rng.uniform(area_min, area_max)
            r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                break
        else:
            r = min(max(w / h, ratio[0]), ratio[1])
            cw, ch = (w, int(round(w / r))) if w / h < r else (int(round(h * r)), h)
            cw, ch = min(cw, w), min(ch, h)
            top, left = (h - ch) // 2, (w - cw) // 2
        return dict(ex, image=_resized(img, (size, size), method, box=(left, top, left + cw, top + ch)))
    return fn


def flip_lr(p=0.5):
    def fn(ex, rng):
        return dict(ex, image=ex["image"][:, ::-1]) if rng.uniform() < p else ex
    return fn


def value_range(lo=-1.0, hi=1.0):
    """uint8 0..255 or float 0..1 -> float32 in [lo, hi]."""
    def fn(ex, rng):
        img = ex["image"]
        x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else np.asarray(img, np.float32)
        return dict(ex, image=lo + (hi - lo) * x)
    return fn


def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(x - mean) / std on the [0, 1] scale, per channel (the official Swin and timm convention)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def fn(ex, rng):
        img = ex["image"]
        x = img.astype(np.float32) / 255.0 if img.dtype == np.uint8 else np.asarray(img, np.float32)
        return dict(ex, image=(x - mean) / std)
    return fn


# RandAugment (Cubuk et al. 2019) with the magnitude scale of its reference implementation (0..10 -> the op's
# maximum, with a random sign for signed ops); each op acts on a PIL image.
def _signed(rng, v):
    return v if rng.uniform() < 0.5 else -v


def _affine(img, data, fill=128):
    return img.transform(img.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=fill)


RANDAUG_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(rng, 30.0 * m), resample=Image.BILINEAR, fillcolor=128),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, 8 - int(4 * m))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(256 * m)),
    "SolarizeAdd": lambda img, m, rng: Image.fromarray(np.where(
        np.asarray(img) < 128, np.minimum(np.asarray(img).astype(np.int32) + int(110 * m), 255),
        np.asarray(img)).astype(np.uint8)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1.0 + _signed(rng, 0.9 * m)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1.0 + _signed(rng, 0.9 * m)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(1.0 + _signed(rng, 0.9 * m)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(1.0 + _signed(rng, 0.9 * m)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(rng, 0.3 * m), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(rng, 0.3 * m), 1, 0)),
    "TranslateX": lambda img, m, rng: _affine(img, (1, 0, _signed(rng, 0.45 * m) * img.size[0], 0, 1, 0)),
    "TranslateY": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(rng, 0.45 * m) * img.size[1])),
}


def randaug(num_layers=2, magnitude=9):
    """`num_layers` ops drawn uniformly from RANDAUG_OPS, each at `magnitude` out of 10."""
    names = sorted(RANDAUG_OPS)

    def fn(ex, rng):
        img = ex["image"]
        pil = _pil(img)
        if pil.mode == "L":
            pil = pil.convert("RGB")
            grey = True
        else:
            grey = False
        for i in rng.integers(0, len(names), num_layers):
            pil = RANDAUG_OPS[names[i]](pil, magnitude / 10.0, rng)
        if grey:
            pil = pil.convert("L")
        return dict(ex, image=_back(pil, img))
    return fn


def simmim_mask(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
    """SimMIM's mask: a random `mask_ratio` of the mask_patch_size-pixel squares, as a 0/1 map over the model's
    patches, [input_size / model_patch_size]^2 (arXiv 2111.09886)."""
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(f"simmim_mask: input {input_size} must be a multiple of mask patches {mask_patch_size}, "
                         f"themselves a multiple of model patches {model_patch_size}")
    side = input_size // mask_patch_size
    count = int(math.ceil(side * side * mask_ratio))
    scale = mask_patch_size // model_patch_size

    def fn(ex, rng):
        m = np.zeros(side * side, np.int32)
        m[rng.permutation(side * side)[:count]] = 1
        m = m.reshape(side, side).repeat(scale, 0).repeat(scale, 1)
        return dict(ex, simmim_mask=m)
    return fn


OPS = {f.__name__: f for f in (decode, resize, resize_small, central_crop, inception_crop, flip_lr, value_range,
                               normalize, randaug, simmim_mask)}


def parse(spec, field="input.pp_train"):
    """'decode|inception_crop(224)|flip_lr' -> [fn, ...]; errors name the config field and the op."""
    fns = []
    for part in (p.strip() for p in (spec or "").split("|") if p.strip()):
        try:
            node = ast.parse(part, mode="eval").body
        except SyntaxError:
            raise ValueError(f"{field}: cannot parse {part!r}") from None
        name = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else (
            node.id if isinstance(node, ast.Name) else None)
        if name not in OPS:
            raise ValueError(f"{field}: unknown op {part!r}; known ops: {sorted(OPS)}")
        try:
            args = [ast.literal_eval(a) for a in node.args] if isinstance(node, ast.Call) else []
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords} if isinstance(node, ast.Call) else {}
            fns.append(OPS[name](*args, **kwargs))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{field}: bad arguments in {part!r}: {e}") from None
    return fns


def chain(fns):
    def fn(ex, rng):
        for f in fns:
            ex = f(ex, rng)
        return ex
    return fn


def mix_batch(batch, rng, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5):
    """Mixup or cutmix on a batch (the Swin / DeiT recipe): with probability `prob`, mix every example with the
    batch in reverse order, by one lambda ~ Beta(alpha, alpha); cutmix pastes a box of area 1 - lambda and sets
    lambda to the pasted fraction. Labels become soft (one-hot or multi-hot mixed); masks multiply."""
    labels = batch["label"]
    if labels.ndim == 1:
        labels = np.eye(num_classes, dtype=np.float32)[labels]
    out = dict(batch, label=labels.astype(np.float32))
    if rng.uniform() >= prob or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return out
    images = batch["image"]
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.uniform() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    flipped = images[::-1]
    if use_cutmix:
        h, w = images.shape[1:3]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        images = images.copy()
        images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * flipped
    out.update(image=images.astype(np.float32), label=lam * out["label"] + (1 - lam) * out["label"][::-1])
    if "mask" in batch:
        out["mask"] = batch["mask"] * batch["mask"][::-1]
    return out
