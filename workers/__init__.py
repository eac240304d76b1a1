"""tsam-sweep workers: run trials (``run_trial``) on an executor (Ray or in-process)."""
