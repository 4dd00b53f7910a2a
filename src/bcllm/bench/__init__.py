"""Speed measurements: layer and model benchmarks, decode loops, memory bandwidth."""
