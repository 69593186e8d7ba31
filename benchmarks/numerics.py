"""Largest output error of every pure function against float64 at |mean| >> std (docs/numerics.md).

    python benchmarks/numerics.py

Prints, for mean 1e4 (default settings), mean 1e6 with use_fast_variance=False and mean 1e6
default, the largest |y32 - y64| over dense, sequence and image inputs and the five worst cases.
"""
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from seqnorm_jax import functional as F
cases = [
 ("bn", F.batch_norm, {}), ("ghost4", F.ghost_norm, {"batch_groups": 4}),
 ("gn4", F.group_norm, {"num_groups": 4}), ("seq", F.seq_norm, {"channel_groups": 4, "batch_groups": 2}),
 ("seq_gf", F.seq_norm, {"channel_groups": 4, "batch_groups": 2, "order": "ghost_first"}),
 ("bgn4", F.bgn, {"num_groups": 4}), ("bgroup", F.batch_group_norm, {"batch_groups": 2, "channel_groups": 4}),
 ("hn", F.heterologous_norm, {}), ("hn_g", F.heterologous_norm, {"mean_set": "group", "mean_groups": 4, "std_groups": 2}),
 ("gnp", F.gn_plus, {"num_groups": 4}), ("gnp_bn", F.gn_plus, {"num_groups": 4, "variant": "bn_first"}),
 ("gnp_par", F.gn_plus, {"num_groups": 4, "variant": "parallel"}),
]
shapes = {"dense": (16, 8), "seq": (8, 5, 8), "image": (8, 3, 3, 8)}
rng = np.random.default_rng(0)
for mean, fast in [(1e4, True), (1e6, False), (1e6, True)]:
    worst = {}
    for sid, shp in shapes.items():
        x32 = (rng.normal(size=shp) + mean).astype(np.float32)
        for name, fn, kw in cases:
            y32 = np.asarray(fn(jnp.asarray(x32), use_fast_variance=fast, **kw))
            y64 = np.asarray(fn(jnp.asarray(x32.astype(np.float64)), use_fast_variance=False, **kw))
            worst[(name, sid)] = float(np.abs(y32 - y64).max())
    print(mean, "fast" if fast else "two-pass", "max", max(worst.values()), sorted(worst.items(), key=lambda t: -t[1])[:5])
