"""Benchmark library: timing, workloads, roofline limits, static and serving benchmarks, peers, tables, plots."""
