"""What runs report: per-case outputs, metrics, perfusion figures, tables, overlays, the cross-validation table."""
