"""Launching on SLURM through submitit, and reading a job's outcome."""
