"""Time schedules as pure functions of the iteration."""

import pytest

from recdreamer_gs import schedule


def test_uniform_and_linear():
    assert schedule.uniform_range(0.02, 0.98) == (20, 980)
    assert schedule.linear_range(0, 100, 0.02, 0.98, 0.5) == (20, 980)
    assert schedule.linear_range(99, 100, 0.02, 0.98, 0.5) == (20, 500)
    lo, hi = schedule.linear_range(50, 101, 0.02, 0.98, 0.5)
    assert lo == 20 and hi == 740


def test_t5_switches_to_half():
    assert schedule.t5_range(4999, 5000, 0.02, 0.98) == (20, 980)
    assert schedule.t5_range(5000, 5000, 0.02, 0.98) == (20, 501)


@pytest.mark.parametrize("n", [2, 10])
def test_bnf_block_boundaries(n):
    total = 2 * n * 50  # 50 iterations per block
    expected_expand = [(max(20, (n - 1 - i) * (1000 // n)), 980) for i in range(n)]
    expected_shrink = [(20, 980 if i == 0 else (n - i) * (1000 // n)) for i in range(n)]
    for block, expected in enumerate(expected_expand + expected_shrink):
        first, last = block * 50, block * 50 + 49
        assert schedule.bnf_range(first, total, n, 0.02, 0.98) == expected
        assert schedule.bnf_range(last, total, n, 0.02, 0.98) == expected
    # Iterations past the end stay in the last block.
    assert schedule.bnf_range(total + 7, total, n, 0.02, 0.98) == expected_shrink[-1]
    if n == 2:
        assert expected_expand == [(500, 980), (20, 980)]
        assert expected_shrink == [(20, 980), (20, 500)]
    if n == 10:
        assert expected_expand[0] == (900, 980) and expected_expand[-1] == (20, 980)
        assert expected_shrink[1] == (20, 900) and expected_shrink[-1] == (20, 100)


def test_dispatch_rejects_unknown():
    with pytest.raises(ValueError, match="unknown time schedule"):
        schedule.t_range("cosine", 0, 10, 0.02, 0.98)  # type: ignore[arg-type]


def test_lora_warmup_factor():
    assert schedule.warmup_factor(0, 500) == 1 / 501
    assert schedule.warmup_factor(249, 500) == 250 / 501
    assert schedule.warmup_factor(500, 500) == 1.0 and schedule.warmup_factor(9999, 500) == 1.0
    assert schedule.warmup_factor(0, 0) == 1.0


def test_empty_range_is_an_error_not_a_silent_draw():
    import pytest

    from recdreamer_gs.schedule import t_range

    with pytest.raises(ValueError, match="empty t range"):
        t_range("bnf", 0, 100, 0.02, 0.5, bnf_intervals=2)  # the first expanding block starts at T/2 = t_max
