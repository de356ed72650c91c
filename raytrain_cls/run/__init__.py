"""The Ray run side: the driver that resolves and fits a run, the per-worker train function, Tune searches, and what
they need around them (cluster capacity, preemption notices, reports, console, start-up timing, trackers).

Imports core and data; never the commands or bench above it.
"""
