"""SimMIM pretraining of Swin V2 on ImageNet-1k images without their labels: the official recipe
(simmim_pretrain__swinv2_base__img192_window12__800ep.yaml; shared reference swinv2_simmim.md, section 4), on
configs/swinv2_imagenet.py's data, model and AdamW.

192 px, window 12, drop path 0.1; 32-px masks at ratio 0.6 with targets normalised over 47x47 neighbourhoods;
800 epochs at lr 1e-4 per 512 images, 10 warm-up epochs, x0.1 at epoch 700, weight decay 0.05 on kernels only
(not 1-D parameters, biases, the mask token, the CPB MLP), gradient clip 5.0; RandomResizedCrop(scale 0.67-1)
and flip, no RandAugment or mixup. Evaluation: the reconstruction loss on the validation images and a picture
(original, masked, reconstruction) in WORKDIR/images and TensorBoard. Fine-tune the result with
configs/swinv2_finetune_imagenet.py.

  python -m vit22b.main --config=configs/simmim_swinv2_imagenet.py --workdir=DIR                # SwinV2-B
  python -m vit22b.main --config=configs/simmim_swinv2_imagenet.py:variant=T,batch=512 --workdir=DIR
  python -m vit22b.main --config=configs/simmim_swinv2_imagenet.py:runlocal --workdir=DIR       # tiny, digits
"""
import os

import ml_collections

from vit22b.config_args import load_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="B", img=192, window=12, batch=2048, epochs=800, runlocal=False)
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swinv2_imagenet.py")
    c = load_config(f"{base}:variant={a.variant},img={a.img},window={a.window},batch={a.batch},epochs={a.epochs}"
                    + (",runlocal" if a.runlocal else ""))
    steps_per_epoch = c.total_steps // a.epochs
    if a.runlocal:
        c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 60, 60, 60, 10
    else:
        c.eval_every = 10 * steps_per_epoch
        size = a.img
        c.input.pp_train = f"decode|inception_crop({size}, area_min=0.67)|flip_lr|normalize"
        c.input.pp_eval = f"decode|resize_small({int(size / 0.875)})|central_crop({size})|normalize"
        del c.input["mixup"]
        c.model.drop_path_rate = 0.1
    # The loop appends the mask op to both chains: simmim_mask(image_size, mask_patch_size, patch, mask_ratio).
    c.simmim = ml_collections.ConfigDict(dict(mask_patch_size=8 if a.runlocal else 32, mask_ratio=0.6,
                                              norm_target_kernel=7 if a.runlocal else 47))
    c.label_smoothing = 0.0
    c.lr = 1e-3 if a.runlocal else 1e-4 * a.batch / 512
    warmup = 6 if a.runlocal else 10 * steps_per_epoch
    c.schedule = dict(decay_type="multistep", warmup_steps=warmup,
                      boundaries=(50,) if a.runlocal else (700 * steps_per_epoch,), gamma=0.1)
    return c
