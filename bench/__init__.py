"""Benchmarks: tooling beside the library (issue #18). They import the library, never the reverse.

`lol bench …` (bench/cli.py, registered under the `lol.commands` entry points) and the scripts
here write their results under bench/results/; docs/performance.md and docs/cluster.md
summarise them. measure.py times the library's stages in fresh processes; unet.py measures
LoRA training throughput on SD-shaped UNets; faults/ is the fault-injection harness.
"""

from storage.errors import DomainError


class BenchError(DomainError):
    """A benchmark that cannot run as asked: its options, its manifest's kind, scores not stored yet."""
