"""devices.py: bf16 is chosen only where it pays, by a measurement that leaves the caller's state alone."""
import pytest
import torch

import devices


@pytest.mark.parametrize("flags, speedup, expected", [
    (set(), 2.0, False),                    # no bf16 instructions: emulated, never chosen
    ({"avx512_bf16"}, 0.5, False),          # the flag, but measured slower than fp32 (seen on a 2-core Xeon)
    ({"avx512_bf16"}, 1.2, False),          # within the margin: fp32 stays
    ({"avx512_bf16"}, 2.0, True),
    ({"amx_bf16", "avx512_bf16"}, 3.0, True),
])
def test_cpu_bf16_is_chosen_only_where_the_flags_exist_and_it_measures_faster(monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: speedup)
    assert devices.native_bf16(torch.device("cpu")) is expected


def test_cpu_bf16_speedup_is_a_positive_ratio_measured_once_without_touching_the_global_rng_or_threads():
    devices.cpu_bf16_speedup.cache_clear()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = devices.cpu_bf16_speedup(size=64, repeats=1)
        assert torch.get_num_threads() == 2  # measured on one thread, the caller's count restored
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded training run draws the same numbers as without it
    assert first > 0 and devices.cpu_bf16_speedup(size=64, repeats=1) == first  # cached: one measurement a process
