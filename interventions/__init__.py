"""topk-saturation, ``interventions``: causal tests of the task picture.

Steering with task directions, the cross-position patching experiment and token-level early
exit. This package may import ``probes``; ``probes`` never imports it.
"""
