"""overtok analysis: fits and figures over the Parquet export. Never imports torch (tests check it)."""
