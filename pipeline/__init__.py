"""dskd-pipe: shared core (CLI, config, data, models, objectives)."""
