"""fedseg benchmarks (a regular package: opacus installs a top-level ``benchmarks`` that would shadow a namespace one)."""
