"""Every numeric tolerance of the test suite, in one place, with the reason for its value.

Add new constants here (never inline a tolerance in a test).
"""

# fp32 rounding: reordering sums over a few hundred terms changes the last bits only.
FP32_EXACT_ATOL = 1e-5
# Fusion of exactly duplicated sub-MLPs reproduces output and sign kernel to rounding error (method.md 1.6).
DUPLICATE_FUSION_RTOL = 1e-5
# A compression at keep_ratio < 1 must move the output by more than this, or it did nothing (non-vacuity).
MIN_CHANGE = 1e-4
