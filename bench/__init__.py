"""Benchmarks of the data plane against what users would otherwise run, side by side.

`python -m bench` starts its own servers on loopback (ours and the baselines), generates
its own data in a temporary directory on the same disk as the targets, runs every scenario
interleaved with its baselines for several rounds, and prints one table of medians and
ratios. See bench/README.md.
"""
