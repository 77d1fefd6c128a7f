"""Training plugins: `raghub train` and its objectives."""
