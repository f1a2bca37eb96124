"""Scale: device meshes with named axes and the logical-axis rules that map parameter and activation axes onto
them (sharding.py), ViT-22B's asynchronous parallel linear operations as collective-matmul rings
(collective.py), the ahead-of-time planner behind `python -m vit22b.main --dry_run` (planner.py), and the TPU
chips, slices and topologies it compiles for with `--topology` (tpu.py).
"""
