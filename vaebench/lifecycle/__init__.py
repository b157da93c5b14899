"""The life of tracked runs, one alone or K as a stack (see docs/architecture.md)."""
