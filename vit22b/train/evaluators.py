"""Evaluations on frozen features, as ViT-22B and big_vision report a representation: a linear probe (a softmax
head trained on the frozen pre-logit features) and few-shot classification (closed-form regularised least
squares on them, big_vision's few-shot evaluator). Listed in `config.evals`; run at each evaluation of a run and
by `python -m vit22b.tools.evaluate` on a checkpoint.

    config.evals = [dict(name="fewshot_fmnist", kind="fewshot", data="fashion_mnist", shots=(1, 5, 10, 25)),
                    dict(name="probe_fmnist", kind="linear_probe", data="fashion_mnist", train_split="train[:10%]")]

Metrics: eval/NAME/Kshot (few-shot accuracy, the mean over `seeds` draws of K examples per class) and
eval/NAME/accuracy (linear probe). The features are the model's pooled pre-logits (a SimMIM run's encoder).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit22b.input import pipeline

KINDS = ("fewshot", "linear_probe")
DEFAULTS = {
    "fewshot": dict(train_split="train", test_split="test", shots=(1, 5, 10, 25), seeds=3, l2_reg=2.0 ** 10,
                    pp="", data_dir="", batch_size=256, max_train=10_000, max_test=10_000),
    "linear_probe": dict(train_split="train", test_split="test", steps=500, lr=1e-2, wd=1e-4, pp="", data_dir="",
                         batch_size=256, max_test=10_000),
}


def options(spec):
    """The evaluator's settings, defaults filled in; errors name the field (config.evals[i].KEY)."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
    for key in ("name", "data"):
        if not spec.get(key):
            raise ValueError(f"{key}: required")
    unknown = set(spec) - set(DEFAULTS[kind]) - {"name", "kind", "data"}
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: not an option of {kind!r}; options: {sorted(DEFAULTS[kind])}")
    return {**DEFAULTS[kind], **spec}


def feature_fn(model, config):
    """A jitted (params, images) -> pooled features [B, F] of the run's model (a SimMIM run: its encoder)."""
    from vit22b.train import tasks
    if tasks.is_simmim(config):
        encoder = model.encoder
        return jax.jit(lambda params, images: encoder.apply({"params": params["encoder"]}, images))
    headless = model.clone(num_classes=0)
    return jax.jit(lambda params, images: headless.apply(
        {"params": {k: v for k, v in params.items() if k != "head"}}, images))


def features(fn, params, source, pp, batch_size, limit=None):
    """(features [N, F] float32, labels [N]) of the first `limit` records of `source` (all by default)."""
    n = len(source) if limit is None else min(limit, len(source))
    feats, labels = [], []
    for batch in pipeline.eval_batches(pipeline.SliceSource(source, 0, n), batch_size=batch_size, pp=pp):
        keep = batch["mask"] > 0
        feats.append(np.asarray(fn(params, jnp.asarray(batch["image"])), np.float32)[keep])
        labels.append(batch["label"][keep])
    return np.concatenate(feats), np.concatenate(labels)


def fewshot_accuracy(train_x, train_y, test_x, test_y, shots, num_classes, seeds=3, l2_reg=2.0 ** 10):
    """{shots: accuracy}: for each draw of `shots` examples per class, ridge regression onto targets +-1 (one
    column per class) on features centred and scaled by the draw's statistics, with a bias; the mean over draws."""
    out = {}
    for k in shots:
        accs = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            idx = np.concatenate([rng.choice(np.flatnonzero(train_y == c), k, replace=False)
                                  for c in range(num_classes)])
            x, y = train_x[idx].astype(np.float64), train_y[idx]
            mean, std = x.mean(0), x.std(0) + 1e-6
            design = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)
            targets = 2.0 * np.eye(num_classes)[y] - 1.0
            reg = l2_reg * np.eye(design.shape[1])
            reg[-1, -1] = 0.0  # the bias is not regularised
            w = np.linalg.solve(design.T @ design + reg, design.T @ targets)
            test = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], 1)
            accs.append(float(np.mean((test @ w).argmax(1) == test_y)))
        out[k] = float(np.mean(accs))
    return out


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes, steps=500, lr=1e-2, wd=1e-4):
    """Test accuracy of a softmax head trained by full-batch AdamW on the (standardised) frozen features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, xt = jnp.asarray((train_x - mean) / std), jnp.asarray((test_x - mean) / std)
    y = jnp.asarray(train_y)
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}
    tx = optax.adamw(lr, weight_decay=wd)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, updates), s), None
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    p = train(params)
    return float(jnp.mean(jnp.argmax(xt @ p["w"] + p["b"], 1) == jnp.asarray(test_y)))


def run(specs, model, params, config):
    """The metrics of every evaluator in `specs` (config.evals) for `params`."""
    fn = feature_fn(model, config)
    metrics = {}
    for raw in specs or ():
        o = options(raw)
        module = pipeline.dataset_module(o["data"])
        ddir = pipeline.data_dir(dict(config.input, data_dir=o["data_dir"]) if o["data_dir"] else config.input)
        info = pipeline.dataset_info(module, ddir)
        pp = o["pp"] or config.input.get("pp_eval") or pipeline.default_pp(config.input.image_size, info.channels)
        train = pipeline.load_split(module, o["train_split"], ddir)
        test = pipeline.load_split(module, o["test_split"], ddir)
        test_x, test_y = features(fn, params, test, pp, o["batch_size"], o["max_test"])
        name = o["name"]
        if o["kind"] == "fewshot":  # the draws come from the first max_train records
            train_x, train_y = features(fn, params, train, pp, o["batch_size"], o["max_train"])
            for k, acc in fewshot_accuracy(train_x, train_y, test_x, test_y, o["shots"], info.num_classes,
                                           o["seeds"], o["l2_reg"]).items():
                metrics[f"eval/{name}/{k}shot"] = acc
        else:
            train_x, train_y = features(fn, params, train, pp, o["batch_size"])
            metrics[f"eval/{name}/accuracy"] = linear_probe_accuracy(train_x, train_y, test_x, test_y,
                                                                     info.num_classes, o["steps"], o["lr"], o["wd"])
    return metrics
