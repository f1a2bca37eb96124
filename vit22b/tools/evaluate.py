"""Evaluate a run's checkpoint on frozen features (vit22b/train/evaluators.py): few-shot and linear probe.

  python -m vit22b.tools.evaluate --checkpoint=WORKDIR/checkpoints/STEP
  python -m vit22b.tools.evaluate --checkpoint=... --evals='[{"name": "fm", "kind": "fewshot", "data": "fashion_mnist"}]'

The evaluators are the run's `config.evals` unless --evals (a JSON list) gives others; prints one JSON line of
metrics (eval/NAME/...). The model and its settings come from the config stored with the checkpoint.
"""
import argparse
import json

import ml_collections


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint step folder, WORKDIR/checkpoints/STEP")
    ap.add_argument("--evals", default="", help="a JSON list of evaluators (default: the run's config.evals)")
    args = ap.parse_args(argv)

    from vit22b import config_check
    from vit22b.models import convert
    from vit22b.train import evaluators, tasks
    try:
        _, params, spec = convert.load_checkpoint(args.checkpoint)
        if "run_config" not in spec:
            raise convert.CheckpointError(f"{args.checkpoint}: not a run's checkpoint step (no run info)")
        config = ml_collections.ConfigDict(spec["run_config"])
        specs = json.loads(args.evals) if args.evals else list(config.get("evals") or ())
        if not specs:
            raise ValueError("no evaluators: the run's config has no evals; give --evals")
        for i, s in enumerate(specs):
            try:
                evaluators.options(s)
            except ValueError as e:
                raise config_check.ConfigError(f"--evals[{i}].{e}") from None
        model = tasks.build_model(config, spec["num_classes"])
        print(json.dumps(evaluators.run(specs, model, params, config)), flush=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
