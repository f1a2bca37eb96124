"""ViT-22B's asynchronous parallel linear ops: collective-matmul rings on 8 simulated CPU devices."""
import json
import subprocess
import sys

from conftest import REPO, cpu_env

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from vit22b.parallel import collective, planner, sharding
from vit22b.models import vit

out = {}
def err(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

counts = planner.collective_counts

# 1. The rings alone equal one einsum; chunk 6 (bidirectional halves 3 + 3) and 5 (halves 2 + 3).
mesh = sharding.make_mesh("data:2,model:4")
for c in (6, 5):
    x = jax.random.normal(jax.random.key(0), (4, 3, 4 * c))
    w1 = jax.random.normal(jax.random.key(1), (4 * c, 8))
    w2 = jax.random.normal(jax.random.key(2), (8, 4 * c))
    for bidi in (False, True):
        ag = jax.shard_map(lambda x, w: collective.allgather_matmul(x, w, "model", bidirectional=bidi), mesh=mesh,
                           in_specs=(P("data", None, "model"), P(None, "model")), out_specs=P("data", None, "model"))
        rs = jax.shard_map(lambda x, w: collective.matmul_reducescatter(x, w, "model", bidirectional=bidi),
                           mesh=mesh, in_specs=(P("data", None, "model"), P("model", None)),
                           out_specs=P("data", None, "model"))
        y = x @ w1
        out[f"ring c={c} bidi={bidi}"] = [err(ag(x, w1), y), err(rs(y, w2), y @ w2)]

# 2. One block, forward, on (data 2, model 4): the compiled HLO is the ring, and equals the einsum block.
x = jax.random.normal(jax.random.key(3), (4, 6, 32))
ref_block = vit.ParallelBlock(num_heads=4, mlp_dim=64)
params = nn.meta.unbox(ref_block.init(jax.random.key(1), x)["params"])
params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), params)
ref = ref_block.apply({"params": params}, x)[0]
act = NamedSharding(mesh, P("data", None, "model"))
for pl, ring in (("xla", "bidirectional"), ("collective", "unidirectional"), ("collective", "bidirectional")):
    block = vit.ParallelBlock(num_heads=4, mlp_dim=64, parallel_linear=pl, collective_ring=ring)
    with sharding.activate(mesh):
        boxed = jax.eval_shape(lambda: block.init(jax.random.key(1), x))["params"]
        ps = sharding.param_shardings(boxed, mesh)
        f = jax.jit(lambda p, x: block.apply({"params": p}, x)[0], in_shardings=(ps, act), out_shardings=act)
        got = f(jax.device_put(params, ps), jax.device_put(x, act))
        hlo = f.lower(params, x).compile().as_text()
    out[f"block {pl} {ring}"] = {"err": err(got, ref), "counts": counts(hlo)}

# 3. The whole ViT-22B design: loss and every gradient equal one device, with and without remat.
imgs = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
kw = dict(num_classes=10, width=64, depth=3, mlp_dim=256, num_heads=4, patch_size=2)
base = vit.ViT(**kw)
params = nn.meta.unbox(base.init(jax.random.key(1), imgs)["params"])
loss = lambda m, p: jnp.mean(jnp.sin(3 * m.apply({"params": p}, imgs)))
ref = jax.value_and_grad(loss, argnums=1)(base, params)
for spec in ("data:2,model:4", "data:2,fsdp:2,model:2"):
    for ring, remat in (("unidirectional", "none"), ("bidirectional", "dots_no_batch")):
        m = vit.ViT(**kw, parallel_linear="collective", collective_ring=ring, remat_policy=remat)
        mesh = sharding.make_mesh(spec)
        with sharding.activate(mesh):
            boxed = jax.eval_shape(lambda: m.init(jax.random.key(1), imgs))["params"]
            ps = sharding.param_shardings(boxed, mesh)
            f = jax.jit(jax.value_and_grad(lambda p: loss(m, p)))
            got = f(jax.device_put(params, ps))
            fwd = jax.jit(lambda p: m.apply({"params": p}, imgs)).lower(params).compile().as_text()
        out[f"vit {spec} {ring} {remat}"] = {"err": err(got, ref), "grad_scale": err(ref[1], jax.tree.map(jnp.zeros_like, ref[1])),
                                             "forward": counts(fwd)}
# 4. A model axis that does not divide the heads is a config error naming the field, before any tracing.
import sys; sys.path.insert(0, "tests")
from conftest import config
from vit22b import config_check
try:
    config_check.validate(config("vit22b_digits", **{"mesh": "model:8", "model.parallel_linear": "collective"}))
except config_check.ConfigError as e:
    out["config_error"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_collective_matmul_rings(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=cpu_env(8), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.split("RESULT")[-1])
    for key in [k for k in out if k.startswith("ring")]:
        assert max(out[key]) < 1e-5, (key, out[key])

    k = 4  # model axis
    for ring, per_step in (("unidirectional", 1), ("bidirectional", 2)):
        got = out[f"block collective {ring}"]
        assert got["err"] < 1e-5, (ring, got)
        c = got["counts"]
        # An all-gather ring into the fused input matmul and a reduce-scatter ring out of the output matmul:
        # k - 1 steps each, one or two transfers a step; activations are never all-gathered; one all-reduce
        # (the RMSNorm statistics over the feature shards).
        assert c["collective-permute"] == 2 * (k - 1) * per_step, c
        assert c["all-gather"] == 0 and c["reduce-scatter"] == 0 and c["all-to-all"] == 0, c
        assert c["all-reduce"] == 1, c
    assert out["block xla bidirectional"]["err"] < 1e-5  # XLA's own collectives (here an all-gather)

    assert out["config_error"].startswith("config.model.num_heads: 4 heads cannot be split over the 8 devices")
    for key in [k for k in out if k.startswith("vit")]:
        got = out[key]
        assert got["grad_scale"] > 1e-2  # the comparison is not vacuous
        assert got["err"] < 1e-5, (key, got)
        # Through the whole scanned stack the residual stream stays split on features; the only all-gather of
        # activations is the one leaving the stack for the final norm and the head.
        assert got["forward"]["all-gather"] <= 1 and got["forward"]["collective-permute"] > 0, (key, got)
