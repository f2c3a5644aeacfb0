"""Surviving failures: preemption (``preempt``), non-finite steps (``nonfinite``),
and fault injection for the tests (``fault_injection``, test-only)."""
