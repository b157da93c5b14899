"""Speed benchmarks and the bench command's arguments (docs/performance.md#the-bench-command)."""
