"""Where raw files come from: TLC's trip-data downloads and synthetic sample months."""
