"""The BreakHis data layer: dataset (names, records, index), splits, the decode cache, the one
preparation pipeline, the integrity report, download, and the synthetic demo tree."""
