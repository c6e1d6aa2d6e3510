"""dskd-pipe: shared core (config, data, loader, models, objectives, methods, and a distill run by concern)."""
