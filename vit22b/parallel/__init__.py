"""Scale: device meshes with named axes and the logical-axis rules that map parameter and activation axes onto
them (sharding.py), ViT-22B's asynchronous parallel linear operations as collective-matmul rings
(collective.py), and the ahead-of-time planner behind `python -m vit22b.main --dry_run` (planner.py).
"""
