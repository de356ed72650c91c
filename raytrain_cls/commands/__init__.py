"""The user's commands: the `raytrain-cls` argument parser and each sub-command that is more than a call into the run
side (doctor, export, eval / predict). Imports core, data and run."""
