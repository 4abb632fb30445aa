"""The NCHWc block read from the CPU's flags: what round_to: auto rounds to."""

import pytest

from compressor import cpu


@pytest.mark.parametrize(
    "flags, block",
    [({"sse4_2", "avx", "avx2", "fma"}, 8), ({"avx2", "avx512f", "avx512bw"}, 16), ({"sse4_2", "avx"}, None), ({"neon", "asimd"}, None)],
)
def test_block_follows_the_widest_vector_unit(flags, block):
    got = cpu.nchwc_block_from_flags(flags)
    assert got == block, f"flags {sorted(flags)}: block {got}, expected {block}"


def test_flags_are_read_from_the_x86_and_the_arm_spelling():
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\n"
    assert cpu._flags(x86) == {"fpu", "sse2", "avx2", "fma"}, cpu._flags(x86)
    assert cpu._flags(arm) == {"fp", "asimd", "evtstrm"}, cpu._flags(arm)
    assert cpu._flags("no flags here") == set()
