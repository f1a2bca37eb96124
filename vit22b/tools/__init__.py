"""Tools around training, each a `python -m vit22b.tools.NAME` command: the step benchmark (bench.py) with
timm's side (bench_timm.py) and a profile breakdown (breakdown.py), the input pipeline benchmark
(data_bench.py), the compiled step's memory report (memory_report.py), the CPU-host allocator opt-in
(hugepages.py) and what the host CPU can do (host_cpu.py).
"""
