"""The compressed modes' memory, measured: after construction and a step a fresh process's
resident memory grows by the states' bytes per parameter (the params move into the arena and
the model's own storage is freed), as `python -m bench.studies.state_bytes` reports for the README."""
import pytest

from bench.studies.state_bytes import state_bytes_per_param

# mode: its states' bytes per parameter, by construction (codes, absmax per 256, remainder).
EXPECTED = {
    "fp32 params, 8-bit moments": 1 + 1 + 2 * 4 / 256,
    "bf16 params, bf16+8 master, 8-bit moments": 1 + 1 + 2 * 4 / 256 + 1,
    "bf16 params, bf16+16 master, fp32 moments": 4 + 4 + 2,
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_resident_memory_grows_by_the_states_bytes(mode):
    """Within 0.1 below (nothing is missing) and 0.5 above (a few MB the first step loads, over
    8M parameters) of the states' own bytes: no second copy of anything."""
    measured = state_bytes_per_param(mode, numel=8 * 2 ** 20)
    assert EXPECTED[mode] - 0.1 < measured < EXPECTED[mode] + 0.5, \
        f"{mode}: {measured:.2f} B/param, the states hold {EXPECTED[mode]:.2f}"
