"""The synthetic world: slide painters, cohorts with known truth, their scores and the demo model built on them.

Tests, the demo model and the learning benchmarks use it; no production stage (vision_tower, chat, train,
raider, eval) imports it, so what ships as the pipeline holds only production code.
"""
