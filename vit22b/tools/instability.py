"""The two instability studies of docs/instability.md, trained with `vit22b.main`'s loop and read back from the
monitors each run logs (config.monitors):

- QK-norm (ViT-22B): a small ViT-22B-design model with and without QK-norm over a learning-rate sweep; the final
  eval loss against the learning rate (the sensitivity curve, with Wortsman et al.'s LR sensitivity), and the
  largest attention logit against the step at the highest rate.
- Norm position (Swin V2): the same small Swin trained as V1 (pre-norm, dot-product attention, bias table) and as
  V2 (res-post-norm, scaled cosine attention, log-spaced CPB); the residual stream's RMS per block after training
  (and at the first logged step), and the largest over the smallest across blocks during training.

  python -m vit22b.tools.instability --out=docs            # the committed figures (Fashion-MNIST, ~40 min, 2 cores)
  python -m vit22b.tools.instability --out=/tmp/x --tiny   # seconds, on scikit-learn's digits
  python -m vit22b.tools.instability --out=docs --replot   # redraw the figures from docs/instability.json

Writes instability_qk_norm.png, instability_swin_norm.png and instability.json (every number plotted) to --out.
Fashion-MNIST must be prepared first (configs/vit22b_fashion_mnist.py says how).
"""
import argparse
import json
import math
import pathlib
import tempfile

import ml_collections
import numpy as np

from vit22b import config_base

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # Wortsman et al.'s x sqrt(10) grid, 3e-4..3e-1, from 1e-3
SWIN_VERSIONS = {
    "V1": dict(norm_position="pre", attention="dot", position_bias="table"),
    "V2": dict(norm_position="post", attention="cosine", position_bias="log_cpb"),
}


def settings(tiny):
    """Sizes of the two studies: full (the committed figures) or tiny (the tests and the notebook's default)."""
    if tiny:
        # Every step logged: only the logged step compiles (the loop compiles the other kind at its first use).
        return dict(data="vit22b_digits", image_size=8, vit=dict(width=32, depth=2, patch=2, heads=2),
                    vit_steps=6, lrs=(3e-1,), batch=32, log_every=1,
                    swin=dict(image=16, patch=2, embed=16, depths=(2,), heads=(2,), window=4, scan=False), swin_steps=4,
                    swin_lr=3e-3)
    return dict(data="vit22b_fashion_mnist", image_size=28, vit=dict(width=128, depth=6, patch=7, heads=4),
                vit_steps=1000, lrs=LRS, batch=128, log_every=25,
                swin=dict(image=32, patch=4, embed=48, depths=(2, 10), heads=(3, 6), window=4),
                swin_steps=1200, swin_lr=3e-3)


def _base(s, steps):
    from vit22b.config_args import load_config
    c = load_config(f"{CONFIGS / s['data']}.py")
    c.total_steps = steps
    c.log_every = s["log_every"]
    c.eval_every = c.checkpoint_every = steps
    c.keep_checkpoints = 1
    c.input.batch_size = s["batch"]
    c.input.eval_batch_size = 500
    c.schedule = dict(decay_type="cosine", warmup_steps=max(1, steps // 20))
    return c


def vit_config(s, lr, qk_norm):
    c = _base(s, s["vit_steps"])
    v = s["vit"]
    config_base.small_vit(c.model, v["width"], v["depth"], v["patch"], v["heads"])
    c.model.qk_norm = qk_norm
    c.lr = lr
    return c


def swin_config(s, version):
    c = _base(s, s["swin_steps"])
    w = s["swin"]
    size = w["image"]
    c.input.image_size = size
    channels_pp = "decode(1)" if s["data"] == "vit22b_digits" else "decode(1, (28, 28))"
    c.input.pp_train = c.input.pp_eval = f"{channels_pp}|resize({size})|value_range(-1, 1)"
    c.model_name = "swinv2"
    keep = {k: c.model[k] for k in ("remat_policy", "impl", "attention_impl", "dtype", "param_dtype")}
    c.model = ml_collections.ConfigDict(dict(
        keep, scan=w.get("scan", True), embed_dim=w["embed"], depths=list(w["depths"]), num_heads=list(w["heads"]), window_size=w["window"],
        patch_size=w["patch"], pretrained_window_sizes=[0] * len(w["depths"]), drop_path_rate=0.0,
        **SWIN_VERSIONS[version]))
    c.lr = s["swin_lr"]
    c.wd = 0.05
    return c


def train(config, workdir):
    """Train; returns (metrics rows, diverged). A non-finite loss stops the run, which counts as diverged. A run
    that already finished in `workdir` (its final evaluation logged) is read back, not trained again."""
    from vit22b.train import loop
    from vit22b.train.metrics import read_metrics
    if (pathlib.Path(workdir) / "metrics.jsonl").exists():
        rows = read_metrics(str(workdir))
        if any(r["step"] == config.total_steps and "eval/loss" in r for r in rows):
            return rows, False
    try:
        loop.run(config, str(workdir))
        diverged = False
    except loop.NonFiniteLossError:
        diverged = True
    return read_metrics(str(workdir)), diverged


def _over_blocks(row, stat, reduce=max):
    """A statistic's extreme over the encoder blocks of a logged row (the MAP head, which QK-norm does not touch,
    left out)."""
    values = [v for k, v in row.items() if k.startswith(f"monitor/{stat}/") and not k.endswith("/map_head")]
    return reduce(values) if values else None


def lr_sensitivity(losses, initial_loss):
    """Wortsman et al. (arXiv 2309.14322): the mean over the rates of min(loss, initial loss) - the best loss."""
    capped = [min(x, initial_loss) if math.isfinite(x) else initial_loss for x in losses]
    return float(np.mean(capped) - min(capped))


def qk_norm_study(s, workdir):
    out = {"lrs": list(s["lrs"]), "initial_loss": math.log(10.0)}
    for qk in (True, False):
        key = "with_qk_norm" if qk else "without_qk_norm"
        finals, curves = [], {}
        for lr in s["lrs"]:
            rows, diverged = train(vit_config(s, lr, qk), pathlib.Path(workdir) / f"vit_{key}_{lr:g}")
            ev = [r["eval/loss"] for r in rows if "eval/loss" in r]
            finals.append(float("nan") if diverged or not ev else ev[-1])
            logged = [r for r in rows if "monitor/max_attn_logit" in r]
            curves[f"{lr:g}"] = {"step": [r["step"] for r in logged],
                                 "max_attn_logit": [_over_blocks(r, "max_attn_logit") for r in logged],
                                 "map_head_max_attn_logit": [r.get("monitor/max_attn_logit/map_head") for r in logged],
                                 "attn_entropy_min": [_over_blocks(r, "attn_entropy", min) for r in logged],
                                 "train_loss": [r["train/loss"] for r in logged],
                                 "qk_gain": [_over_blocks(r, "qk_gain") for r in logged]}
        out[key] = {"final_eval_loss": finals, "curves": curves,
                    "lr_sensitivity": lr_sensitivity(finals, out["initial_loss"])}
    return out


def swin_study(s, workdir):
    out = {}
    for version in SWIN_VERSIONS:
        rows, diverged = train(swin_config(s, version), pathlib.Path(workdir) / f"swin_{version}")
        logged = [r for r in rows if "monitor/residual_rms_ratio" in r]
        blocks = sorted(k.rsplit("/", 1)[1] for k in logged[-1] if k.startswith("monitor/residual_rms/"))
        ev = [r for r in rows if "eval/accuracy" in r]
        out[version] = {
            "blocks": blocks, "diverged": diverged,
            "first": {"step": logged[0]["step"], "rms": [logged[0][f"monitor/residual_rms/{b}"] for b in blocks]},
            "trained": {"step": logged[-1]["step"], "rms": [logged[-1][f"monitor/residual_rms/{b}"] for b in blocks]},
            "ratio": {"step": [r["step"] for r in logged], "value": [r["monitor/residual_rms_ratio"] for r in logged]},
            "eval_accuracy": ev[-1]["eval/accuracy"] if ev else None}
    return out


def plot_qk_norm(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, e) = plt.subplots(1, 3, figsize=(15, 4))
    top = f"{max(r['lrs']):g}"
    for key, label, color in (("with_qk_norm", "QK-norm", "C0"), ("without_qk_norm", "no QK-norm", "C3")):
        cap = r["initial_loss"]
        y = [min(x, cap) if math.isfinite(x) else cap for x in r[key]["final_eval_loss"]]
        a.plot(r["lrs"], y, "o-", color=color, label=f"{label} (LR sensitivity {r[key]['lr_sensitivity']:.3f})")
        c = r[key]["curves"][top]
        b.plot(c["step"], c["max_attn_logit"], color=color, label=f"{label}: encoder blocks")
        b.plot(c["step"], c["map_head_max_attn_logit"], ":", color=color, label=f"{label}: MAP head")
        for name, style, what in (("max_attn_logit", "o-", "encoder blocks"), ("map_head_max_attn_logit", "s:",
                                                                                 "MAP head")):
            last = [r[key]["curves"][f"{lr:g}"][name] for lr in r["lrs"]]
            e.plot(r["lrs"], [v[-1] if v else float("nan") for v in last], style, color=color,
                   label=f"{label}: {what}")
    a.axhline(r["initial_loss"], color="grey", ls=":", label="loss at init (ln 10): losses above it, and diverged runs, are shown here")
    a.set(xscale="log", xlabel="peak learning rate", ylabel="final eval loss", title="LR sensitivity")
    b.set(yscale="log", xlabel="step", ylabel="max attention logit", title=f"learning rate {top}")
    e.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="max attention logit at the last log",
          title="Logit growth against the learning rate")
    for ax, where in ((a, "center left"), (b, "upper left"), (e, "upper left")):
        ax.legend(fontsize=8, loc=where)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_swin_norm(r, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for version, color in (("V1", "C3"), ("V2", "C0")):
        v = r[version]
        x = np.arange(len(v["blocks"]))
        name = "V1 pre-norm" if version == "V1" else "V2 res-post-norm"
        a.plot(x, v["trained"]["rms"], "o-", color=color, label=f"{name}, step {v['trained']['step']}")
        a.plot(x, v["first"]["rms"], "o:", color=color, alpha=0.5, label=f"{name}, step {v['first']['step']}")
        b.plot(v["ratio"]["step"], v["ratio"]["value"], color=color, label=name)
    blocks = r["V1"]["blocks"]
    a.set_xticks(np.arange(len(blocks)), [s.replace("_block", "/") for s in blocks], rotation=60, fontsize=7)
    a.set(yscale="log", xlabel="block (stage/block)", ylabel="residual stream RMS", title="Activation amplitude per block")
    b.set(yscale="log", xlabel="step", ylabel="max / min block RMS", title="Spread across blocks")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out, tiny=False, studies=("qk_norm", "swin_norm"), workdir=None):
    """Both studies (or those named); writes their figures to `out` and their results into `out`/instability.json
    (a study not run keeps its earlier entry there). Returns the results."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = settings(tiny)
    saved = out / "instability.json"
    results = (json.loads(saved.read_text()) if saved.exists() else {}) | {"settings": s}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(workdir or tmp)
        if "qk_norm" in studies:
            results["qk_norm"] = qk_norm_study(s, work)
            plot_qk_norm(results["qk_norm"], out / "instability_qk_norm.png")
        if "swin_norm" in studies:
            results["swin_norm"] = swin_study(s, work)
            plot_swin_norm(results["swin_norm"], out / "instability_swin_norm.png")
    saved.write_text(json.dumps(results, indent=1))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the figures and instability.json")
    ap.add_argument("--tiny", action="store_true", help="a few steps on digits (seconds)")
    ap.add_argument("--studies", default="qk_norm,swin_norm", help="comma-separated: qk_norm, swin_norm")
    ap.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--replot", action="store_true", help="only redraw the figures from --out/instability.json")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.out)
    run(args.out, args.tiny, tuple(args.studies.split(",")), args.workdir or None)


def replot(out):
    """Redraw the figures in `out` from its instability.json (no training)."""
    out = pathlib.Path(out)
    results = json.loads((out / "instability.json").read_text())
    if "qk_norm" in results:
        plot_qk_norm(results["qk_norm"], out / "instability_qk_norm.png")
    if "swin_norm" in results:
        plot_swin_norm(results["swin_norm"], out / "instability_swin_norm.png")


if __name__ == "__main__":
    main()
