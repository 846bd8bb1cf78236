"""Hypothesis profiles: "ci" (the default) keeps the property tests to about a minute;
``--hypothesis-profile=long`` runs thousands of examples."""

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, derandomize=True, **_common)
settings.register_profile("long", max_examples=3000, **_common)
settings.load_profile("ci")
