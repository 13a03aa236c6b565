"""Lightning callbacks that serve every regime: the non-finite-loss guard, progress lines,
host-sync counting, step-time split, and the logging cadence they share."""
