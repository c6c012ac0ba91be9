"""Hypothesis profiles of the model tests.

``ci`` (default): derandomized, so every run explores the same programs (reproducible figures).
``long`` (``KVSCHED_STRESS=long``): random seeds, 20x the examples and longer programs; Hypothesis
prints the seed and the minimal failing program on failure (replay with ``--hypothesis-seed``).
"""

from hypothesis import HealthCheck, Phase, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.filter_too_much],
               print_blob=True,
               # no "explain" phase: its line tracing makes shrinking a failure 10x slower
               phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
settings.register_profile("ci", derandomize=True, database=None, max_examples=150,
                          stateful_step_count=40, **_COMMON)
settings.register_profile("long", max_examples=3000, stateful_step_count=150, **_COMMON)
