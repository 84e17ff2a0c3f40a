"""How the benchmark reads a profiled step: which kind each device kernel is, and where the device waits for the
host (at the step boundary, inside the step) from the kernels' timeline. Fake profiler events, no GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from support.bench import bench_module

case = bench_module("case")


@pytest.mark.parametrize(
    "name,kind",
    [
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coo", "gemm"),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<>", "attention"),
        ("void kOptimizer32bit2State<__nv_bfloat16, 0>", "optimizer"),
        ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("triton_poi_fused__to_copy_add_mul_0", "fused (triton)"),  # a compiled kernel, though its name says copy
        ("Memcpy DtoH (Device -> Pinned)", "copy"),
        ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", "other"),
    ],
)
def test_kernel_kinds(name, kind):
    assert case.kernel_kind(name) == kind


def _event(name: str, start: float, end: float, device: DeviceType):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device)


def test_idle_gaps_split_the_step_boundary_from_gaps_inside_steps():
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    mark = case.STEP_MARK
    events = [
        _event(mark, 0, 1000, cpu),
        _event(mark, 0, 1000, gpu),  # the mark's device copy is no kernel
        _event("k", 100, 300, gpu),
        _event("k", 250, 400, gpu),  # overlapping kernels: busy 100-400
        _event("k", 420, 900, gpu),  # a 20 us gap inside step 1
        _event(mark, 1000, 3000, cpu),
        _event("k", 1500, 2000, gpu),  # 600 us from step 1's last kernel: the boundary
        _event("k", 2300, 2900, gpu),
    ]  # a 300 us gap, 500 us into step 2's kernels
    idle = case.idle_gaps(events)
    first, second = idle["steps"]
    assert first["boundary_ms"] is None and first["inside_ms"] == pytest.approx(0.02)
    assert first["kernels_span_ms"] == pytest.approx(0.8)
    assert second["boundary_ms"] == pytest.approx(0.6) and second["inside_ms"] == pytest.approx(0.3)
    assert idle["longest"][0] == pytest.approx({"ms": 0.3, "at_ms": 0.5, "of_ms": 1.4})
    assert idle["small_gaps_ms"] == pytest.approx(0.01)  # the 20 us gap over 2 steps


def test_idle_gaps_without_kernels_is_empty():
    assert case.idle_gaps([_event(case.STEP_MARK, 0, 10, DeviceType.CPU)]) == {}
