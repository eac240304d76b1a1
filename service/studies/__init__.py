"""Studies: a search over TSAM hyperparameters, its spec, status and budget."""
