"""fedseg benchmarks.

A regular package on purpose: opacus installs a top-level ``benchmarks``
package that would shadow a namespace package of the same name.
"""
