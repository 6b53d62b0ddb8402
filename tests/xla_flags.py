"""XLA flags for simulated multi-device CPU runs (no imports: workers read it before jax).

XLA aborts a CPU collective whose threads do not all arrive within 40 s. A loaded 2-core
machine running 8 simulated devices beside another test worker exceeded that once in a full
run (test_sharded_switches_are_exact); waiting longer is not a failure here.
"""

SLOW_COLLECTIVES = (
    " --xla_cpu_collective_timeout_seconds=900"
    " --xla_cpu_collective_call_terminate_timeout_seconds=900"
)
