"""Benchmarks: commands that print numbers (JSON lines, then a table). The top layer: it drives the commands' parser
and the run side exactly as a user's command would."""
