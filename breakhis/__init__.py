"""BreakHis CNN toolkit: data, fast loader, models, training loop, metrics and runs."""
