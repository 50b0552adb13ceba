"""Our AVX-512 BF16 C++ CPU kernels (`xgenmm.cpu_kernels`): the batch-invariant bf16 linear (within one bf16 rounding
of float32 math, rows bit-identical alone and batched) and the library's build cache. The paged attention of both
libraries is tested in test_paged_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xgenmm import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels unavailable here: {cpu_kernels.unavailable_reason()}")


@pytest.mark.parametrize("m,k,n", [(1, 3072, 96), (3, 4304, 37), (7, 100, 50), (16, 64, 130), (70, 96, 20)])
def test_linear_bf16_within_one_rounding_of_float32(m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    exact = F.linear(x.float(), w.float(), b.float())
    for bias in (b, None):
        y = torch.ops.xgenmm_cpu.linear_bf16(x, w, bias)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = exact if bias is not None else exact - b.float()
        ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at each output
        assert bool(((y.float() - ref).abs() <= ulp * 0.5 + 1e-5 * ref.abs().max()).all())
    assert torch.ops.xgenmm_cpu.linear_bf16(x.view(1, m, k), w, b).shape == (1, m, n)


def test_linear_bf16_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1152, generator=g).bfloat16()
    w = (torch.randn(200, 1152, generator=g) * 0.03).bfloat16()
    full = torch.ops.xgenmm_cpu.linear_bf16(x, w, None)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 11), slice(100, 300)):
        assert torch.equal(torch.ops.xgenmm_cpu.linear_bf16(x[rows], w, None), full[rows])


@pytest.mark.parametrize("m,k,n", [(1, 3072, 96), (7, 4304, 37), (61, 100, 50), (130, 97, 33), (3, 512, 1000)])
def test_packed_linear_bf16_within_one_rounding_and_rows_batch_invariant(m, k, n):
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    packed = torch.ops.xgenmm_cpu.pack_bf16_weight(w)
    assert torch.equal(torch.ops.xgenmm_cpu.unpack_bf16_weight(packed, n, k), w)
    y = torch.ops.xgenmm_cpu.linear_bf16_packed(x, packed, b, n)
    ref = F.linear(x.float(), w.float(), b.float())
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    assert bool(((y.float() - ref).abs() <= ulp * 0.5 + 1e-5 * ref.abs().max()).all())
    for i in range(0, m, max(1, m // 4)):  # every row alone equals itself inside the batch, bit for bit
        assert torch.equal(torch.ops.xgenmm_cpu.linear_bf16_packed(x[i : i + 1], packed, b, n)[0], y[i])


def test_packed_linear_module_keeps_a_plain_state_dict():
    from torch import nn

    from xgenmm.model.cpu_linear import PackedBf16Linear, use_packed_bf16_linears

    net = nn.Sequential(nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 8, bias=False)).bfloat16()
    plain = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 48).bfloat16()
    assert use_packed_bf16_linears(net) == 2 and isinstance(net[0], PackedBf16Linear)
    assert net.state_dict().keys() == plain.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in plain.items())
    ref = F.linear(F.relu(F.linear(x.float(), plain["0.weight"].float(), plain["0.bias"].float()).bfloat16()).float(),
                   plain["2.weight"].float())
    torch.testing.assert_close(net(x).float(), ref, rtol=2e-2, atol=2e-2)
    other = {k: torch.randn_like(v.float()).bfloat16() for k, v in plain.items()}
    net.load_state_dict(other)
    assert torch.equal(net[2].weight, other["2.weight"]) and torch.equal(net[0].bias, other["0.bias"])


def test_linear_bf16_rejects_bad_inputs():
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.xgenmm_cpu.linear_bf16(torch.randn(2, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.xgenmm_cpu.linear_bf16(torch.randn(2, 9).bfloat16(), torch.randn(4, 8).bfloat16(), None)


def test_built_library_is_cached_on_disk():
    from xgenmm.cpu_kernels import build

    libraries = list((build.cache_dir() / build.build_key()).glob("*.so"))
    assert len(libraries) == 1  # the next process loads this file instead of compiling


def test_hugepage_tensors_are_ordinary_tensors_on_2mib_aligned_memory():
    """Packed weights, the LM head and the CPU KV cache live in `empty_hugepages` memory: 2 MiB-aligned (so the kernel
    can back it with huge pages), usable like any tensor, and unmapped when dropped."""
    import gc

    from xgenmm.cpu_kernels import empty_hugepages, to_hugepages

    big = empty_hugepages((3, 1000, 1000), torch.bfloat16)
    assert big.shape == (3, 1000, 1000) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert big.data_ptr() % (2 << 20) == 0
    src = torch.randn(1000, 1500)
    copy = to_hugepages(src)
    assert torch.equal(copy, src) and copy.data_ptr() != src.data_ptr() and copy.data_ptr() % (2 << 20) == 0
    small = empty_hugepages((4, 4), torch.float32)  # under 2 MiB: ordinary memory
    assert small.shape == (4, 4)
    packed = torch.ops.xgenmm_cpu.pack_bf16_weight(torch.randn(2048, 1024).bfloat16())
    assert packed.data_ptr() % (2 << 20) == 0

    def mapped_kib() -> int:
        return sum(int(line.split()[1]) for line in open("/proc/self/smaps") if line.startswith("Rss:"))

    before = mapped_kib()
    block = empty_hugepages((64 << 20,), torch.uint8).fill_(1)  # 64 MiB, touched
    assert mapped_kib() - before >= 60 << 10
    del block
    gc.collect()
    assert mapped_kib() - before < 8 << 10
