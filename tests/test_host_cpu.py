"""vit22b/tools/host_cpu.py: reading the CPU's bf16 matmul instructions, and the choice of how dense layers multiply bf16."""
import pytest

from vit22b.tools import host_cpu

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n"
ZEN4 = ZEN3.replace("7B13", "9B14").replace("fma", "fma avx512f avx512_bf16")
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon\nflags\t\t: avx512f amx_bf16 amx_tile\n"
NEOVERSE_V1 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


def test_describe_reads_the_model_and_the_bf16_instructions():
    assert host_cpu.describe(ZEN3) == {"model": "AMD EPYC 7B13", "bf16_matmul_instructions": False}
    assert host_cpu.describe(ZEN4) == {"model": "AMD EPYC 9B14", "bf16_matmul_instructions": True}
    assert host_cpu.describe(SAPPHIRE_RAPIDS)["bf16_matmul_instructions"] is True
    assert host_cpu.describe(NEOVERSE_V1)["bf16_matmul_instructions"] is True
    assert host_cpu.describe(NEOVERSE_V1.replace(" bf16", ""))["bf16_matmul_instructions"] is False
    unknown = host_cpu.describe("")
    assert unknown["bf16_matmul_instructions"] is None and unknown["model"]


@pytest.mark.parametrize("cpu, backend, env, mode", [
    (ZEN3, "cpu", None, "float32"), (ZEN4, "cpu", None, "native"), ("", "cpu", None, "native"),
    (ZEN3, "gpu", None, "native"), (ZEN3, "cpu", "native", "native"), (ZEN4, "cpu", "float32", "float32"),
    (ZEN4, "cpu", "auto", "native")])
def test_bf16_dots_mode(cpu, backend, env, mode, monkeypatch):
    monkeypatch.setattr(host_cpu, "info", lambda: host_cpu.describe(cpu))
    if env is None:
        monkeypatch.delenv(host_cpu.ENV, raising=False)
    else:
        monkeypatch.setenv(host_cpu.ENV, env)
    assert host_cpu.bf16_dots_mode(backend) == mode


def test_a_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_cpu.ENV, "fp32")
    with pytest.raises(ValueError, match="VIT22B_BF16_DOTS='fp32'"):
        host_cpu.bf16_dots_mode("cpu")
