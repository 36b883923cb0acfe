"""fastclt benchmarks: per-op and end-to-end suites, the harness that times them, and the CLI
(``python -m benchmarks.run``). See benchmarks/README.md."""
